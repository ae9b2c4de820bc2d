"""Fine-tuning step throughput: usfmae's ViT-B/16 classifier against MONAI's ``ViT`` classifier of the same size,
side by side, as a fraction of the machine's GEMM limit.

Both are ViT-B/16 (768 wide, 12 blocks, 12 heads, MLP 3072, qkv bias) at 224 x 224 x 3 with a 3-class head:

- ``ours``: :class:`~usfmae_core.networks.classifier.USFMAEClassifier` stepped by
  :func:`usfmae_core.workflows.finetune.classifier_train_step` with
  :func:`~usfmae_core.workflows.finetune.make_optimizer` (layer-wise lr decay 0.75, as when fine-tuning an MAE) and
  label-smoothed cross-entropy: what ``usfmae finetune`` runs;
- ``monai``: ``monai.networks.nets.ViT(classification=True, post_activation=None)`` (without ``post_activation=None``
  MONAI puts a Tanh on the logits; ``forward`` returns ``(logits, hidden states)``), ``torch.optim.AdamW`` with
  PyTorch's defaults, the same loss, autocast and zero_grad / backward / step.

The two are alternated step by step within one process; medians of the timed steps are reported, with the GEMM ceiling
(:func:`benchlib.gemm_ceiling`) of our step.

    python benchmarks/bench_finetune_step.py --batch-sizes 32 --json benchmarks/results/finetune_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 3


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "ours":
        from usfmae_core.workflows.finetune import build_classifier

        model, _ = build_classifier(CLASSES, preset="vit_base", image_size=args.img_size, in_channels=args.in_channels,
                                    drop_path=0.1)
    else:
        from monai.networks.nets import ViT

        model = ViT(in_channels=args.in_channels, img_size=args.img_size, patch_size=16, hidden_size=768,
                    mlp_dim=3072, num_layers=12, num_heads=12, classification=True, num_classes=CLASSES,
                    post_activation=None, qkv_bias=True, spatial_dims=2)
    return model.to(device).train()


def make_step(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step, its forward + backward only)."""
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    lr = 1e-3 * x.shape[0] / 256
    if name == "ours":
        from usfmae_core.workflows.finetune import classifier_train_step, make_optimizer

        opt = make_optimizer(model, lr, 0.05, 0.75)
        forward = model

        batch = {"image": x, "label": y}

        def step() -> None:
            classifier_train_step(model, batch, criterion, opt, device=x.device, amp_dtype=dtype)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

        def forward(t: torch.Tensor) -> torch.Tensor:
            return model(t)[0]  # MONAI's ViT returns (logits, hidden states of every block)

        def step() -> None:
            with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = forward(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def fwd_bwd() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender and configuration (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the GEMM ceiling")
    ap.add_argument("--ceiling-reps", type=int, default=7, help="timings of each product, best kept (default 7)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step per contender: time in matrix products, optimiser and the rest")
    ap.add_argument("--json", type=Path, help="write the results here")
    benchlib.add_malloc_option(ap)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    info = benchlib.machine(device)
    info["malloc_tuning"] = benchlib.set_malloc(args.malloc_tuning)
    print(f"{info['cpu']} ({', '.join(info['cpu_flags'])}), {info['threads']} threads, torch {info['torch']}, "
          f"load {info['load_average']}, malloc tuning {'on' if info['malloc_tuning'] else 'off'}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""), flush=True)
    names = ["ours", "monai"]
    models = {n: build(n, args, device) for n in names}
    results = []
    for bs in args.batch_sizes:
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(bs, args.in_channels, args.img_size, args.img_size, device=device, generator=g)
        y = torch.randint(0, CLASSES, (bs,), device=device, generator=g)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            steps = {n: make_step(n, m, x, y, dtype) for n, m in models.items()}
            row: dict[str, Any] = {"batch_size": bs, "dtype": dname, "load_before": benchlib.load_average()}
            if args.ceiling:
                ceil = benchlib.gemm_ceiling(steps["ours"][1], device, reps=args.ceiling_reps)
                row["ceiling_img_s"] = round(bs / ceil["seconds"], 3)
                row["ceiling"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ceil.items()}
            times, errors = benchlib.alternate({n: s[0] for n, s in steps.items()}, args.warmup, args.steps, device)
            row["load_after"] = benchlib.load_average()
            for n in names:
                med = benchlib.median(times[n])
                row[n] = {"img_s": round(bs / med, 3) if med else None, "step_s": [round(t, 4) for t in times[n]],
                          "error": errors.get(n)}
                if med and args.ceiling:
                    row[n]["fraction_of_ceiling"] = round(bs / med / row["ceiling_img_s"], 3)
            if args.profile:
                for n in names:
                    if not errors.get(n):
                        row[n]["profile"] = benchlib.profile_split(steps[n][0])
                        print(f"  {n} profile: {row[n]['profile']}", flush=True)
            a, b = row["ours"]["img_s"], row["monai"]["img_s"]
            row["ours_vs_monai"] = round(a / b, 3) if a and b else None
            results.append(row)
            cells = "   ".join(f"{n} {row[n]['img_s']:.2f}" + (f" ({100 * row[n]['fraction_of_ceiling']:.0f}%)"
                                                              if row[n].get("fraction_of_ceiling") else "")
                               if row[n]["img_s"] else f"{n} failed ({row[n]['error']})" for n in names)
            ceiling = f"ceiling {row['ceiling_img_s']:.2f} img/s, " if args.ceiling else ""
            print(f"batch {bs:3d} {dname}: {ceiling}img/s {cells}   ours/monai {row['ours_vs_monai']}   "
                  f"load {row['load_before']} -> {row['load_after']}", flush=True)
            if args.json:  # after every row: a long run stopped half-way keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"machine": info, "contenders": names, "steps": args.steps,
                                                 "warmup": args.warmup, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
