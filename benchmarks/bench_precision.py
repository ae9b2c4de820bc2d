"""fp32 against bf16 autocast for the models the toolkit trains and runs, on this machine: the measurements behind
``--precision auto`` (:mod:`usfmae_core.precision`).

Each row is :func:`usfmae_core.precision.probe_speed` (what ``auto`` runs once per model, shape and machine, then
caches), repeated ``--repeats`` times, alternating fp32 and bf16 step by step; medians are reported with the choice
``auto`` makes from them (bf16 only when at least 5 % faster).

    python benchmarks/bench_precision.py --json benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

# (name, what builds it, input shape, training step?)
CASES = [
    ("MAE vit_micro 64 px (demo pretraining)", "mae:vit_micro:64:8:1", (64, 1, 64, 64), True),
    ("classifier vit_micro 64 px (demo fine-tuning)", "clf:vit_micro:64:8:1", (16, 1, 64, 64), True),
    ("ResNet-10 64 px (demo reference arm)", "resnet10:64:1", (16, 1, 64, 64), True),
    ("classifier vit_micro 64 px, inference", "clf:vit_micro:64:8:1", (32, 1, 64, 64), False),
    ("MAE vit_tiny 224 px", "mae:vit_tiny:224:16:3", (16, 3, 224, 224), True),
    ("classifier vit_small 224 px", "clf:vit_small:224:16:3", (16, 3, 224, 224), True),
    ("MAE vit_base 224 px", "mae:vit_base:224:16:3", (8, 3, 224, 224), True),
    ("classifier vit_base 224 px", "clf:vit_base:224:16:3", (8, 3, 224, 224), True),
    ("classifier vit_base 224 px, inference", "clf:vit_base:224:16:3", (32, 3, 224, 224), False),
]


def build(spec: str) -> torch.nn.Module:
    from usfmae_core.networks import build_model, mae_config
    from usfmae_core.networks.classifier import cnn_baseline
    from usfmae_core.workflows.finetune import build_classifier

    torch.manual_seed(0)
    kind, *rest = spec.split(":")
    if kind == "resnet10":
        return cnn_baseline("resnet", 3, int(rest[1]), depth=10)
    preset, img, patch, ch = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
    if kind == "mae":
        return build_model("mae", mae_config(preset, img_size=img, patch_size=patch, in_channels=ch))
    return build_classifier(3, preset=preset, image_size=img, in_channels=ch, patch_size=patch, drop_path=0.1)[0]


def main(argv: list[str] | None = None) -> int:
    from usfmae_core.precision import MIN_GAIN, native_bf16, probe_speed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="probes per case (default 3)")
    ap.add_argument("--only", nargs="+", help="substrings of the case names to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    device = torch.device("cpu")
    info = benchlib.machine(device)
    info["native_bf16"] = native_bf16()
    print(f"{info['cpu']} ({', '.join(info['cpu_flags'])}), native bf16 {info['native_bf16']}, {info['threads']} "
          f"threads, load {info['load_average']}", flush=True)
    rows: list[dict[str, Any]] = []
    for name, spec, shape, train in CASES:
        if args.only and not any(o in name for o in args.only):
            continue
        model = build(spec)
        runs = [probe_speed(model, shape, device, train=train) for _ in range(args.repeats)]
        fp32 = statistics.median(r["fp32_s"] for r in runs)
        bf16 = statistics.median(r["bf16_s"] for r in runs)
        row = {"case": name, "shape": list(shape), "train": train, "batch_probed": runs[0]["batch"],
               "fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4), "bf16_speedup": round(fp32 / bf16, 3),
               "auto": "bf16" if bf16 <= (1 - MIN_GAIN) * fp32 else "fp32", "load": benchlib.load_average()}
        rows.append(row)
        print(f"{name:48s} batch {row['batch_probed']:3d}: fp32 {fp32:7.3f} s  bf16 {bf16:7.3f} s  "
              f"bf16 x{row['bf16_speedup']:.2f} -> auto {row['auto']}   load {row['load']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
