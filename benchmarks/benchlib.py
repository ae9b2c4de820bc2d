"""Shared pieces of the training-step benchmarks (``bench_mae_step.py``, ``bench_finetune_step.py``).

- :func:`machine` describes the machine (CPU model and its bf16 / AMX flags, threads, versions, load average): speed
  figures are only compared side by side within one run, and a figure without its machine means little.
- :func:`alternate` times contenders step by step in turn (A, B, C, A, B, C, ...) so that a change in the load of a
  shared machine hits all of them alike; medians are reported.
- :func:`gemm_ceiling` is the limit of a step on this machine: every matrix product the step computes (logged from one
  real forward + backward, shapes and strides as they are), each timed alone at its best; the step cannot run faster
  than the sum. Attention is counted as its minimal products (forward ``Q K^T`` and ``P V``, backward four), without
  the recomputation a flash kernel does.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def add_malloc_option(ap: Any) -> None:
    """``--malloc-tuning on|off`` for step benchmarks (argparse parser ``ap``)."""
    ap.add_argument("--malloc-tuning", choices=("on", "off"), default="on",
                    help="on (default): glibc malloc tuned as usfmae's commands run (usfmae_core.device."
                         "tune_cpu_allocator); it is process-wide, so every contender of the run gets it")


def set_malloc(mode: str) -> bool:
    """Apply ``--malloc-tuning``; whether the tuning is in effect."""
    if mode != "on":
        return False
    from usfmae_core.device import tune_cpu_allocator

    return tune_cpu_allocator()


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, the flags that decide bf16 speed, threads, GPU name, versions and the load average."""
    info: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(), "load_average": load_average()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    model = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    info["cpu"] = model.group(1).strip() if model else platform.processor()
    found = set(flags.group(1).split()) if flags else set()
    info["cpu_flags"] = sorted(found & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
    for key in ("CPU family", "Model", "Hypervisor vendor"):
        m = re.search(rf"^{key}:\s*(.+)$", text, re.MULTILINE)
        if m:
            info[key.lower().replace(" ", "_")] = m.group(1).strip()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(steps: dict[str, Callable[[], Any]], warmup: int, timed: int, device: torch.device
              ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Run every contender's ``step()`` in turn, ``warmup + timed`` rounds; return the timed seconds per contender
    and the first line of the error of any contender that failed (it is then left out of later rounds)."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    errors: dict[str, str] = {}
    for i in range(warmup + timed):
        for name, step in steps.items():
            if name in errors:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
            except (RuntimeError, TypeError, ValueError) as err:  # e.g. MONAI's MAE under autocast
                errors[name] = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                continue
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times, errors


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------ GEMM ceiling
class GemmLog(TorchDispatchMode):
    """Logs the matrix products that reach the kernels (below autocast and autograd): ``mm``, ``addmm``, ``bmm``,
    ``baddbmm`` with their operands' shapes, strides and dtype; scaled-dot-product attention (forward and backward,
    any backend) as its minimal products (forward ``Q K^T``, ``P V``; backward ``dO V^T``, ``P^T dO``, ``dS K``,
    ``dS^T Q``); convolutions whose kernel equals their stride (patch embeddings) as the equivalent ``mm``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def _add(self, a: tuple, a_stride: tuple, b: tuple, b_stride: tuple, dtype: torch.dtype, n: int = 1) -> None:
        self.calls[(a, a_stride, b, b_stride, str(dtype).replace("torch.", ""))] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in GEMM_OPS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self._add(tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype)
        elif name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
            backward = name.endswith("backward")
            q = args[1] if backward else args[0]  # backward ops take grad_out first
            bsz, heads, n, d = q.shape
            k_len = args[2 if backward else 1].shape[-2]
            qk = ((bsz * heads, n, d), (n * d, d, 1), (bsz * heads, d, k_len), (d * k_len, 1, d))
            pv = ((bsz * heads, n, k_len), (n * k_len, k_len, 1), (bsz * heads, k_len, d), (k_len * d, d, 1))
            self._add(*qk, q.dtype, 2 if backward else 1)
            self._add(*pv, q.dtype, 2 if backward else 1)
        elif name in ("convolution", "convolution_backward"):
            backward = name == "convolution_backward"
            x, w = (args[1], args[2]) if backward else (args[0], args[1])
            k = tuple(w.shape[2:])
            if tuple(args[4 if backward else 3]) == k and not args[7 if backward else 6]:
                # stride == kernel, not transposed: a patch embedding, i.e. one matrix product per needed result
                rows = x.shape[0] * math.prod(s // p for s, p in zip(x.shape[2:], k, strict=True))
                inner, out = w[0].numel(), w.shape[0]
                n = sum(bool(m) for m in args[-1][:2]) if backward else 1
                if n:
                    self._add((rows, inner), (inner, 1), (inner, out), (1, inner), x.dtype, n)
        return func(*args, **kwargs)


def gemm_flops(key: tuple) -> float:
    a, _, b, _, _ = key
    return 2.0 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]


def time_gemm(key: tuple, device: torch.device, reps: int = 7) -> float:
    """Best seconds of one product of these shapes / strides / dtype, alone, with warm caches."""
    a_shape, a_stride, b_shape, b_stride, dtype = key
    dt = getattr(torch, dtype)
    a, b = (torch.empty_strided(shape, stride, dtype=dt, device=device) if 0 not in stride else  # no broadcasts
            torch.empty(shape, dtype=dt, device=device) for shape, stride in ((a_shape, a_stride), (b_shape, b_stride)))
    a.normal_()
    b.normal_()
    op = torch.bmm if len(a_shape) == 3 else torch.mm
    op(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        op(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_ceiling(step_fwd_bwd: Callable[[], Any], device: torch.device, reps: int = 7) -> dict[str, Any]:
    """The GEMM limit of a step: log its products (one call of ``step_fwd_bwd``, which should run the forward and
    backward passes as the timed step does), time each distinct one alone, and add up.

    Returns:
        ``seconds`` (the step at the measured GEMM speed), ``gflop`` (of those products), ``gflop_s`` (their
        achieved speed), ``products`` (number of calls) and the 8 costliest shapes.
    """
    log = GemmLog()
    with log:
        step_fwd_bwd()
    total_s = total_f = 0.0
    rows = []
    for key, n in log.calls.items():
        t = time_gemm(key, device, reps)
        f = gemm_flops(key)
        total_s += n * t
        total_f += n * f
        rows.append({"a": list(key[0]), "b": list(key[2]), "dtype": key[4], "calls": n,
                     "gflop_s": round(f / t / 1e9, 1), "total_ms": round(1e3 * n * t, 2)})
    rows.sort(key=lambda r: -r["total_ms"])
    return {"seconds": total_s, "gflop": total_f / 1e9, "gflop_s": total_f / total_s / 1e9 if total_s else None,
            "products": sum(log.calls.values()), "top": rows[:8]}


def square_gemm_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Speed of one ``n x n x n`` product (the usual headline figure, for reference)."""
    key = ((n, n), (n, 1), (n, n), (n, 1), str(dtype).replace("torch.", ""))
    return gemm_flops(key) / time_gemm(key, device, reps) / 1e9


# -------------------------------------------------------------------------------------- facebookresearch/mae
def _hide_torchvision() -> None:
    """Let ``import timm`` succeed where torchvision cannot be imported: timm's data and layer packages import it
    at module level, but the ViT blocks do not use it. Every ``torchvision.*`` import gets an empty placeholder whose
    attributes raise when called. Only installed when ``import torchvision`` really fails."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    import types

    try:
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401

            return
    except Exception:  # noqa: BLE001 (a broken install raises anything)
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]

    def placeholder(qualname: str) -> type:
        def fail(*_a: Any, **_k: Any) -> None:
            raise RuntimeError(f"{qualname} is unavailable: torchvision cannot be imported here")

        return _Absent(qualname, (), {"__init__": fail})

    class _Absent(type):
        def __getattr__(cls, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return placeholder(f"{cls.__name__}.{name}")

    class _Module(types.ModuleType):
        __path__: ClassVar[list[str]] = []

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return placeholder(f"{self.__name__}.{name}")

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> types.ModuleType:
            return _Module(spec.name)

        def exec_module(self, module: types.ModuleType) -> None:
            pass

    sys.meta_path.insert(0, _Finder())


def facebook_mae(checkout: str | os.PathLike, arch: str = "mae_vit_base_patch16_dec512d8b", **kwargs: Any
                 ) -> torch.nn.Module:
    """facebook's MAE (``models_mae.py`` of a facebookresearch/mae checkout) built as it is, with the timm installed
    in this Python (a benchmark-only environment: timm is no dependency of usfmae).

    Adaptations around it, none in the model's arithmetic: torchvision placeholders (:func:`_hide_torchvision`);
    ``qk_scale=None`` (timm 0.3.2's keyword, which current timm's ``Block`` no longer takes; None meant the default
    ``head_dim ** -0.5``) is dropped; NumPy's removed ``np.float`` alias is restored while the sin-cos position
    embeddings are built (``util/pos_embed.py``).
    """
    import importlib
    import sys

    import numpy as np

    _hide_torchvision()
    try:
        import timm.models.vision_transformer as vit
    except ImportError as err:
        raise SystemExit(f"facebook's MAE needs timm in this Python ({err}); install it in a benchmark-only venv: "
                         "pip install --no-deps timm (see benchmarks/README.md)") from None

    class Block(vit.Block):
        def __init__(self, *args: Any, qk_scale: float | None = None, **kw: Any) -> None:
            if qk_scale is not None:
                raise ValueError("qk_scale other than None is not supported by current timm")
            super().__init__(*args, **kw)

    root = str(checkout)
    original = vit.Block
    sys.path.insert(0, root)
    vit.Block = Block
    had_float = hasattr(np, "float")
    if not had_float:
        np.float = float  # type: ignore[attr-defined]
    try:
        models_mae = importlib.import_module("models_mae")
        return getattr(models_mae, arch)(**kwargs)
    finally:
        vit.Block = original
        if not had_float:
            del np.float  # type: ignore[attr-defined]
        sys.path.remove(root)


# ---------------------------------------------------------------------------------------------- profile split
GEMM_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_split(step: Callable[[], Any]) -> dict[str, float]:
    """Where one call of ``step`` spends its time (torch.profiler, CPU): matrix products (``mm``/``addmm``/``bmm``,
    convolution, fused attention kernels), the optimiser (``Optimizer.step`` / ``zero_grad`` ranges) and everything
    else (elementwise ops, casts, copies, norms, reductions, Python). Seconds; profiling inflates small ops a little."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
    gemm = opt = 0.0
    for ev in prof.key_averages():
        if ev.key in GEMM_KERNELS:
            gemm += ev.self_cpu_time_total / 1e6
        elif ev.key.startswith("Optimizer.step#") or ev.key.startswith("Optimizer.zero_grad#"):
            opt += ev.cpu_time_total / 1e6
    return {"total_s": round(total, 4), "gemm_s": round(gemm, 4), "optimizer_s": round(opt, 4),
            "other_s": round(max(0.0, total - gemm - opt), 4)}
