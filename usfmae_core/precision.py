"""Mixed precision for every command: ``--precision auto|bf16|fp16|fp32`` -> the autocast dtype (None = fp32).

``auto`` picks what was measured fastest:

- CUDA: bf16 where the GPU supports it, else fp16 (training adds a GradScaler).
- MPS: fp32.
- CPU: bf16 only where it is faster for this model on this machine. A CPU without native bf16 (oneDNN reports no
  AVX512-BF16 / AMX) stays fp32 without measuring: emulated bf16 is slower. Otherwise a short probe runs the model's
  forward (and backward, for training) on a random batch of the run's shape in fp32 and in bf16 autocast, alternately,
  and keeps bf16 if it is at least 5 % faster. The probe runs on a copy of the model inside a forked RNG, so the run
  itself is unchanged by it. Its result is cached in ``$USFMAE_HOME/cache/precision.json`` (default ``~/.usfmae``)
  under the CPU model, thread count, torch version, the model's parameter shapes, the input shape and the mode, so a
  machine pays it once per model and shape.

Why measure: on a 2-core AVX512-BF16 EPYC a ViT-B/16 MAE step runs ~2.5x faster in bf16, but for small models such as
the demo's vit_micro at 64 px the gain shrinks to nothing or turns into a loss (their matrix products are too small to
gain, and autocast adds conversions of every activation); an Intel AMX CPU measured a vit_micro fine-tuning step 1.5x
slower in bf16 (issue 16; benchmarks/README.md, "Precision").

The choice is printed (``precision auto -> bf16 (probe: fp32 0.41 s, bf16 0.16 s per step; cached)``) and written
into each run's configuration by the workflows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from usfmae_core.errors import UsfmaeError

__all__ = ["PRECISIONS", "cache_path", "native_bf16", "precision_name", "probe_speed", "resolve_precision"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MIN_GAIN = 0.05  # bf16 must be at least this much faster (fraction of the fp32 time)
PROBE_STEP_S = 1.5  # a probe step longer than this in fp32 is repeated with a smaller batch
PROBE_BUDGET_S = 6.0  # no more timed pairs after this long (a busy machine makes every step slow)
_MEMO: dict[str, dict[str, Any]] = {}


def precision_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bf16"``, ``torch.float16`` -> ``"fp16"``, None -> ``"fp32"``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cache_path() -> Path:
    """``$USFMAE_HOME/cache/precision.json`` (``~/.usfmae/cache/precision.json`` by default)."""
    return Path(os.environ.get("USFMAE_HOME", Path.home() / ".usfmae")).expanduser() / "cache" / "precision.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _model_signature(model: nn.Module) -> str:
    h = hashlib.sha1(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.requires_grad};".encode())
    return h.hexdigest()[:16]


def _cache_key(model: nn.Module, shape: Sequence[int], train: bool) -> str:
    return "|".join([_cpu_model(), f"native_bf16={native_bf16()}", f"threads={torch.get_num_threads()}",
                     f"torch={torch.__version__.split('+')[0]}", "train" if train else "infer",
                     f"{type(model).__name__}:{_model_signature(model)}", "x".join(map(str, shape))])


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> str | None:
    """Add ``entry`` to the cache file atomically; returns why it could not be written, or None."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _default_loss(out: Any) -> torch.Tensor:
    """A scalar to back-propagate from a model's output: the MAE's loss (first item), else the mean square of the
    (float32) logits."""
    if isinstance(out, (tuple, list)):
        return out[0].float().mean() if out[0].dim() else out[0].float()
    return out.float().square().mean()


