"""MAE train-step throughput: usfmae's USFMAE against facebook's MAE and MONAI's MaskedAutoEncoderViT, side by side,
as a fraction of the machine's GEMM limit.

All contenders are ViT-B/16 with a 512-wide, 8-block decoder (``mae_vit_base_patch16_dec512d8b``, the USF-MAE model),
224 x 224 x 3, 75% masking, MSE on masked patches, AdamW. Each runs its own training step as its project ships it:

- ``ours``: :func:`usfmae_core.workflows.pretrain.mae_train_step` with :func:`~usfmae_core.workflows.pretrain.
  make_optimizer` (what ``usfmae pretrain`` runs);
- ``facebook``: ``models_mae.mae_vit_base_patch16_dec512d8b`` of a facebookresearch/mae checkout (``--facebook-mae``;
  timm from a benchmark-only venv) stepped as its ``engine_pretrain.train_one_epoch`` does: autocast, loss, backward,
  gradient norm (its ``NativeScalerWithGradNormCount``; the fp16 loss scaling is off on CPU), ``torch.optim.AdamW``
  as ``main_pretrain.py`` builds it (no weight decay on biases and norms), ``zero_grad``;
- ``monai``: MONAI's ``MaskedAutoEncoderViT`` of the same dimensions (it returns predictions and mask only, so
  facebook's masked-patch MSE is added), ``torch.optim.AdamW``.

The contenders are alternated step by step within one process (ours, facebook, MONAI, ours, ...), so that changes in
the load of a shared machine hit all of them alike; medians of the timed steps are reported. For every batch size and
precision the script also measures the GEMM ceiling (:func:`benchlib.gemm_ceiling`: every matrix product of one step,
timed alone at its best) and reports each figure as a fraction of it.

    python benchmarks/bench_mae_step.py --json benchmarks/results/mae_step_cpu.json                # ours vs MONAI
    /path/to/bench-venv/bin/python benchmarks/bench_mae_step.py --facebook-mae /path/to/mae \\
        --batch-sizes 8 64 --json benchmarks/results/mae_step_cpu.json                            # + facebook
    python benchmarks/bench_mae_step.py --device cuda --batch-sizes 64 128 256 --dtypes bf16 --json mae_step_cuda.json

(see benchmarks/README.md for the benchmark venv). On CUDA the script adds model FLOPs utilisation against the GPU's
dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

# Dense bf16 tensor-core peak (no sparsity) used for model FLOPs utilisation, by GPU name.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "4090": 165.0}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCH = 16


def monai_mae(in_channels: int, img: int) -> torch.nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(in_channels=in_channels, img_size=img, patch_size=PATCH, hidden_size=768,
                                mlp_dim=3072, num_layers=12, num_heads=12, masking_ratio=0.75,
                                decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8,
                                decoder_num_heads=16, spatial_dims=2, qkv_bias=True)


def monai_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's MAE returns (pred, mask) only: add facebook's masked-patch MSE (patchify as in models_mae)."""
    pred, mask = model(x)
    b, c, h, _ = x.shape
    g = h // PATCH
    target = x.reshape(b, c, g, PATCH, g, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
    loss = ((pred.float() - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """timm's ``optim_factory.add_weight_decay`` as facebook's main_pretrain.py calls it: no decay on 1-D parameters
    and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "ours":
        from usfmae_core.networks import build_model, mae_config

        model = build_model("mae", mae_config("vit_base", img_size=args.img_size, in_channels=args.in_channels))
    elif name == "facebook":
        model = benchlib.facebook_mae(args.facebook_mae, img_size=args.img_size, in_chans=args.in_channels)
    else:
        model = monai_mae(args.in_channels, args.img_size)
    return model.to(device).train()


def make_step(name: str, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None,
              device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step, its forward + backward only) for contender ``name``."""
    lr = 1.5e-4 * x.shape[0] / 256
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731
    if name == "ours":
        from usfmae_core.workflows.pretrain import mae_train_step, make_optimizer

        opt = make_optimizer(model, lr)

        def step() -> None:
            mae_train_step(model, x, None, opt, amp_dtype=dtype)

        def fwd_bwd() -> None:
            with autocast():
                loss = model(x)[0]
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step, fwd_bwd
    opt = torch.optim.AdamW(decay_groups(model), lr=lr, betas=(0.9, 0.95))
    loss_of = (lambda: model(x)[0]) if name == "facebook" else (lambda: monai_loss(model, x))

    def step() -> None:
        with autocast():
            loss = loss_of()
        loss.backward()
        if name == "facebook":  # its loss scaler computes the gradient norm on every step
            grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
            torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)
        opt.step()
        opt.zero_grad()

    def fwd_bwd() -> None:
        with autocast():
            loss = loss_of()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender and configuration (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--facebook-mae", type=Path, metavar="DIR",
                    help="a checkout of facebookresearch/mae (needs timm in this Python): adds facebook's MAE")
    ap.add_argument("--contenders", nargs="+", choices=("ours", "facebook", "monai"),
                    help="default: ours, monai, and facebook with --facebook-mae")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the GEMM ceiling")
    ap.add_argument("--ceiling-reps", type=int, default=7, help="timings of each product, best kept (default 7)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step per contender: time in matrix products, optimiser and the rest")
    ap.add_argument("--json", type=Path, help="write the results here")
    benchlib.add_malloc_option(ap)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    names = args.contenders or ["ours", *(["facebook"] if args.facebook_mae else []), "monai"]
    if "facebook" in names and not args.facebook_mae:
        ap.error("the facebook contender needs --facebook-mae DIR")
    info = benchlib.machine(device)
    info["malloc_tuning"] = benchlib.set_malloc(args.malloc_tuning)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in info.get("gpu", "")), None)
    print(f"{info['cpu']} ({', '.join(info['cpu_flags'])}), {info['threads']} threads, torch {info['torch']}, "
          f"load {info['load_average']}, malloc tuning {'on' if info['malloc_tuning'] else 'off'}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""), flush=True)
    models = {n: build(n, args, device) for n in names}
    flops = {}
    results = []
    for bs in args.batch_sizes:
        x = torch.rand(bs, args.in_channels, args.img_size, args.img_size, device=device,
                       generator=torch.Generator(device).manual_seed(1))
        if device.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode

            for n, m in models.items():  # model FLOPs of one forward + backward (same for all: same arithmetic)
                counter = FlopCounterMode(display=False)
                with counter:
                    make_step(n, m, x, None, device)[1]()
                flops[n] = float(counter.get_total_flops())
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            steps = {n: make_step(n, m, x, dtype, device) for n, m in models.items()}
            row: dict[str, Any] = {"batch_size": bs, "dtype": dname, "load_before": benchlib.load_average()}
            if args.ceiling:
                ceil = benchlib.gemm_ceiling(steps["ours"][1], device, reps=args.ceiling_reps)
                row["ceiling_img_s"] = round(bs / ceil["seconds"], 3)
                row["ceiling"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ceil.items()}
            times, errors = benchlib.alternate({n: s[0] for n, s in steps.items()}, args.warmup, args.steps, device)
            row["load_after"] = benchlib.load_average()
            for n in models:
                med = benchlib.median(times[n])
                row[n] = {"img_s": round(bs / med, 3) if med else None, "step_s": [round(t, 4) for t in times[n]],
                          "error": errors.get(n)}
                if med and args.ceiling:
                    row[n]["fraction_of_ceiling"] = round(bs / med / row["ceiling_img_s"], 3)
                if med and flops.get(n) and peak:
                    row[n]["mfu"] = round(flops[n] / med / (peak * 1e12), 4)
                    row[n]["tflops"] = round(flops[n] / med / 1e12, 1)
            if args.profile:
                for n in models:
                    if not errors.get(n):
                        row[n]["profile"] = benchlib.profile_split(steps[n][0])
                        print(f"  {n} profile: {row[n]['profile']}", flush=True)
            for peer in names[1:]:
                a, b = row["ours"]["img_s"], row[peer]["img_s"]
                row[f"ours_vs_{peer}"] = round(a / b, 3) if a and b else None
            results.append(row)
            cells = []
            for n in names:
                r = row[n]
                cell = f"{n} {r['img_s']:.2f}" if r["img_s"] else f"{n} failed ({(r['error'] or '')[:50]})"
                if r.get("fraction_of_ceiling"):
                    cell += f" ({100 * r['fraction_of_ceiling']:.0f}%)"
                if r.get("mfu"):
                    cell += f" MFU {100 * r['mfu']:.1f}%"
                cells.append(cell)
            ratios = ", ".join(f"ours/{p} {row[f'ours_vs_{p}']}" for p in names[1:] if row.get(f"ours_vs_{p}"))
            ceiling = f"ceiling {row['ceiling_img_s']:.2f} img/s, " if args.ceiling else ""
            print(f"batch {bs:3d} {dname}: {ceiling}img/s " + "   ".join(cells) + f"   {ratios}"
                  f"   load {row['load_before']} -> {row['load_after']}", flush=True)
            if args.json:  # after every row: a long run stopped half-way keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"machine": info, "contenders": names, "steps": args.steps,
                                                 "warmup": args.warmup, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
