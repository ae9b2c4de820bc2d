"""Benchmark: classify a 3D volume (256 x 256 x 288 voxels, 288 slices) slice by slice with a ViT-B/16 classifier.

The classifier has random weights (nothing is downloaded: speed does not depend on the values) and the volume is
a phantom. Times :func:`usfmae_core.workflows.predict.classify_array` end to end (intensity scaling, resizing,
batching, forward passes, softmax) after one warm-up batch, for each requested precision: ``fp32``, ``bf16``
(autocast on the fp32 model, what ``classify_array`` does with a caller's model) and ``bf16-weights`` (the model
cast by ``to_inference_model``, what ``usfmae predict`` does on CPUs with native bf16).

    python benchmarks/bench_predict.py                          # auto precision, CPU
    python benchmarks/bench_predict.py --precision all --json predict.json

Target (issue 4): under 30 s on CPU. The machine load (``os.getloadavg``) is recorded before and after, and the
process's CPU time per thread alongside the wall time, since other users of a shared machine inflate the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    from usfmae_core.data import phantom
    from usfmae_core.data.transforms import Preprocessing
    from usfmae_core.device import describe_device, resolve_device
    from usfmae_core.networks.presets import build_model, mae_config
    from usfmae_core.workflows.predict import classify_array, classify_frames, inference_dtype, to_inference_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit_base")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shape", type=int, nargs=3, default=(288, 256, 256), metavar=("D", "H", "W"),
                    help="volume shape in array order (default 288 256 256: 256 x 256 in plane, 288 slices)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "bf16-weights", "fp16", "all"),
                    help="bf16: autocast on the fp32 model (what classify_array does with a caller's model); "
                    "bf16-weights: the model cast by to_inference_model (what usfmae predict does); "
                    "auto: what usfmae predict does with --precision auto; all: fp32, bf16 and bf16-weights")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    dev = resolve_device(args.device)
    cfg = mae_config(args.preset, img_size=args.image_size, patch_size=16)
    cfg.update(num_classes=3, pool="avg", dropout=0.0, classes=["normal", "cyst", "mass"],
               preprocessing=Preprocessing(args.image_size, 3).to_dict())
    torch.manual_seed(0)
    model = build_model("classifier", cfg).to(dev).eval()
    t0 = time.perf_counter()
    volume = phantom.make_volume(1, tuple(args.shape), rng=0).astype(np.float32)
    print(f"phantom volume {volume.shape} made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    prep = Preprocessing(args.image_size, 3)

    precisions = ["fp32", "bf16", "bf16-weights"] if args.precision == "all" else [args.precision]
    runs = []
    for name in precisions:
        precision = "bf16" if name == "bf16-weights" else name
        # bf16-weights and auto: the model as usfmae predict prepares it (bf16 weights where that is faster)
        net = to_inference_model(model, dev, precision) if name in ("bf16-weights", "auto") else model
        classify_frames(net, volume[:2], prep, dev, 2, precision)  # warm-up: oneDNN / cuDNN kernel selection
        if dev.type == "cuda":
            torch.cuda.synchronize()
        load_before = _load()
        t, cpu = time.perf_counter(), time.process_time()
        res = classify_array(net, cfg, volume, "volume", axis=0, device=dev, batch_size=args.batch_size,
                             precision=precision)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
        wdtype = next(net.parameters()).dtype
        dtype = wdtype if wdtype != torch.float32 else (inference_dtype(dev, precision) or torch.float32)
        run = {"precision": name, "dtype": str(dtype).replace("torch.", ""),
               "weights": str(wdtype).replace("torch.", ""),
               "seconds": round(secs, 2), "slices": res["n_frames"], "slices_per_s": round(res["n_frames"] / secs, 1),
               # CPU time of this process over its threads: what the wall time would be without other users
               # (an upper bound: OpenMP threads also spin while they wait)
               "cpu_seconds": round(cpu, 2), "cpu_seconds_per_thread": round(cpu / torch.get_num_threads(), 2),
               "load_before": load_before, "load_after": _load()}
        runs.append(run)
        print(json.dumps(run), flush=True)
        del net
    report = {
        "benchmark": "classify_array on a volume, 2D ViT classifier per slice",
        "preset": args.preset, "image_size": args.image_size, "volume_shape": list(args.shape),
        "batch_size": args.batch_size, "device": describe_device(dev), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "auto_dtype": str(inference_dtype(dev, "auto") or torch.float32).replace("torch.", ""),
        "torch": torch.__version__, "runs": runs,
        "command": "python benchmarks/bench_predict.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    best = min(runs, key=lambda r: r["seconds"])
    report.update(seconds=best["seconds"], slices_per_s=best["slices_per_s"], dtype=best["dtype"],
                  best_precision=best["precision"])
    print(f"{args.preset}@{args.image_size}: {best['slices']} slices in {best['seconds']:.1f} s "
          f"({best['slices_per_s']} slices/s, {best['dtype']}, {report['device']['device']}, "
          f"{report['threads']} threads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
