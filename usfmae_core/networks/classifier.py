"""Classifier on the USF-MAE encoder (fine-tuning and linear probing; 2D images or native 3D volumes), plus MONAI
CNN baselines. Slice-based volume classification (attention MIL) is in :mod:`usfmae_core.networks.volume`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from usfmae_core.networks.mae import USFMAE, ViTEncoder

__all__ = ["USFMAEClassifier", "cnn_baseline", "encoder_kwargs_of", "load_mae_encoder"]


def load_mae_encoder(mae: USFMAE | dict | str) -> ViTEncoder:
    """The encoder of an MAE given as a model, a loaded checkpoint dict or a checkpoint path."""
    if isinstance(mae, nn.Module):
        return mae.encoder
    from usfmae_core.checkpoints import adapt_state_dict, load_checkpoint
    from usfmae_core.networks.presets import build_model

    ckpt = mae if isinstance(mae, dict) else load_checkpoint(mae)
    model = build_model("mae", ckpt["config"])
    # missing / unexpected weights: one line naming them (UsfmaeError), as for every other checkpoint load
    source = str(mae) if not isinstance(mae, dict) else str(ckpt.get("path") or "the MAE checkpoint (--init)")
    model.load_state_dict(adapt_state_dict(ckpt["model"], model.state_dict(), source=source))
    return model.encoder


def encoder_kwargs_of(enc: ViTEncoder, img_size: Sequence[int] | int | None = None,
                      spatial_dims: int | None = None, patch_size: Sequence[int] | int | None = None,
                      drop_path_rate: float = 0.0) -> dict:
    """:class:`~usfmae_core.networks.mae.ViTEncoder` arguments of ``enc``'s shape, with optional new input size,
    dimensionality (2D -> 3D inflation) and patch size."""
    dims = int(spatial_dims or enc.spatial_dims)
    same = dims == enc.spatial_dims
    return {"in_channels": enc.in_channels,
            "img_size": img_size or (enc.img_size if same else enc.img_size[-1]),
            "patch_size": patch_size or (enc.patch_size if same else enc.patch_size[-1]), "spatial_dims": dims,
            "hidden_size": enc.hidden_size, "num_layers": len(enc.blocks), "num_heads": enc.blocks[0].attn.num_heads,
            "mlp_ratio": enc.blocks[0].mlp.linear1.out_features / enc.hidden_size,
            "qkv_bias": enc.blocks[0].attn.qkv.bias is not None, "drop_path_rate": drop_path_rate}


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
        """Pooled, normalised encoder features ``(B, D)`` (:meth:`ViTEncoder.pooled_features`)."""
        return self.encoder.pooled_features(x, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    def freeze_encoder(self) -> None:
        """Linear probing: train the head only (the encoder's norm and blocks keep their pretrained values)."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_mae(cls, mae: USFMAE | dict | str, num_classes: int, pool: str = "avg", dropout: float = 0.0,
                 drop_path_rate: float = 0.0, img_size: Sequence[int] | int | None = None,
                 spatial_dims: int | None = None, patch_size: Sequence[int] | int | None = None
                 ) -> USFMAEClassifier:
        """A classifier whose encoder starts from a trained MAE (a model, or a checkpoint path/dict).

        ``img_size`` may differ from the MAE's: position embeddings are re-gridded. ``spatial_dims=3`` on a 2D MAE
        builds a native 3D classifier whose patch projection is the 2D one inflated over depth (the transformer
        blocks move unchanged; position embeddings are the fixed 3D sin-cos ones); ``patch_size`` then sets the 3D
        patch (default: the 2D patch side, cubed).
        """
        from usfmae_core.checkpoints import adapt_state_dict

        enc = load_mae_encoder(mae)
        model = cls(num_classes, pool=pool, dropout=dropout,
                    **encoder_kwargs_of(enc, img_size, spatial_dims, patch_size, drop_path_rate))
        src, target = enc.state_dict(), model.encoder.state_dict()
        if model.encoder.spatial_dims != enc.spatial_dims:  # 2D positions mean nothing in 3D: keep the 3D sin-cos
            src["patch_embed.position_embeddings"] = target["patch_embed.position_embeddings"]
        model.encoder.load_state_dict(adapt_state_dict(src, target))
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
