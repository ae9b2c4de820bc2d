"""Benchmark: classify one 256 x 256 x 288 volume end to end with each volume model (target: under 30 s on 2 cores).

Models at the sizes a user deploys, with random weights (speed does not depend on the values; nothing is
downloaded), saved as our checkpoints:

- ``3d_vit_base_96``: native 3D ViT-B/16 on a 96^3 cube (216 tokens), grey input (a ``--native-3d`` MAE's shape);
- ``3d_vit_base_128``: the same on a 128^3 cube (512 tokens);
- ``mil_vit_base_224``: attention MIL over every slice with the 2D ViT-B/16 at 224 x 224, RGB input (USF-MAE's shape);
- ``3d_resnet18_96``: MONAI's 3D ResNet-18 on a 96^3 cube;
- ``2d_vit_base_224``: the 2D ViT-B/16 slice classifier with the mean of slices (the path ``bench_predict.py`` times
  in-process), for reference.

Each is timed as a user runs it: ``usfmae predict MODEL volume.nii.gz`` in a fresh process (start-up and imports,
reading the NIfTI, preprocessing, the forward passes, writing the results), ``--rounds`` times round-robin so that
the load of a shared machine hits every model alike; the machine load is recorded before and after each run, and the
process's CPU time (user + system, all threads): on a shared machine wall time is mostly waiting, while CPU time
divided by the threads bounds the wall time the same run takes on an idle machine.

    python benchmarks/bench_predict_volume.py --json benchmarks/results/bench_predict_volume.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# the CLI in a fresh process that says its own peak resident memory on exit
_PEAK = ("import resource, sys; from usfmae_core import cli; rc = cli.main(sys.argv[1:]); print('PEAK_RSS_MB %.1f' % "
         "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), file=sys.stderr); sys.exit(rc)")


def _peak_mb(stderr: str) -> float | None:
    peaks = [float(line.split()[1]) for line in stderr.splitlines() if line.startswith("PEAK_RSS_MB")]
    return peaks[-1] if peaks else None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_models(folder: Path) -> dict[str, Path]:
    """Random-weight checkpoints of the benchmarked models (config as finetune writes it)."""
    from usfmae_core.checkpoints import make_checkpoint, save_checkpoint
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.networks.presets import build_model, encoder_config, mae_config

    torch.manual_seed(0)
    classes = ["lesion", "none"]
    specs = {
        "3d_vit_base_96": ("classifier", 96, 1, 3, {"model": "3d"}),
        "3d_vit_base_128": ("classifier", 128, 1, 3, {"model": "3d"}),
        "mil_vit_base_224": ("mil", 224, 3, 2, {"model": "mil", "axis": 0, "max_slices": 32}),
        "3d_resnet18_96": ("resnet", 96, 1, 3, {"model": "3d"}),
        "2d_vit_base_224": ("classifier", 224, 3, 2, None),
    }
    out = {}
    for name, (arch, size, channels, dims, volume) in specs.items():
        prep = Preprocessing(size, channels, (0.5,) if channels == 1 else (0.485, 0.456, 0.406),
                             (0.25,) if channels == 1 else (0.229, 0.224, 0.225))
        if arch == "resnet":
            config = {"num_classes": 2, "in_channels": channels, "spatial_dims": dims, "depth": 18,
                      "preset": "resnet18"}
        else:
            config = {**encoder_config(mae_config("vit_base", img_size=size, patch_size=16, in_channels=channels,
                                                  spatial_dims=dims)), "num_classes": 2, "pool": "avg",
                      "preset": "vit_base"}
        config.update(classes=classes, preprocessing=prep.to_dict(), **({"volume": volume} if volume else {}))
        out[name] = save_checkpoint(folder / f"{name}.pt", make_checkpoint(build_model(arch, config), arch, config))
    return out


def main(argv: list[str] | None = None) -> int:
    from usfmae_core.data import phantom
    from usfmae_core.device import describe_device, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(288, 256, 256), metavar=("D", "H", "W"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.5, 0.3, 0.3), metavar=("SD", "SH", "SW"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", nargs="+", help="subset of the models (default all)")
    ap.add_argument("--precision", default="auto", help="passed to usfmae predict (default auto)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        volume = phantom.write_volume(tmp / "volume.nii.gz", phantom.make_volume(2, tuple(args.shape), rng=0),
                                      args.spacing)
        print(f"phantom volume {tuple(args.shape)} written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        models = make_models(tmp)
        names = args.models or list(models)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names:
                before, t = _load(), time.perf_counter()
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                proc = subprocess.run([sys.executable, "-c", _PEAK, "predict", str(models[name]),
                                       str(volume), "--out", str(tmp / f"pred_{name}_{r}"), "--device", "cpu",
                                       "--precision", args.precision], capture_output=True, text=True, cwd=REPO)
                secs = time.perf_counter() - t
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                if proc.returncode:
                    raise SystemExit(f"{name}: usfmae predict failed:\n{proc.stderr[-2000:]}")
                report = json.loads((tmp / f"pred_{name}_{r}" / "predictions.json").read_text())
                run = {"round": r, "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1),
                       "cpu_seconds_per_thread": round(cpu / torch.get_num_threads(), 1),
                       "peak_rss_mb": _peak_mb(proc.stderr), "load_before": before, "load_after": _load(),
                       "weights": report.get("weights_dtype"), "autocast": report.get("autocast"),
                       "n_frames": report["results"][0]["n_frames"], "slices": report["results"][0].get("n_slices")}
                runs[name].append(run)
                print(json.dumps({"model": name, **run}), flush=True)
    result = {"benchmark": "usfmae predict of one volume, end to end in a fresh process",
              "volume_shape": list(args.shape), "spacing": list(args.spacing), "precision": args.precision,
              "device": describe_device(resolve_device("cpu")), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "runs": runs,
              "best_seconds": {n: min(r["seconds"] for r in rs) for n, rs in runs.items()},
              "best_cpu_seconds_per_thread": {n: min(r["cpu_seconds_per_thread"] for r in rs)
                                              for n, rs in runs.items()},
              "command": "python benchmarks/bench_predict_volume.py " + " ".join(argv or sys.argv[1:])}
    for n, s in result["best_seconds"].items():
        cpu = result["best_cpu_seconds_per_thread"][n]
        print(f"{n}: {s:.1f} s wall, {cpu:.1f} CPU s per thread (best of {args.rounds})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
