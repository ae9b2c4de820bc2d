"""USF-MAE masked autoencoder for 2D and 3D ultrasound.

Follows facebookresearch/mae ``models_mae.py`` (He et al., 2022) as used by USF-MAE (Megahed et al., 2025):
a ViT encoder that sees only the visible 25% of patches, a light decoder (512 wide, 8 blocks) that
reconstructs the masked patches, fixed sin-cos position embeddings and an MSE loss on masked patches only.

What differs from facebook's file, and why:
- The transformer blocks are MONAI's :class:`~monai.networks.blocks.TransformerBlock` (flash attention through
  ``scaled_dot_product_attention``), with drop-path added and LayerNorm eps 1e-6 as in the MAE recipe.
- The patch embedding is MONAI's :class:`~monai.networks.blocks.PatchEmbeddingBlock`, so ``spatial_dims=3``
  embeds volumetric patches and the same class pretrains volumes natively.
- Masking, gathering and the loss use only ops that keep their dtype under ``torch.autocast`` (MONAI's
  ``MaskedAutoEncoderViT`` fails there on an ``index_put`` dtype mismatch) and run entirely on the model's device.

Shapes (2D; 3D adds a depth axis ``D`` before ``H``):
    images ``(B, C, H, W)`` -> patches ``(B, L, p*p*C)`` with ``L = (H/p)*(W/p)`` tokens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import DropPath
from monai.utils import ensure_tuple_rep
from torch import nn

from usfmae_core.networks.presets import check_model_config

__all__ = [
    "USFMAE",
    "Block",
    "MAEDecoder",
    "ViTEncoder",
    "interpolate_pos_embed",
    "patchify",
    "random_masking",
    "sincos_pos_embed",
    "unpatchify",
]


def sincos_pos_embed(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed sin-cos position embedding ``(1, prod(grid), dim)`` for a 2D or 3D patch grid.

    Uses MONAI's builder (same layout as facebook's ``get_2d_sincos_pos_embed``: ``[sin w, cos w, sin h, cos h]``);
    when ``dim`` is not a multiple of 2 * len(grid) (e.g. 1024 in 3D) the remaining channels are zero.
    """
    grid = [int(g) for g in grid]
    step = 2 * len(grid)
    usable = dim - dim % step
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI calls meshgrid without indexing=
        emb = build_sincos_position_embedding(grid if len(grid) > 1 else grid[0], usable, len(grid)).data
    if usable < dim:
        emb = F.pad(emb, (0, dim - usable))
    return emb.float()


def interpolate_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a position embedding ``(1, prod(old_grid), D)`` to ``(1, prod(new_grid), D)``.

    Bicubic in 2D, trilinear in 3D, as facebook's ``interpolate_pos_embed`` does for a new image size.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dims = len(old_grid)
    x = pos.reshape(1, *old_grid, -1).movedim(-1, 1).float()
    x = F.interpolate(x, size=tuple(new_grid), mode="bicubic" if dims == 2 else "trilinear", align_corners=False)
    return x.movedim(1, -1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)


def patchify(imgs: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, L, prod(p) * C)``, patches in the patch embedding's token order, channels last."""
    b, c, *spatial = imgs.shape
    dims = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    shape = [b, c]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = imgs.reshape(shape)
    # (B, C, g1, p1, g2, p2[, g3, p3]) -> (B, g1, g2[, g3], p1, p2[, p3], C)
    perm = [0] + [2 + 2 * i for i in range(dims)] + [3 + 2 * i for i in range(dims)] + [1]
    return x.permute(perm).reshape(b, -1, math.prod(patch_size) * c)


def unpatchify(x: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, prod(p) * C)`` -> ``(B, C, *S)``."""
    b = x.shape[0]
    dims = len(grid)
    x = x.reshape(b, *grid, *patch_size, channels)
    # (B, g1, g2, p1, p2, C) -> (B, C, g1, p1, g2, p2)
    perm = [0, 1 + 2 * dims]
    for i in range(dims):
        perm += [1 + i, 1 + dims + i]
    return x.permute(perm).reshape(b, channels, *[g * p for g, p in zip(grid, patch_size)])


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise, on ``x``'s device.

    Args:
        x: tokens ``(B, L, D)``.
        mask_ratio: fraction of tokens to drop.
        noise: optional ``(B, L)`` noise, to reproduce a given mask.

    Returns:
        visible tokens ``(B, L_keep, D)``, mask ``(B, L)`` (1 = masked, in x's dtype), restore indices ``(B, L)``.
    """
    b, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


# Longest sequence attended explicitly in bf16 on CPU (Block.attention): its N x N weights of a batch of 8 with 12 heads
# take 200 MB at 1,024 tokens; beyond, the memory-lean flash kernel.
EXPLICIT_ATTENTION_MAX_TOKENS = 1024


