"""Optimiser pieces of the MAE recipe: AdamW with PyTorch's fused kernel, parameter groups (no decay on norms,
biases, tokens and position embeddings; optional layer-wise lr decay) and a cosine schedule with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed", "pos_embed")


def _fused_supported(params: list) -> bool:
    """Whether PyTorch has a fused AdamW kernel for every parameter (floating point, on a supported device)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: the devices with a fused AdamW kernel since torch 2.4
        devices = {"cpu", "cuda", "mps", "xpu"}
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(torch.is_floating_point(p) and p.device.type in devices for p in tensors)


def adamw(params: Iterable[torch.Tensor] | Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fused kernel (one multi-tensor kernel per step) where PyTorch has one.

    The fused kernel exists for CPU, CUDA, MPS and XPU parameters (PyTorch >= 2.4). PyTorch's default on CPU is the
    per-parameter loop, which on a ViT-B costs ~5 elementwise passes over every parameter and its two moments per
    step (a fifth of an MAE step in bf16 on 2 CPU cores, benchmarks/README.md); the fused kernel makes one pass.
    The update is the same arithmetic (Testing/test_speed.py compares both to floating-point noise). Parameters moved
    between CPU and GPU after this call keep a fused kernel.

    Args:
        params: parameters or parameter groups (e.g. :func:`param_groups`).
        lr, betas, weight_decay: as ``torch.optim.AdamW``.
        fused: None chooses fused where supported (else ``foreach``); True forces it; False gives PyTorch's default.
    """
    params = list(params)
    if fused is None:
        fused = _fused_supported(params) or None
    foreach = None if fused or fused is False else True
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused, foreach=foreach)


def _layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, everything after -> L + 1."""
    name = name.removeprefix("encoder.")
    if name.startswith(("cls_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float | None = None,
                 base_lr: float = 1.0) -> list[dict]:
    """AdamW parameter groups; each group carries ``lr_scale`` (used by :func:`cosine_lr`).

    Args:
        model: any module; frozen parameters are skipped.
        weight_decay: applied to weight matrices only.
        layer_decay: MAE fine-tuning's layer-wise decay (e.g. 0.75): block i gets ``layer_decay ** (L + 1 - i)``.
        base_lr: initial ``lr`` of every group before scaling.
    """
    num_layers = len(getattr(getattr(model, "encoder", model), "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES)
        layer = _layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
        g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                  "lr_scale": scale, "lr": base_lr * scale})
        g["params"].append(p)
    return list(groups.values())


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr``, then half-cosine decay to ``min_lr`` (per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def scaled_lr(blr: float, batch_size: int) -> float:
    """MAE's linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * batch_size / 256
