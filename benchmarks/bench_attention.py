"""Attention on CPU: PyTorch's ``scaled_dot_product_attention`` (flash kernel) against the explicit
``softmax(q k^T) v`` that ``usfmae_core.networks.mae.Block.attention`` uses in bf16 on CPU, at the shapes of the
toolkit's ViT-B models, forward and forward + backward, fp32 and bf16.

Shapes ``(batch, heads, tokens, head_dim)``: the MAE encoder sees 50 tokens (25 % of 196 + cls) with 12 heads of 64;
the 512-wide MAE decoder 197 tokens with 16 heads of 32; the classifier 197 tokens with 12 heads of 64; a 96^3 and a
128^3 native 3D ViT 217 and 513 tokens. Both ways are timed alternately in one process; medians.

    python benchmarks/bench_attention.py --json benchmarks/results/attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

SHAPES = {
    "mae encoder b8": (8, 12, 50, 64), "mae encoder b64": (64, 12, 50, 64),
    "mae decoder b8": (8, 16, 197, 32), "mae decoder b64": (64, 16, 197, 32),
    "classifier b8": (8, 12, 197, 64), "classifier b32": (32, 12, 197, 64),
    "3d vit 96^3 b8": (8, 12, 217, 64), "3d vit 128^3 b8": (8, 12, 513, 64),
}


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def compare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mode: str, reps: int
            ) -> tuple[float, float]:
    """Median seconds of (flash, explicit) for ``mode`` ``forward`` or ``forward+backward``, alternated call by call
    after two warm-up calls of each."""

    def run(f: Callable) -> float:
        t0 = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                f(q, k, v, scale)
        else:
            f(q, k, v, scale).sum().backward()
        return time.perf_counter() - t0

    for f in (flash, explicit, flash, explicit):
        run(f)
    times = [(run(flash), run(explicit)) for _ in range(reps)]
    return benchlib.median([t[0] for t in times]), benchlib.median([t[1] for t in times])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed calls per way, alternated (default 7)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    info = benchlib.machine(torch.device("cpu"))
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, load {info['load_average']}")
    rows = []
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
            scale = shape[-1] ** -0.5
            row = {"shape": name, "bhnd": shape, "dtype": str(dtype).replace("torch.", "")}
            for mode in ("forward", "forward+backward"):
                fl, ex = compare(q, k, v, scale, mode, args.reps)
                row[mode] = {"flash_ms": round(1e3 * fl, 2), "explicit_ms": round(1e3 * ex, 2),
                             "flash_over_explicit": round(fl / ex, 2)}
            fw, fb = row["forward"], row["forward+backward"]
            print(f"{name:16s} {row['dtype']:8s} forward flash {fw['flash_ms']:7.2f} ms explicit "
                  f"{fw['explicit_ms']:7.2f} ms (x{fw['flash_over_explicit']:.2f}) | fwd+bwd flash "
                  f"{fb['flash_ms']:7.2f} explicit {fb['explicit_ms']:7.2f} (x{fb['flash_over_explicit']:.2f})",
                  flush=True)
            rows.append(row)
    info["load_after"] = benchlib.load_average()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
