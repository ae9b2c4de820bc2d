"""The USF-MAE network: shapes, masking, loss, mixed precision, position-embedding re-gridding, classifier transfer,
and numerical equivalence with facebook's MAE equations on facebook-format weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from usfmae_core.checkpoints import import_weights, load_model
from usfmae_core.networks import USFMAE, USFMAEClassifier, build_model, mae_config
from usfmae_core.networks.mae import interpolate_pos_embed, sincos_pos_embed


def tiny_mae(**kw) -> USFMAE:
    return build_model("mae", mae_config("vit_test", img_size=32, patch_size=8, **kw))


@pytest.mark.parametrize("dims,channels", [(2, 3), (2, 1), (3, 1)])
def test_shapes_and_loss(dims: int, channels: int) -> None:
    torch.manual_seed(0)
    model = tiny_mae(spatial_dims=dims, in_channels=channels)
    x = torch.rand(2, channels, *([32] * dims))
    loss, pred, mask = model(x)
    n_patches = 4**dims
    assert pred.shape == (2, n_patches, 8**dims * channels)
    assert mask.shape == (2, n_patches)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    # patchify / unpatchify are inverses and the mask image hides exactly the masked patches
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    masked, recon, mask_img = model.reconstruct(x)
    assert masked.shape == recon.shape == mask_img.shape == x.shape
    assert torch.allclose(mask_img.mean(dim=tuple(range(1, x.ndim))), mask.float().mean(1))
    assert torch.equal(recon * (1 - mask_img), x * (1 - mask_img))  # visible patches are the input


def test_masking_ratio_and_per_sample_independence() -> None:
    torch.manual_seed(0)
    model = tiny_mae(mask_ratio=0.75)
    _, _, mask = model(torch.rand(8, 3, 32, 32))
    assert (mask.sum(1) == 12).all()  # 75% of 16 patches, in every sample
    distinct = {tuple(m.tolist()) for m in mask}
    assert len(distinct) > 4  # each sample draws its own mask
    _, _, mask2 = model(torch.rand(8, 3, 32, 32))
    assert not torch.equal(mask, mask2)


def test_loss_only_counts_masked_patches() -> None:
    torch.manual_seed(0)
    model = tiny_mae()
    x = torch.rand(1, 3, 32, 32)
    noise = torch.rand(1, 16)
    loss, pred, mask = model(x, noise=noise)
    target = model.patchify(x)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean(), rtol=1e-5)


def test_norm_pix_loss_target() -> None:
    torch.manual_seed(0)
    model = tiny_mae(norm_pix_loss=True)
    x = torch.rand(2, 3, 32, 32)
    loss, pred, mask = model(x)
    t = model.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_loss_decreases_on_tiny_overfit() -> None:
    torch.manual_seed(0)
    model = tiny_mae()
    x = torch.rand(4, 3, 32, 32)
    noise = torch.rand(4, 16)  # a fixed mask: the model can memorise these images
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, _, _ = model(x, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(dtype: torch.dtype) -> None:
    if dtype == torch.float16 and not torch.cuda.is_available():
        # CPU autocast supports fp16 on recent torch; fall back to bf16 elsewhere
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except RuntimeError:
            pytest.skip("fp16 autocast unsupported on this CPU build")
    torch.manual_seed(0)
    model = tiny_mae()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    x = torch.rand(2, 3, 32, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        loss, pred, _mask = model(x)
    assert pred.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_sincos_matches_facebook_layout() -> None:
    """facebook's get_2d_sincos_pos_embed: [sin(w*omega), cos(w*omega), sin(h*omega), cos(h*omega)]."""
    dim, grid = 16, 3
    emb = sincos_pos_embed((grid, grid), dim)[0]
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ow = w.reshape(-1, 1).double() * omega
    oh = h.reshape(-1, 1).double() * omega
    expected = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1).float()
    assert torch.allclose(emb, expected, atol=1e-6)
    # widths that do not divide by 2 * dims still work (zero tail), e.g. ViT-L in 3D
    assert sincos_pos_embed((2, 2, 2), 1024).shape == (1, 8, 1024)


def test_position_embedding_interpolation() -> None:
    pos = sincos_pos_embed((4, 4), 48)
    same = interpolate_pos_embed(pos, (4, 4), (4, 4))
    assert same is pos
    up = interpolate_pos_embed(pos, (4, 4), (6, 6))
    assert up.shape == (1, 36, 48)
    # a smooth embedding interpolates close to its values at matching corners
    assert torch.allclose(up[0, 0], pos[0, 0], atol=0.2)
    vol = interpolate_pos_embed(sincos_pos_embed((2, 2, 2), 48), (2, 2, 2), (3, 3, 3))
    assert vol.shape == (1, 27, 48)


