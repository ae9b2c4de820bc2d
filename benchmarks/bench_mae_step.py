"""MAE train-step throughput: usfmae's USFMAE against MONAI's MaskedAutoEncoderViT of the same dimensions.

Both models are ViT-B/16 with a 512-wide, 8-block decoder (USF-MAE's ``mae_vit_base_patch16_dec512d8b``), 75% masking,
MSE on masked patches, AdamW. The two are alternated within one run (A, B, A, B, ...) so machine noise hits both.

    python benchmarks/bench_mae_step.py --json benchmarks/results/mae_step_cpu.json
    python benchmarks/bench_mae_step.py --device cuda --batch-size 64 --json mae_step_cuda.json

Prints a table and writes JSON with, per configuration: ``ours_img_s``, ``monai_img_s``, ``ratio``, ``dtype``,
``device`` (plus step times and, on CUDA, model FLOPs utilisation).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from usfmae_core.networks import build_model, mae_config

# Dense bf16 tensor-core peak (no sparsity) used for model FLOPs utilisation, by GPU name.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


def monai_mae(in_channels: int, img: int, patch: int) -> torch.nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(in_channels=in_channels, img_size=img, patch_size=patch, hidden_size=768,
                                mlp_dim=3072, num_layers=12, num_heads=12, masking_ratio=0.75,
                                decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8,
                                decoder_num_heads=16, spatial_dims=2, qkv_bias=True)


def monai_loss(model: torch.nn.Module, x: torch.Tensor, patch: int) -> torch.Tensor:
    """MONAI's MAE returns (pred, mask) only: add facebook's masked-patch MSE (patchify as in models_mae)."""
    pred, mask = model(x)
    b, c, h, _ = x.shape
    g = h // patch
    target = x.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
    loss = ((pred.float() - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


def make_step(name: str, model: torch.nn.Module, patch: int, dtype: torch.dtype | None, device: torch.device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x)[0] if name == "ours" else monai_loss(model, x, patch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_flops(model: torch.nn.Module, name: str, x: torch.Tensor, patch: int) -> float:
    """FLOPs of one training step (forward + backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(x)[0] if name == "ours" else monai_loss(model, x, patch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model and configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    patch = 16
    models = {"ours": build_model("mae", mae_config("vit_base", img_size=args.img_size,
                                                    in_channels=args.in_channels)).to(device),
              "monai": monai_mae(args.in_channels, args.img_size, patch).to(device)}
    x = torch.rand(args.batch_size, args.in_channels, args.img_size, args.img_size, device=device)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    flops = {n: count_flops(m, n, x, patch) for n, m in models.items()} if device.type == "cuda" else {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)

    results = []
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        steps = {n: make_step(n, m, patch, dtype, device) for n, m in models.items()}
        times: dict[str, list[float]] = {n: [] for n in models}
        errors: dict[str, str] = {}
        for i in range(args.warmup + args.steps):
            for n in models:  # alternate ours / MONAI so that load changes affect both alike
                if n in errors:
                    continue
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    steps[n](x)
                    sync(device)
                    if i >= args.warmup:
                        times[n].append(time.perf_counter() - t0)
                except RuntimeError as err:  # MONAI's MAE fails under autocast (index_put dtype mismatch)
                    errors[n] = str(err).splitlines()[0][:160]
        row = {"dtype": dname, "device": str(device), "gpu": gpu, "batch_size": args.batch_size,
               "img_size": args.img_size, "in_channels": args.in_channels, "threads": torch.get_num_threads()}
        for n in models:
            if n in errors:
                row[f"{n}_img_s"], row[f"{n}_error"] = None, errors[n]
                continue
            med = statistics.median(times[n])
            row[f"{n}_img_s"] = round(args.batch_size / med, 3)
            row[f"{n}_step_s"] = [round(t, 4) for t in times[n]]
            if flops.get(n) and peak:
                row[f"{n}_mfu"] = round(flops[n] / med / (peak * 1e12), 4)
                row[f"{n}_tflops"] = round(flops[n] / med / 1e12, 1)
        row["ratio"] = (round(row["ours_img_s"] / row["monai_img_s"], 3)
                        if row.get("ours_img_s") and row.get("monai_img_s") else None)
        results.append(row)
        print(f"{dname:5s} ours {row['ours_img_s'] or 'failed':>8} img/s   monai "
              f"{row['monai_img_s'] or 'failed (' + row.get('monai_error', '')[:60] + ')'} img/s   "
              f"ratio {row['ratio']}" + (f"   MFU ours {row.get('ours_mfu')}" if "ours_mfu" in row else ""))

    best_monai = max((r["monai_img_s"] for r in results if r.get("monai_img_s")), default=None)
    best_ours = max((r["ours_img_s"] for r in results if r.get("ours_img_s")), default=None)
    summary = {"best_ours_img_s": best_ours, "best_monai_img_s": best_monai,
               "ratio_best_vs_best": round(best_ours / best_monai, 3) if best_ours and best_monai else None,
               "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    print(f"best ours {best_ours} img/s vs best MONAI {best_monai} img/s -> {summary['ratio_best_vs_best']}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
