"""Volume classifiers: one label per 3D volume or cine clip.

Two designs, both starting from our MAEs:

- **Native 3D ViT**: :class:`~usfmae_core.networks.classifier.USFMAEClassifier` with ``spatial_dims=3`` sees the
  whole volume, resampled to a cube, as 3D patches. It starts from a ``--native-3d`` MAE, or from a 2D MAE whose
  patch projection is inflated over depth (:meth:`USFMAEClassifier.from_mae` with ``spatial_dims=3``).
- **Attention MIL** (:class:`AttentionMILClassifier`): a 2D ViT encodes every slice / frame (the "instances" of a
  "bag"), gated attention pooling (Ilse, Tomczak and Welling, ICML 2018, "Attention-based deep multiple instance
  learning", eq. 9) weighs them into one volume feature, a linear head classifies it. The attention weights say
  which slices drove the decision, and the model takes any number of slices (a padding ``mask`` lets volumes with
  different slice counts share a batch).

Shapes: a bag is ``(B, N, C, H, W)`` with a boolean ``mask`` ``(B, N)`` (True = a real slice, False = padding);
logits are ``(B, K)``; attention is ``(B, N)``, summing to 1 over each bag's real slices and 0 on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from usfmae_core.networks.mae import USFMAE, ViTEncoder, sincos_pos_embed

__all__ = ["AttentionMILClassifier", "GatedAttentionPooling"]


class GatedAttentionPooling(nn.Module):
    """Gated attention pooling of a bag of instance features (Ilse et al. 2018, eq. 9).

    ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))`` over the real instances of each bag, and the pooled
    feature is ``z = sum_i a_i h_i``. The softmax and the weighted sum run in float32 (also under autocast or with
    bf16 weights), so that a large bag keeps its precision.

    Args:
        in_features: instance feature width ``D``.
        hidden_size: width ``L`` of the attention network (128 in the paper).
        dropout: dropout on the gated hidden units (training only).

    Shapes: features ``(B, N, D)``, mask ``(B, N)`` bool or None -> pooled ``(B, D)``, attention ``(B, N)``.
    """

    def __init__(self, in_features: int, hidden_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_v = nn.Linear(in_features, hidden_size)
        self.attention_u = nn.Linear(in_features, hidden_size)
        self.attention_w = nn.Linear(hidden_size, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = features.to(self.attention_v.weight.dtype)
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(self.dropout(gated)).squeeze(-1).float()  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        if mask is not None:  # a bag without any real instance would give NaN; it gets zero weights instead
            attention = torch.nan_to_num(attention, nan=0.0)
        pooled = torch.bmm(attention.unsqueeze(1), features.float()).squeeze(1)
        return pooled, attention


class AttentionMILClassifier(nn.Module):
    """2D slice encoder (the USF-MAE ViT) + gated attention pooling over slices / frames + linear head.

    Each slice is encoded as :class:`~usfmae_core.networks.classifier.USFMAEClassifier` encodes an image (final norm
    of the mean patch token, or of the cls token), so a 2D MAE's encoder moves in unchanged (:meth:`from_mae`).

    Args:
        num_classes: output classes ``K``.
        pool: per-slice token pooling, ``avg`` (mean of patch tokens) or ``cls``.
        dropout: dropout before the head.
        attention_hidden: width of the attention network.
        attention_dropout: dropout inside the attention network.
        encoder_kwargs: :class:`~usfmae_core.networks.mae.ViTEncoder` arguments of the 2D slice encoder
            (``spatial_dims`` must be 2).

    Shapes: ``x`` ``(B, N, C, H, W)`` (or ``(B, C, H, W)``: bags of one slice) and ``mask`` ``(B, N)`` (optional) ->
    logits ``(B, K)``;
    :meth:`forward_with_attention` also returns the attention ``(B, N)``.

    Example::

        model = AttentionMILClassifier(2, in_channels=1, img_size=64, patch_size=8, hidden_size=96, num_layers=4,
                                       num_heads=3)
        logits, attention = model.forward_with_attention(torch.rand(2, 24, 1, 64, 64))
        logits.shape, attention.shape          # (2, 2), (2, 24)
    """

    def __init__(self, num_classes: int, pool: str = "avg", dropout: float = 0.0, attention_hidden: int = 128,
                 attention_dropout: float = 0.0, **encoder_kwargs) -> None:
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        if int(encoder_kwargs.get("spatial_dims", 2)) != 2:
            raise ValueError("the MIL slice encoder is 2D (spatial_dims=2)")
        self.pool = pool
        self.encoder = ViTEncoder(**encoder_kwargs)
        self.attention = GatedAttentionPooling(self.encoder.hidden_size, attention_hidden, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.hidden_size, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # near-zero head, as in MAE fine-tuning
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.encoder.patch_embed.position_embeddings.copy_(
                sincos_pos_embed(self.encoder.grid, self.encoder.hidden_size))

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """Instance features of 2D slices: ``(M, C, H, W)`` -> ``(M, D)``."""
        return self.encoder.pooled_features(slices, self.pool)

    def aggregate(self, features: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance features ``(B, N, D)`` (+ mask ``(B, N)``) -> logits ``(B, K)``, attention ``(B, N)``."""
        pooled, attention = self.attention(features, mask)
        return self.head(self.dropout(pooled.to(self.head.weight.dtype))), attention

    def forward_with_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags ``(B, N, C, H, W)`` (+ mask ``(B, N)``) -> logits ``(B, K)``, attention ``(B, N)``.

        Only the real slices are encoded (padding costs nothing). Images ``(B, C, H, W)`` are read as B bags of one
        slice each (what MONAI's ``verify_net_in_out`` feeds a network)."""
        if x.dim() == 4:
            x = x.unsqueeze(1)
        b, n = x.shape[0], x.shape[1]
        flat = x.flatten(0, 1)
        if mask is None:
            feats = self.encode(flat)
        else:
            keep = mask.reshape(-1)
            real = self.encode(flat[keep])
            feats = real.new_zeros((b * n, real.shape[-1]))
            feats[keep] = real
        return self.aggregate(feats.reshape(b, n, -1), mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_attention(x, mask)[0]

    def freeze_encoder(self) -> None:
        """Linear probing: train the attention pooling and the head only."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_mae(cls, mae: USFMAE | dict, num_classes: int, pool: str = "avg", dropout: float = 0.0,
                 drop_path_rate: float = 0.0, img_size: Sequence[int] | int | None = None,
                 attention_hidden: int = 128, attention_dropout: float = 0.0) -> AttentionMILClassifier:
        """A MIL classifier whose slice encoder starts from a trained 2D MAE (a model or a checkpoint dict)."""
        from usfmae_core.networks.classifier import encoder_kwargs_of, load_mae_encoder

        enc = load_mae_encoder(mae)
        if enc.spatial_dims != 2:
            raise ValueError("the MIL slice encoder starts from a 2D MAE; this one is 3D")
        model = cls(num_classes, pool=pool, dropout=dropout, attention_hidden=attention_hidden,
                    attention_dropout=attention_dropout,
                    **encoder_kwargs_of(enc, img_size=img_size, drop_path_rate=drop_path_rate))
        from usfmae_core.checkpoints import adapt_state_dict

        model.encoder.load_state_dict(adapt_state_dict(enc.state_dict(), model.encoder.state_dict()))
        return model
