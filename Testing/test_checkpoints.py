"""Checkpoints: our format (weights_only, atomic), import of every supported foreign layout, refusal of bad files."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_networks import facebook_mae_state_dict

from usfmae_core.checkpoints import (
    adapt_state_dict,
    detect_format,
    import_weights,
    load_checkpoint,
    load_model,
    make_checkpoint,
    save_checkpoint,
    to_facebook_state_dict,
)
from usfmae_core.errors import UsfmaeError
from usfmae_core.networks import build_model, mae_config


def test_save_load_roundtrip_is_weights_only(tmp_path) -> None:
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    cfg = mae_config("vit_test", img_size=32, patch_size=8)
    path = save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, "mae", cfg))
    raw = torch.load(path, weights_only=True)  # must not need pickled code
    assert raw["arch"] == "mae" and raw["usfmae_version"]
    loaded, _ckpt = load_model(path, expect="mae")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind
    with pytest.raises(UsfmaeError, match="'mae' model but a classifier"):
        load_model(path, expect="classifier")


class Evil:
    """Any class instance in a checkpoint needs its code to unpickle."""


def test_refuses_pickled_code_empty_corrupt_and_foreign(tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": "mae", "config": {}, "payload": Evil()}, evil)
    with pytest.raises(UsfmaeError, match="needs pickled code"):
        load_checkpoint(evil)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UsfmaeError, match="empty"):
        load_checkpoint(empty)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UsfmaeError, match="cannot be read"):
        load_checkpoint(corrupt)
    with pytest.raises(UsfmaeError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    fb = tmp_path / "fb.pth"
    torch.save({"model": facebook_mae_state_dict()}, fb)
    with pytest.raises(UsfmaeError, match="import-weights"):
        load_checkpoint(fb)


def test_import_facebook_training_checkpoint_with_args_and_bare_state(tmp_path) -> None:
    sd = facebook_mae_state_dict()
    # facebook's main_pretrain.py saves {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}
    full = tmp_path / "checkpoint-399.pth"
    torch.save({"model": sd, "epoch": 399, "args": argparse.Namespace(model="mae_vit_base_patch16")}, full)
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    a, _ = load_model(import_weights(full, tmp_path / "a.pt", num_heads=3, decoder_num_heads=2))
    b, _ = load_model(import_weights(bare, tmp_path / "b.pt", num_heads=3, decoder_num_heads=2))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_import_encoder_only_gives_mae_with_fresh_decoder(tmp_path) -> None:
    sd = {k: v for k, v in facebook_mae_state_dict().items()
          if not k.startswith(("decoder", "mask_token"))}
    src = tmp_path / "enc.pth"
    torch.save({"model": sd}, src)
    model, ckpt = load_model(import_weights(src, tmp_path / "e.pt", num_heads=3))
    assert ckpt["meta"]["source_format"] == "facebook_mae_encoder" and "initialised" in ckpt["meta"]["decoder"]
    assert torch.equal(model.encoder.blocks[1].mlp.linear2.weight, sd["blocks.1.mlp.fc2.weight"])
    loss, _, _ = model(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(loss)


def test_import_timm_vit_classifier_matches_reference(tmp_path) -> None:
    """facebook models_vit (global_pool: fc_norm, head; its unused `norm` dropped) -> our classifier."""
    sd = {k: v for k, v in facebook_mae_state_dict().items()
          if not k.startswith(("decoder", "mask_token", "norm."))}
    g = torch.Generator().manual_seed(3)
    sd.update({"fc_norm.weight": 1 + 0.1 * torch.randn(48, generator=g), "fc_norm.bias": torch.randn(48, generator=g),
               "head.weight": torch.randn(4, 48, generator=g), "head.bias": torch.randn(4, generator=g)})
    sd["pos_embed"] = sd["pos_embed"] + 0.05 * torch.randn(sd["pos_embed"].shape, generator=g)  # learned positions
    src = tmp_path / "vit.pth"
    torch.save({"model": sd}, src)
    assert detect_format(sd) == "timm_vit"
    model, ckpt = load_model(import_weights(src, tmp_path / "c.pt", num_heads=3), expect="classifier")
    assert ckpt["config"]["num_classes"] == 4 and ckpt["config"]["pool"] == "avg"
    x = torch.rand(2, 3, 32, 32)
    # reference (models_vit with global_pool): blocks, fc_norm(mean of patch tokens), head
    with torch.no_grad():
        raw = _reference_tokens(sd, x, heads=3)
        pooled = F.layer_norm(raw[:, 1:].mean(1), (48,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
        expected = F.linear(pooled, sd["head.weight"], sd["head.bias"])
        assert torch.allclose(model.eval()(x), expected, rtol=1e-4, atol=1e-5)


def _reference_tokens(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Encoder tokens before the final norm (the reference equations of test_networks, without masking)."""
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    t = torch.cat([cls, tokens], 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        b, n, d = t.shape
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        y = (((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return t


def test_import_monai_mae_matches_monai_encoder(tmp_path) -> None:
    from monai.networks.nets import MaskedAutoEncoderViT

    torch.manual_seed(0)
    monai_mae = MaskedAutoEncoderViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
                                     num_layers=2, num_heads=3, decoder_hidden_size=24, decoder_mlp_dim=72,
                                     decoder_num_layers=1, decoder_num_heads=3, spatial_dims=2, qkv_bias=True).eval()
    sd = monai_mae.state_dict()
    # MONAI < 1.6 also stored cross-attention weights in every TransformerBlock: they must be dropped, not refused
    sd["blocks.0.cross_attn.out_proj.weight"] = torch.zeros(48, 48)
    src = tmp_path / "monai_mae.pt"
    torch.save(sd, src)
    model, ckpt = load_model(import_weights(src, tmp_path / "m.pt", num_heads=3, decoder_num_heads=3), expect="mae")
    assert ckpt["meta"]["source_format"] == "monai_mae" and ckpt["config"]["decoder_mlp_ratio"] == 3.0
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        t = monai_mae.patch_embedding(x)
        t = torch.cat([monai_mae.cls_token.expand(2, -1, -1), t], 1)
        expected = monai_mae.blocks(t)  # MONAI's final LayerNorm is the last element of `blocks`
        for m in model.modules():  # MONAI's LayerNorms use eps 1e-5, ours (MAE recipe) 1e-6
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-5
        ours, _, _ = model.eval().encoder(x)
    assert ((ours - expected).norm() / expected.norm()).item() < 1e-5


def test_refit_channels_image_size_and_inflate_to_3d(tmp_path) -> None:
    sd = facebook_mae_state_dict()
    src = tmp_path / "fb.pth"
    torch.save({"model": sd}, src)
    grey, ckpt = load_model(import_weights(src, tmp_path / "g.pt", in_channels=1, img_size=48, num_heads=3,
                                           decoder_num_heads=2))
    assert ckpt["config"]["in_channels"] == 1 and ckpt["config"]["img_size"] == [48, 48]
    # a grey image through the summed 1-channel projection equals the RGB-replicated image through the original
    x = torch.rand(1, 1, 48, 48)
    w = sd["patch_embed.proj.weight"]
    assert torch.allclose(F.conv2d(x.expand(-1, 3, -1, -1), w, stride=8),
                          F.conv2d(x, grey.encoder.patch_embed.patch_embeddings.weight, stride=8), atol=1e-5)
    vol, ckpt3 = load_model(import_weights(src, tmp_path / "v.pt", spatial_dims=3, in_channels=1, num_heads=3,
                                           decoder_num_heads=2))
    assert ckpt3["config"]["spatial_dims"] == 3
    assert vol.encoder.patch_embed.patch_embeddings.weight.shape == (48, 1, 8, 8, 8)
    # inflation: a depth-constant volume gives the 2D response of its slice
    sl = torch.rand(1, 1, 8, 8)
    out3 = F.conv3d(sl.unsqueeze(2).expand(-1, -1, 8, -1, -1), vol.encoder.patch_embed.patch_embeddings.weight)
    out2 = F.conv2d(sl, grey.encoder.patch_embed.patch_embeddings.weight)
    assert torch.allclose(out3.squeeze(-1).squeeze(-1).squeeze(-1), out2.flatten(1), atol=1e-5)
    loss, _, _ = vol(torch.rand(1, 1, 32, 32, 32))
    assert torch.isfinite(loss)


def test_unknown_and_mismatched_keys_are_named(tmp_path) -> None:
    sd = facebook_mae_state_dict()
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 3)
    src = tmp_path / "weird.pth"
    torch.save(sd, src)
    with pytest.raises(UsfmaeError, match="relative_position_bias_table"):
        import_weights(src, tmp_path / "x.pt")
    junk = tmp_path / "junk.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, junk)
    with pytest.raises(UsfmaeError, match="unrecognised weight layout"):
        import_weights(junk, tmp_path / "y.pt")
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    bad = dict(model.state_dict())
    bad["encoder.blocks.0.attn.qkv.weight"] = torch.zeros(7, 7)
    with pytest.raises(UsfmaeError, match="mismatched shapes encoder.blocks.0.attn.qkv.weight"):
        adapt_state_dict(bad, model.state_dict())
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_export_roundtrip_to_facebook_layout(tmp_path) -> None:
    sd = facebook_mae_state_dict()
    src = tmp_path / "fb.pth"
    torch.save({"model": sd}, src)
    ours = load_checkpoint(import_weights(src, tmp_path / "o.pt", num_heads=3, decoder_num_heads=2))
    back = to_facebook_state_dict(ours["model"])
    assert set(back) == set(sd)
    for k in sd:
        if k != "cls_token":  # the cls position (zero here) is folded into the token
            assert torch.equal(back[k], sd[k]), k


def test_cli_import_and_one_line_error(tmp_path) -> None:
    src = tmp_path / "fb.pth"
    torch.save({"model": facebook_mae_state_dict()}, src)
    ok = subprocess.run([sys.executable, "-m", "usfmae_core.cli", "import-weights", str(src), "--out",
                         str(tmp_path / "m.pt"), "--num-heads", "3", "--decoder-num-heads", "2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "facebook_mae" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "usfmae_core.cli", "import-weights", str(tmp_path / "nope.pth"),
                          "--out", str(tmp_path / "n.pt")], capture_output=True, text=True)
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("usfmae: error:") and "nope.pth" in lines[0]
