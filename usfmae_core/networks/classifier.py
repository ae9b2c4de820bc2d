"""Classifier on the USF-MAE encoder (fine-tuning and linear probing), plus MONAI CNN baselines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from usfmae_core.networks.mae import USFMAE, ViTEncoder

__all__ = ["USFMAEClassifier", "cnn_baseline"]


class USFMAEClassifier(nn.Module):
    """ViT encoder (unmasked) + pooling + linear head, returning logits (no activation).

    Args:
        num_classes: output classes.
        pool: ``avg`` (mean of patch tokens, as MAE fine-tuning does by default) or ``cls`` (the cls token).
        dropout: dropout before the head.
        encoder_kwargs: :class:`~usfmae_core.networks.mae.ViTEncoder` arguments (in_channels, img_size, patch_size,
            spatial_dims, hidden_size, num_layers, num_heads, mlp_ratio, qkv_bias, drop_path_rate).

    Shapes: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int, pool: str = "avg", dropout: float = 0.0, **encoder_kwargs) -> None:
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        self.pool = pool
        self.encoder = ViTEncoder(**encoder_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.hidden_size, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # near-zero head, as in MAE fine-tuning
        nn.init.zeros_(self.head.bias)
        from usfmae_core.networks.mae import sincos_pos_embed

        with torch.no_grad():
            self.encoder.patch_embed.position_embeddings.copy_(
                sincos_pos_embed(self.encoder.grid, self.encoder.hidden_size))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised encoder features ``(B, D)``: norm(cls token) or norm(mean of patch tokens), as in
        facebook's MAE fine-tuning (``global_pool``), so their fine-tuned weights give identical outputs."""
        tokens, _, _ = self.encoder(x, apply_norm=False)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.encoder.norm(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    def freeze_encoder(self) -> None:
        """Linear probing: train the head only (the encoder's norm and blocks keep their pretrained values)."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_mae(cls, mae: USFMAE | dict, num_classes: int, pool: str = "avg", dropout: float = 0.0,
                 drop_path_rate: float = 0.0, img_size: Sequence[int] | int | None = None) -> USFMAEClassifier:
        """A classifier whose encoder starts from a trained MAE (a model, or a checkpoint path/dict).

        ``img_size`` may differ from the MAE's: position embeddings are re-gridded.
        """
        from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint

        if not isinstance(mae, nn.Module):
            ckpt = load_checkpoint(mae) if not isinstance(mae, dict) else mae
            from usfmae_core.networks.presets import build_model

            mae = build_model("mae", ckpt["config"])
            mae.load_state_dict(ckpt["model"])
        enc = mae.encoder
        model = cls(num_classes, pool=pool, dropout=dropout, in_channels=enc.in_channels,
                    img_size=img_size or enc.img_size, patch_size=enc.patch_size, spatial_dims=enc.spatial_dims,
                    hidden_size=enc.hidden_size, num_layers=len(enc.blocks), num_heads=enc.blocks[0].attn.num_heads,
                    mlp_ratio=enc.blocks[0].mlp.linear1.out_features / enc.hidden_size,
                    qkv_bias=enc.blocks[0].attn.qkv.bias is not None, drop_path_rate=drop_path_rate)
        state = adapt_state_dict(enc.state_dict(), model.encoder.state_dict())
        model.encoder.load_state_dict(state)
        return model


def cnn_baseline(arch: str, num_classes: int, in_channels: int = 3, spatial_dims: int = 2,
                 depth: int | None = None) -> nn.Module:
    """MONAI ResNet (default depth 50) or DenseNet (default 121) from scratch, for comparison arms."""
    from monai.networks import nets

    if arch == "resnet":
        fn = {10: nets.resnet10, 18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth or 50]
        return fn(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes)
    fn = {121: nets.DenseNet121, 169: nets.DenseNet169}[depth or 121]
    return fn(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