class Block(TransformerBlock):
    """MONAI transformer block (pre-norm, flash attention) with stochastic depth and the MAE LayerNorm eps.

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: bias on the query/key/value projection (True in ViT/MAE).
        drop_path: stochastic-depth probability of this block.
        dropout_rate: dropout in the MLP and attention output.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, dropout_rate: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, int(hidden_size * mlp_ratio), num_heads, dropout_rate=dropout_rate,
                         qkv_bias=qkv_bias, use_flash_attention=True)
        self.norm1.eps = eps
        self.norm2.eps = eps
        # MONAI always builds this norm; without cross-attention it is unused, and a trainable unused parameter
        # would get no gradient (DistributedDataParallel then fails). Kept in the state dict for MONAI compatibility.
        self.norm_cross_attn.requires_grad_(False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.explicit_attention_max_tokens = EXPLICIT_ATTENTION_MAX_TOKENS  # an attribute: TorchScript reads no globals

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, N, D)`` -> ``(B, N, D)``."""
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention ``(B, N, D)`` -> ``(B, N, D)`` with the weights of MONAI's ``SABlock``
        (``attn.qkv``, ``attn.out_proj``: same state dict, same arithmetic).

        Computed as facebook MAE / timm do: one view of the qkv projection and ``unbind``. MONAI's einops rearrange
        followed by three ``[i]`` selections makes autograd build three zero-filled copies of the whole qkv tensor
        and add them in the backward pass (a few % of an MAE step on CPU).

        bf16 on CPU with up to ``explicit_attention_max_tokens`` tokens (:data:`EXPLICIT_ATTENTION_MAX_TOKENS`):
        ``softmax(q k^T) v`` as two batched products instead of ``scaled_dot_product_attention``, whose CPU flash
        kernel is 1.7-4x slower in bf16 (forward + backward) at ViT token counts (benchmarks/README.md); same
        arithmetic, bf16 products with fp32 softmax accumulation in both. Longer sequences keep the flash kernel,
        which never holds the ``N x N`` matrix.
        """
        attn = self.attn
        b, n, _ = x.shape
        qkv = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        p = attn.dropout_rate if self.training else 0.0
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and n <= self.explicit_attention_max_tokens:
            weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, N, N)
            y = F.dropout(weights, p) @ v if p else weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=attn.scale)
        return attn.drop_output(attn.out_proj(y.transpose(1, 2).reshape(b, n, attn.inner_dim)))


class ViTEncoder(nn.Module):
    """ViT encoder with a cls token and fixed sin-cos position embeddings, optionally masking its input.

    Shared by :class:`USFMAE` and :class:`~usfmae_core.networks.classifier.USFMAEClassifier`, so encoder weights move
    between them by ``load_state_dict``.

    Args:
        in_channels: image channels (1 for grey ultrasound, 3 to reuse ImageNet/USF-MAE weights as they are).
        img_size: image size, an int or one per spatial dim.
        patch_size: patch size, an int or one per spatial dim.
        spatial_dims: 2 for images, 3 for volumes.
        hidden_size, num_layers, num_heads, mlp_ratio, qkv_bias: transformer shape (ViT-B: 768, 12, 12, 4.0, True).
        drop_path_rate: stochastic depth, increasing linearly to this value over the blocks.
    """

    def __init__(self, in_channels: int = 3, img_size: Sequence[int] | int = 224, patch_size: Sequence[int] | int = 16,
                 spatial_dims: int = 2, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        # sizes that cannot build a model are a one-line user error, however the model is built (CLI, bundle config)
        check_model_config({"img_size": img_size, "patch_size": patch_size, "spatial_dims": spatial_dims,
                            "hidden_size": hidden_size, "num_heads": num_heads})
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid)
        self.hidden_size = hidden_size
        # pos_embed_type="none": we fill the block's (zero) embedding with our own fixed sin-cos values below.
        self.patch_embed = PatchEmbeddingBlock(in_channels, self.img_size, self.patch_size, hidden_size, num_heads,
                                               proj_type="conv", pos_embed_type="none", spatial_dims=spatial_dims)
        self.patch_embed.position_embeddings.requires_grad_(False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio, qkv_bias, drop_path=d) for d in dpr)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None,
                apply_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode images ``(B, C, *S)``.

        Returns:
            latent ``(B, 1 + L_keep, D)`` (cls token first; after the final norm unless ``apply_norm`` is False),
            mask ``(B, L)`` and restore indices ``(B, L)`` (both None when ``mask_ratio`` is 0).
        """
        x = self.patch_embed(x)  # (B, L, D), position embedding added
        mask: torch.Tensor | None = None  # annotated for TorchScript
        ids_restore: torch.Tensor | None = None
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return (self.norm(x) if apply_norm else x), mask, ids_restore

    def pooled_features(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Pooled, normalised features ``(B, D)`` of unmasked images ``(B, C, *S)``: the final norm of the cls token
        (``pool="cls"``) or of the mean patch token (``"avg"``), as facebook's MAE fine-tuning (``global_pool``)
        does, so their fine-tuned weights give identical outputs."""
        tokens, _, _ = self.forward(x, apply_norm=False)
        pooled = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.norm(pooled)


class MAEDecoder(nn.Module):
    """MAE decoder: embeds visible tokens, fills in mask tokens, predicts every patch's pixels.

    Args:
        encoder_size: encoder token width.
        grid: patch grid (for the sin-cos position embedding).
        patch_dim: pixels per patch times channels (the prediction width).
        hidden_size, num_layers, num_heads, mlp_ratio, qkv_bias: decoder shape (USF-MAE: 512, 8, 16, 4.0, True).
    """

    def __init__(self, encoder_size: int, grid: Sequence[int], patch_dim: int, hidden_size: int = 512,
                 num_layers: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        # The cls slot at index 0 stays zero, as in facebook's layout, so their weights load unchanged.
        pos = torch.cat([torch.zeros(1, 1, hidden_size), sincos_pos_embed(grid, hidden_size)], dim=1)
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio, qkv_bias)
                                            for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.decoder_pred = nn.Linear(hidden_size, patch_dim)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``(B, 1 + L_keep, D)``, ids_restore ``(B, L)`` -> predicted patches ``(B, L, patch_dim)``."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class USFMAE(nn.Module):
    """USF-MAE masked autoencoder (2D or 3D): ViT encoder on visible patches + light decoder, MSE on masked patches.

    Defaults are the paper's ViT-B/16 with a 512-wide, 8-block decoder at 224x224 and 75% masking
    (``mae_vit_base_patch16_dec512d8b``). See :mod:`usfmae_core.networks.presets` for other sizes.

    Args:
        in_channels, img_size, patch_size, spatial_dims, hidden_size, num_layers, num_heads, mlp_ratio, qkv_bias,
            drop_path_rate: see :class:`ViTEncoder`.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads: see :class:`MAEDecoder`.
        decoder_mlp_ratio: decoder MLP width as a multiple of its width (default: ``mlp_ratio``, as facebook's).
        mask_ratio: fraction of patches masked per sample.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1) instead of raw pixels.

    Example::

        model = USFMAE()                       # ViT-B/16 dec512d8b
        loss, pred, mask = model(torch.rand(2, 3, 224, 224))
        pred.shape, mask.shape                 # (2, 196, 768), (2, 196)
    """

    def __init__(self, in_channels: int = 3, img_size: Sequence[int] | int = 224, patch_size: Sequence[int] | int = 16,
                 spatial_dims: int = 2, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 decoder_hidden_size: int = 512, decoder_num_layers: int = 8, decoder_num_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = False, decoder_mlp_ratio: float | None = None) -> None:
        super().__init__()
        check_model_config({"hidden_size": hidden_size, "num_heads": num_heads, "decoder_hidden_size":
                            decoder_hidden_size, "decoder_num_heads": decoder_num_heads}, "mae")
        self.encoder = ViTEncoder(in_channels, img_size, patch_size, spatial_dims, hidden_size, num_layers, num_heads,
                                  mlp_ratio, qkv_bias, drop_path_rate)
        patch_dim = math.prod(self.encoder.patch_size) * in_channels
        self.decoder = MAEDecoder(hidden_size, self.encoder.grid, patch_dim, decoder_hidden_size, decoder_num_layers,
                                  decoder_num_heads, decoder_mlp_ratio or mlp_ratio, qkv_bias)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """facebook MAE initialisation: sin-cos positions, xavier linears and patch projection, N(0, .02) tokens."""
        with torch.no_grad():
            self.encoder.patch_embed.position_embeddings.copy_(
                sincos_pos_embed(self.encoder.grid, self.encoder.hidden_size))
            w = self.encoder.patch_embed.patch_embeddings.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.encoder.cls_token, std=0.02)
            nn.init.normal_(self.decoder.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, L, prod(p) * C)``."""
        return patchify(imgs, self.encoder.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, prod(p) * C)`` -> ``(B, C, *S)``."""
        return unpatchify(x, self.encoder.patch_size, self.encoder.grid, self.encoder.in_channels)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only, computed in float32 (also under autocast)."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode.

        Args:
            imgs: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            mask_ratio: overrides the model's ratio (e.g. for reconstruction pictures).
            noise: optional ``(B, L)`` noise fixing the mask.

        Returns:
            loss (scalar), predicted patches ``(B, L, prod(p) * C)``, mask ``(B, L)`` (1 = masked).
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if ratio <= 0:
            raise ValueError("mask_ratio must be > 0 for the MAE")
        latent, mask, ids_restore = self.encoder(imgs, ratio, noise)
        pred = self.decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pictures for people: (masked input, reconstruction pasted into the visible input, mask image), each
        shaped like ``imgs``; the mask image is 1 where patches were hidden."""
        _, pred, mask = self.forward(imgs, mask_ratio, noise)
        pred = pred.float()
        if self.norm_pix_loss:  # undo the per-patch normalisation with the visible input's statistics
            target = self.patchify(imgs).float()
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        patch_dim = pred.shape[-1]
        mask_img = self.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, patch_dim))
        recon = self.unpatchify(pred).to(imgs.dtype)
        masked = imgs * (1 - mask_img)
        return masked, masked + recon * mask_img, mask_img