def probe_speed(model: nn.Module, shape: Sequence[int], device: torch.device, train: bool = True,
                dtype: torch.dtype = torch.bfloat16, loss_fn: Callable[[Any], torch.Tensor] = _default_loss,
                pairs: int = 3) -> dict[str, Any]:
    """Seconds per step of ``model`` on a random input of ``shape`` in fp32 and in ``dtype`` autocast.

    A step is the forward (and, if ``train``, ``loss_fn(out).backward()``); the optimiser is left out (it updates
    fp32 weights either way). Runs on a deep copy of the model (BatchNorm statistics, gradients and weights of the
    caller's model stay as they are) inside a forked RNG (the run's random streams are unchanged). fp32 and ``dtype``
    alternate (one warm-up each, then up to ``pairs`` timed pairs; one pair suffices when the gap is over 1.6x, and
    none is started after :data:`PROBE_BUDGET_S` seconds of timing).
    When an fp32 step takes longer than :data:`PROBE_STEP_S`, the batch is reduced for the timed pairs.

    Returns:
        ``{"fp32_s", "bf16_s" (or "fp16_s"), "batch", "pairs"}``: medians in seconds per step at ``batch``.
    """
    name = precision_name(dtype)
    probe = copy.deepcopy(model).to(device)
    probe.train(train)
    shape = [int(s) for s in shape]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)

        def step(x: torch.Tensor, amp: torch.dtype | None) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=amp or torch.float32,
                                                               enabled=amp is not None):
                out = probe(x)
            if train:
                loss_fn(out).backward()
                probe.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        x = torch.randn(shape, device=device)
        first = step(x, None)  # warm-up fp32 (also tells how long a step takes)
        if first > PROBE_STEP_S and shape[0] > 1:
            shape[0] = max(1, int(shape[0] * PROBE_STEP_S / first))
            x = torch.randn(shape, device=device)
            step(x, None)
        step(x, dtype)  # warm-up
        times: dict[str, list[float]] = {"fp32": [], name: []}
        start = time.perf_counter()
        for i in range(pairs):
            times["fp32"].append(step(x, None))
            times[name].append(step(x, dtype))
            ratio = times[name][-1] / times["fp32"][-1]
            if (i == 0 and (ratio < 1 / 1.6 or ratio > 1.6)) or time.perf_counter() - start > PROBE_BUDGET_S:
                break
    return {"fp32_s": round(statistics.median(times["fp32"]), 5), f"{name}_s": round(statistics.median(times[name]), 5),
            "batch": shape[0], "pairs": len(times["fp32"])}


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None,
                      input_shape: Sequence[int] | None = None, train: bool = True,
                      log: Callable[[str], None] | None = print) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto|bf16|fp16|fp32``) on ``device``; None means fp32.

    Args:
        precision: explicit ``bf16`` / ``fp16`` / ``fp32`` are returned as they are; ``auto`` is decided as the
            module docstring says.
        device: where the model runs.
        model, input_shape: the model and one batch's shape ``(B, C, *S)``, for the CPU probe. Without them ``auto`` on
            a CPU with native bf16 means bf16 (the rule for models from ViT-Tiny up).
        train: probe training steps (forward + backward) or inference (forward only).
        log: where the decision of ``auto`` is said (None: silent).
    """
    precision = str(precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsfmaeError(f"unknown precision '{precision}'", f"choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    say = log or (lambda _m: None)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        say(f"precision auto -> {precision_name(dtype)} ({torch.cuda.get_device_name(device)})")
        return dtype
    if device.type != "cpu":
        return None
    if not native_bf16():
        say("precision auto -> fp32 (this CPU has no native bf16: emulated bf16 would be slower)")
        return None
    if model is None or input_shape is None:
        return torch.bfloat16
    key = _cache_key(model, input_shape, train)
    entry = _MEMO.get(key) or _read_cache().get(key)
    how = "cached"
    if not isinstance(entry, dict) or "bf16_s" not in entry or "fp32_s" not in entry:
        mode = "training" if train else "inference"
        say(f"precision auto: timing fp32 against bf16 for this model and machine ({mode} step, input "
            f"{'x'.join(map(str, input_shape))}) ...")
        entry = probe_speed(model, input_shape, device, train)
        entry["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        failed = _write_cache(key, entry)
        how = f"measured now; could not cache it in {cache_path()} ({failed})" if failed else \
            f"measured now, cached in {cache_path()}"
    _MEMO[key] = entry
    dtype = torch.bfloat16 if entry["bf16_s"] <= (1.0 - MIN_GAIN) * entry["fp32_s"] else None
    say(f"precision auto -> {precision_name(dtype)} (fp32 {entry['fp32_s']:.3g} s, bf16 {entry['bf16_s']:.3g} s per "
        f"{'training' if train else 'inference'} step of batch {entry['batch']}; {how})")
    return dtype
