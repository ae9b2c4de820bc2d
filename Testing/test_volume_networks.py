"""Volume classifiers: attention-MIL shapes, masking, invariances and learning which slice matters; the native 3D
ViT from a 3D MAE and from an inflated 2D MAE; checkpoints and TorchScript."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from usfmae_core.checkpoints import load_model, make_checkpoint, save_checkpoint
from usfmae_core.networks import AttentionMILClassifier, GatedAttentionPooling, USFMAEClassifier, build_model
from usfmae_core.networks.mae import sincos_pos_embed
from usfmae_core.networks.presets import encoder_config, mae_config

ENC = encoder_config(mae_config("vit_test", img_size=16, patch_size=8, in_channels=1))


def tiny_mil(k: int = 2, **kw) -> AttentionMILClassifier:
    return AttentionMILClassifier(k, attention_hidden=16, **{**ENC, **kw})


def test_gated_attention_pooling_masks_padding() -> None:
    torch.manual_seed(0)
    pool = GatedAttentionPooling(8, 4)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    z, a = pool(h, mask)
    assert z.shape == (2, 8) and a.shape == (2, 5)
    assert torch.allclose(a.sum(1), torch.ones(2))
    assert torch.equal(a[1, 3:], torch.zeros(2))
    # the pooled feature is the attention-weighted mean of the instances
    assert torch.allclose(z, (a[..., None] * h).sum(1), atol=1e-6)
    # padding changes nothing: the second bag alone, unpadded, gives the same result
    z1, a1 = pool(h[1:, :3])
    assert torch.allclose(z1, z[1:], atol=1e-6) and torch.allclose(a1, a[1:, :3], atol=1e-6)
    # a bag with no real instance gets zero weights, not NaN
    _, a0 = pool(h, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(a0, torch.zeros(2, 5))


def test_mil_shapes_padding_and_permutation_invariance() -> None:
    torch.manual_seed(0)
    model = tiny_mil(3).eval()
    with torch.no_grad():  # a non-zero head, so logits differ between inputs
        model.head.weight.normal_()
    x = torch.randn(2, 6, 1, 16, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        logits, att = model.forward_with_attention(x, mask)
        assert logits.shape == (2, 3) and att.shape == (2, 6)
        assert torch.allclose(att.sum(1), torch.ones(2))
        assert torch.equal(att[1, 4:], torch.zeros(2))
        # padding slices are never looked at: garbage there changes nothing
        x2 = x.clone()
        x2[1, 4:] = 1e3
        assert torch.allclose(model(x2, mask), logits, atol=1e-5)
        # the second bag alone without padding
        assert torch.allclose(model(x[1:, :4]), logits[1:], atol=1e-5)
        # slice order does not matter (a bag is a set)
        perm = torch.randperm(6)
        assert torch.allclose(model(x[:1, perm]), logits[:1], atol=1e-5)


def test_mil_learns_to_attend_to_the_lesion_slice() -> None:
    """Bags of 8 noise slices; a positive bag has one slice with a bright square. After training, the label is
    right and the attention peaks on that slice: the model says which slice drove the decision."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def bags(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 8, 1, 16, 16, generator=gen) * 0.5
        y = torch.arange(n) % 2
        where = torch.randint(0, 8, (n,), generator=gen)
        for i in range(n):
            if y[i]:
                x[i, where[i], 0, 4:12, 4:12] += 1.0
        return x, y, where

    model = tiny_mil(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y, _ = bags(16)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, where = bags(32)
    model.eval()
    with torch.no_grad():
        logits, att = model.forward_with_attention(x)
    assert (logits.argmax(1) == y).float().mean() >= 0.9
    pos = y.bool()
    assert (att[pos].argmax(1) == where[pos]).float().mean() >= 0.9


def test_mil_from_mae_copies_the_encoder_and_refuses_3d() -> None:
    torch.manual_seed(0)
    mae = build_model("mae", mae_config("vit_test", img_size=16, patch_size=8, in_channels=1))
    model = AttentionMILClassifier.from_mae(mae, 2)
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    bigger = AttentionMILClassifier.from_mae(mae, 2, img_size=32)  # another slice size: positions re-gridded
    assert bigger.encoder.grid == (4, 4)
    mae3 = build_model("mae", mae_config("vit_test", img_size=16, patch_size=8, in_channels=1, spatial_dims=3))
    with pytest.raises(ValueError, match="2D"):
        AttentionMILClassifier.from_mae(mae3, 2)


def test_3d_classifier_from_3d_mae_and_inflated_2d_mae() -> None:
    torch.manual_seed(0)
    mae3 = build_model("mae", mae_config("vit_test", img_size=16, patch_size=8, in_channels=1, spatial_dims=3))
    clf = USFMAEClassifier.from_mae(mae3, 2)
    assert clf.encoder.spatial_dims == 3
    assert torch.equal(clf.encoder.blocks[0].attn.qkv.weight, mae3.encoder.blocks[0].attn.qkv.weight)
    assert clf(torch.rand(2, 1, 16, 16, 16)).shape == (2, 2)

    mae2 = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8, in_channels=1))
    vit3 = USFMAEClassifier.from_mae(mae2, 2, img_size=32, spatial_dims=3)
    enc2, enc3 = mae2.encoder, vit3.encoder
    assert enc3.spatial_dims == 3 and enc3.grid == (4, 4, 4)
    for k in ("blocks.1.mlp.linear1.weight", "norm.weight", "cls_token"):
        assert torch.equal(enc3.state_dict()[k], enc2.state_dict()[k])
    # inflation: a volume constant over depth gives every depth slab the 2D patch response
    img = torch.rand(1, 1, 32, 32)
    vol = img[:, :, None].expand(-1, -1, 32, -1, -1)
    p2 = enc2.patch_embed.patch_embeddings(img)
    p3 = enc3.patch_embed.patch_embeddings(vol)
    assert torch.allclose(p3, p2[:, :, None].expand_as(p3), atol=1e-5)
    # positions: the 3D sin-cos of the 4x4x4 grid (64 tokens is also an 8x8 square: not a 2D re-grid)
    assert torch.allclose(enc3.patch_embed.position_embeddings, sincos_pos_embed((4, 4, 4), 48))


@pytest.mark.parametrize("arch", ["mil", "classifier3d"])
def test_volume_checkpoints_round_trip(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if arch == "mil":
        config = {**ENC, "num_classes": 2, "attention_hidden": 16}
        model, x = build_model("mil", config), torch.rand(1, 5, 1, 16, 16)
    else:
        config = {**encoder_config(mae_config("vit_test", img_size=16, patch_size=8, in_channels=1, spatial_dims=3)),
                  "num_classes": 2}
        model, x = build_model("classifier", config), torch.rand(1, 1, 16, 16, 16)
    name = "mil" if arch == "mil" else "classifier"
    path = save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, name, config))
    loaded, _ckpt = load_model(path, expect=name)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model.eval()(x))


def test_mil_torchscript() -> None:
    torch.manual_seed(0)
    model = tiny_mil(2).eval()
    x, mask = torch.rand(2, 4, 1, 16, 16), torch.tensor([[True] * 4, [True, True, False, False]])
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x, mask), model(x, mask), atol=1e-5)
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
