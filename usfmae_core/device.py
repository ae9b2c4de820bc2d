"""Device selection and description (``--device auto|cuda|mps|cpu``)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

from usfmae_core.constants import DEVICE_CHOICES
from usfmae_core.errors import UsfmaeError

# glibc mallopt parameters (malloc.h) and the values set for CPU work (see tune_cpu_allocator)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 256 * 2**20
_TRIM_THRESHOLD = 2**30


@functools.cache
def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep and reuse the large buffers of CPU training and inference; True when set.

    By default glibc serves every allocation over 32 MB (and, until its adaptive threshold has grown, over 128 kB)
    with a fresh ``mmap`` and returns it on ``free``, so each step's activations, casts and gradients of the same
    sizes are page-faulted in again (the kernel zeroes every page). Raising the mmap threshold to 256 MB and the
    trim threshold to 1 GB serves them from the heap instead: the ViT-B/16 MAE step in bf16 on 2 cores is ~10 %
    faster (benchmarks/README.md), the peak resident memory unchanged, but freed memory stays with the process until
    it exits (usfmae's commands are processes of their own). ``USFMAE_MALLOC_TUNING=0`` leaves malloc as it is;
    other C libraries (macOS, musl) are left alone. Called once per process by :func:`resolve_device` for a CPU.
    """
    # the mallopt parameter numbers are glibc's: any other C library is left alone
    if os.environ.get("USFMAE_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     _TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cuda|mps|cpu`` (or ``cuda:N``) into a ``torch.device``, refusing an absent accelerator.

    For a CPU it also tunes the C allocator for large tensors (:func:`tune_cpu_allocator`)."""
    device = _resolve(name)
    if device.type == "cpu":
        tune_cpu_allocator()
    return device


def _resolve(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsfmaeError("CUDA was requested but no CUDA GPU is available to PyTorch",
                          "use --device cpu, or install a CUDA build of torch (see README)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsfmaeError("MPS was requested but is not available", "use --device cpu")
    if name.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise UsfmaeError(f"unknown device '{name}'", f"choose one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


def describe_device(device: torch.device) -> dict:
    """Name and memory of ``device`` as plain types (for ``usfmae info``, logs and the Slicer module)."""
    info: dict = {"device": str(device), "name": "CPU", "memory_gb": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    elif device.type == "mps":
        info.update(name="Apple MPS")
    else:
        info.update(threads=torch.get_num_threads())
    return info


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` in ``auto|bf16|fp16|fp32`` on ``device`` (None means fp32), without a model.

    The model-aware decision (on CPU, bf16 only where it was measured faster for that model) is
    :func:`usfmae_core.precision.resolve_precision`; without a model to measure, ``auto`` means bf16 on CUDA GPUs that
    support it (fp16 otherwise) and on CPUs with native bf16, fp32 elsewhere.
    """
    from usfmae_core.precision import resolve_precision

    return resolve_precision(precision, device, log=None)