def test_encoder_transfer_to_classifier() -> None:
    torch.manual_seed(0)
    mae = tiny_mae()
    clf = USFMAEClassifier.from_mae(mae, num_classes=3, pool="cls")
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(v, clf.encoder.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32)
    tokens, _, _ = mae.encoder(x)
    assert torch.allclose(clf.forward_features(x), tokens[:, 0], atol=1e-6)
    assert clf(x).shape == (2, 3)
    # another image size: position embeddings are re-gridded, the rest is copied
    big = USFMAEClassifier.from_mae(mae, num_classes=2, img_size=48)
    assert big(torch.rand(1, 3, 48, 48)).shape == (1, 2)
    assert torch.equal(big.encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    clf.freeze_encoder()
    assert [n for n, p in clf.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_classifier_exports_with_torchscript_and_torch_export() -> None:
    torch.manual_seed(0)
    clf = USFMAEClassifier(num_classes=3, in_channels=1, img_size=32, patch_size=8, hidden_size=48, num_layers=2,
                           num_heads=3).eval()
    x = torch.rand(2, 1, 32, 32)
    expected = clf(x)
    scripted = torch.jit.script(clf)
    assert torch.allclose(scripted(x), expected, atol=1e-5)
    exported = torch.export.export(clf, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-5)


# ------------------------------------------------------------------ equivalence with facebook's MAE equations
def facebook_mae_state_dict(embed: int = 48, depth: int = 2, dec_embed: int = 32, dec_depth: int = 2, patch: int = 8,
                            img: int = 32, chans: int = 3, mlp_ratio: float = 4.0, seed: int = 0) -> dict:
    """Keys and shapes exactly as facebookresearch/mae models_mae.MaskedAutoencoderViT's state_dict, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"cls_token": r(1, 1, embed), "pos_embed": torch.cat([torch.zeros(1, 1, embed),
                                                               sincos_pos_embed((img // patch,) * 2, embed)], 1),
          "mask_token": r(1, 1, dec_embed),
          "decoder_pos_embed": torch.cat([torch.zeros(1, 1, dec_embed),
                                          sincos_pos_embed((img // patch,) * 2, dec_embed)], 1),
          "patch_embed.proj.weight": r(embed, chans, patch, patch), "patch_embed.proj.bias": r(embed)}

    def blocks(prefix: str, d: int, width: int) -> None:
        hid = int(width * mlp_ratio)
        for i in range(d):
            p = f"{prefix}.{i}."
            sd.update({p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
                       p + "attn.qkv.weight": r(3 * width, width), p + "attn.qkv.bias": r(3 * width),
                       p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
                       p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
                       p + "mlp.fc1.weight": r(hid, width), p + "mlp.fc1.bias": r(hid),
                       p + "mlp.fc2.weight": r(width, hid), p + "mlp.fc2.bias": r(width)})

    blocks("blocks", depth, embed)
    sd.update({"norm.weight": 1 + r(embed), "norm.bias": r(embed), "decoder_embed.weight": r(dec_embed, embed),
               "decoder_embed.bias": r(dec_embed)})
    blocks("decoder_blocks", dec_depth, dec_embed)
    sd.update({"decoder_norm.weight": 1 + r(dec_embed), "decoder_norm.bias": r(dec_embed),
               "decoder_pred.weight": r(patch * patch * chans, dec_embed),
               "decoder_pred.bias": r(patch * patch * chans)})
    return sd


def reference_forward(sd: dict, imgs: torch.Tensor, noise: torch.Tensor, patch: int, heads: int, dec_heads: int,
                      mask_ratio: float = 0.75):
    """MAE forward written from the paper's equations in plain torch (independent of usfmae and MONAI)."""

    def block(x: torch.Tensor, p: str, h: int) -> torch.Tensor:
        b, n, d = x.shape
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, h, d // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        return x + y

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    dec_depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, -1, -1), x], 1)
    for i in range(depth):
        x = block(x, f"blocks.{i}.", heads)
    latent = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    y = F.linear(latent, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    dd = y.shape[-1]
    y_ = torch.cat([y[:, 1:], sd["mask_token"].expand(b, n - keep, -1)], 1)
    y_ = torch.gather(y_, 1, ids_restore[..., None].expand(-1, -1, dd))
    y = torch.cat([y[:, :1], y_], 1) + sd["decoder_pos_embed"]
    for i in range(dec_depth):
        y = block(y, f"decoder_blocks.{i}.", dec_heads)
    y = F.layer_norm(y, (dd,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = F.linear(y, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    # facebook's patchify: einsum('nchpwq->nhwpqc')
    h = imgs.shape[-1] // patch
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(b, imgs.shape[1], h, patch, h, patch)).reshape(b, h * h, -1)
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return latent, pred, mask, loss


def test_facebook_weights_match_reference_forward(tmp_path) -> None:
    sd = facebook_mae_state_dict()
    src = tmp_path / "facebook_mae.pth"
    torch.save({"model": sd}, src)  # facebook's released files wrap the state dict in "model"
    out = import_weights(src, tmp_path / "mae.pt", num_heads=3, decoder_num_heads=2)
    model, ckpt = load_model(out, expect="mae")
    assert ckpt["meta"]["source_format"] == "facebook_mae"
    model.eval()
    torch.manual_seed(1)
    imgs = torch.rand(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        ref_latent, ref_pred, ref_mask, ref_loss = reference_forward(sd, imgs, noise, patch=8, heads=3, dec_heads=2)
        latent, mask, _ = model.encoder(imgs, 0.75, noise)
        loss, pred, mask2 = model(imgs, noise=noise)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    assert torch.equal(mask, ref_mask) and torch.equal(mask2, ref_mask)
    assert rel(latent, ref_latent) < 1e-5
    assert rel(pred, ref_pred) < 1e-5
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-5
