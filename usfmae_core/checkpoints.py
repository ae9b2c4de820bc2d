"""Checkpoints: our one format, safe loading, and import of foreign weights (facebook MAE / USF-MAE, MONAI, timm).

Our format is a dict readable with ``torch.load(weights_only=True)``::

    {"model": state_dict, "arch": "mae" | "classifier" | "resnet" | "densenet",
     "config": {...plain types: model kwargs, preset, classes, preprocessing...},
     "usfmae_version": "0.2.0", "meta": {...plain types: where it came from...}}

Training checkpoints add ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch`` and ``rng`` entries (tensors and
plain types only). Files are written atomically: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from usfmae_core import __version__
from usfmae_core.errors import UsfmaeError

__all__ = [
    "adapt_state_dict",
    "check_finite",
    "convert_state_dict",
    "detect_format",
    "import_weights",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "to_facebook_state_dict",
]


# --------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` atomically and durably (:func:`usfmae_core.fileio.atomic_write`: temporary file, fsync,
    rename, fsync of the folder), so neither a kill nor a power cut leaves a half-written file. A full disk or an
    unwritable folder raises ``OSError`` naming ``path``."""
    from usfmae_core.fileio import atomic_write

    checkpoint.setdefault("usfmae_version", __version__)
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def _umask_mode(path: str) -> None:
    """mkstemp creates 0600 files; give the final file the usual permissions (0666 minus the umask)."""
    from usfmae_core.fileio import umask_mode

    umask_mode(path)


def check_finite(state: dict[str, Any], source: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged training saved them): they would only give NaN outputs.

    Raises:
        UsfmaeError: naming how many tensors are affected and the first one.
    """
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsfmaeError(f"checkpoint {source} holds NaN or infinite weights ({len(bad)} tensor(s), first "
                          f"'{bad[0]}'): the training diverged before it was saved",
                          "use an earlier checkpoint, or train again with a lower learning rate (--blr / --lr)")


def make_checkpoint(model: torch.nn.Module, arch: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Our checkpoint dict for ``model`` (unwrapping DDP / torch.compile)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model": state, "arch": arch, "config": dict(config), "usfmae_version": __version__, **extra}


def _torch_load(path: Path, allow_namespace: bool = False, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors; ``argparse.Namespace`` (plain data that facebook's
    training scripts store as ``args``) may be allowed for imports; ``mmap`` maps the tensors instead of reading them
    (zip checkpoints only)."""
    if not path.exists():
        raise UsfmaeError(f"checkpoint {path} does not exist", "check the path")
    if path.stat().st_size == 0:
        raise UsfmaeError(f"checkpoint {path} is empty (0 bytes)", "re-download or re-export it")
    if path.is_dir():
        raise UsfmaeError(f"checkpoint {path} is a folder", "pass the checkpoint file inside it (e.g. model.pt)")
    not_ckpt = UsfmaeError(f"{path} is not a PyTorch checkpoint (its content is not a saved model)",
                           "pass a .pt / .pth file written by torch.save (e.g. RUN/model.pt), or re-download it")
    safe = [argparse.Namespace] if allow_namespace else []
    try:
        with torch.serialization.safe_globals(safe):
            if mmap and _looks_like_zip(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if not names and "Unsupported global" not in str(err):  # random bytes, a text file, a foreign pickle
            if _looks_like_torch_file(path):
                raise UsfmaeError(f"checkpoint {path} cannot be read (corrupt or truncated)",
                                  "re-download or re-export it") from None
            raise not_ckpt from None
        what = f" ({names[0]})" if names else ""
        raise UsfmaeError(f"checkpoint {path} needs pickled code to load{what} and was refused for safety",
                          "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) "
                          "on a machine that trusts it") from None
    except IsADirectoryError:
        raise UsfmaeError(f"checkpoint {path} is a folder", "pass the checkpoint file inside it") from None
    except PermissionError:
        raise UsfmaeError(f"checkpoint {path} cannot be read (permission denied)",
                          "check the file's permissions") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        if not _looks_like_torch_file(path):
            raise not_ckpt from None
        raise UsfmaeError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0][:120]})",
                          "the file is corrupt or truncated; re-download or re-export it") from None
    except Exception:  # noqa: BLE001 - the unpickler fails on garbage with KeyError, ValueError, ...
        raise not_ckpt from None


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a file written by ``torch.save``: a zip archive (the format since PyTorch 1.6)
    or a pickle stream (the legacy format). Anything else is not a checkpoint at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints (weights only), the classifier of a MONAI bundle folder as one
    (:func:`usfmae_core.bundle_export.load_bundle`), or a published model by name (:mod:`usfmae_core.hub`). Foreign
    weights, including a bundle's ``models/model.pt`` on its own (a plain state dict), go through
    ``usfmae import-weights``."""
    from usfmae_core.bundle_export import is_bundle, load_bundle

    path = Path(path)
    if not path.exists():
        from usfmae_core.hub import MODELS, resolve_init

        if str(path) in MODELS:  # a published model by name: from the cache, downloaded on first use
            path = resolve_init(str(path))
    if path.is_dir() and is_bundle(path):
        return load_bundle(path)
    if path.is_dir():
        raise UsfmaeError(f"{path} is a folder, not a checkpoint or a MONAI bundle (no configs/metadata.json)",
                          "pass a checkpoint file (model.pt) or a bundle folder")
    return _checked(path, _torch_load(path))


def _checked(path: Path, ckpt: Any) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt or "config" not in ckpt:
        fmt = detect_format(_unwrap(ckpt)) if isinstance(ckpt, dict) else "unknown"
        raise UsfmaeError(f"{path} is not a usfmae checkpoint (looks like: {fmt})",
                          f"convert it first: usfmae import-weights {path} --out model.pt")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise UsfmaeError(f"{path} is a damaged usfmae checkpoint ('model' or 'config' is not a dict)",
                          "use another copy, or re-export it")
    check_finite(ckpt["model"], path)
    return ckpt


def load_model(path: str | Path, expect: str | tuple[str, ...] | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build and load the model in checkpoint ``path``; ``expect`` names the acceptable ``arch`` values."""
    from usfmae_core.networks.presets import build_model

    ckpt = load_checkpoint(path)
    if expect is not None:
        expect = (expect,) if isinstance(expect, str) else expect
        if ckpt["arch"] not in expect:
            raise UsfmaeError(f"{path} holds a '{ckpt['arch']}' model but a {' or '.join(expect)} model is needed",
                              "pass a checkpoint of the right kind (pretrain gives 'mae', finetune 'classifier')")
    try:
        model = build_model(ckpt["arch"], ckpt["config"])
    except UsfmaeError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        raise UsfmaeError(f"the config stored in {path} does not describe a buildable model ({type(err).__name__}: "
                          f"{str(err)[:120]})", "use an unmodified checkpoint written by usfmae") from None
    state = adapt_state_dict(ckpt["model"], model.state_dict(), source=str(path))
    model.load_state_dict(state)
    return model.to(device), ckpt


# ------------------------------------------------------------------------------------------- adapting weights
def _grid_of(n: int, dims: int) -> tuple[int, ...]:
    side = round(n ** (1.0 / dims))
    if side**dims != n:
        raise UsfmaeError(f"cannot infer a square/cubic patch grid from {n} position embeddings",
                          "import with the model's --img-size")
    return (side,) * dims


def adapt_state_dict(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Fit ``src`` to a model whose state dict is ``target``, changing only what has a principled mapping.

    - position embeddings of another grid (image size): interpolated (2D bicubic, 3D trilinear); between 2D and 3D,
      the target's fixed sin-cos values are kept;
    - 2D patch projections inflated to 3D (repeated over depth / depth) and resized to another patch size;
    - 3 input channels to 1 (summed: a grey image repeated 3 times gives the same features) or 1 to 3 (/3);
    - decoder predictions of 3 channels to 1 (averaged);
    - MONAI < 1.6 ``cross_attn`` keys are dropped, MONAI >= 1.5 ``norm_cross_attn`` (unused) filled in.

    Unknown keys or shapes without a mapping raise :class:`UsfmaeError` naming them.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in src.items():
        if ".cross_attn." in key:  # MONAI < 1.6 stored (unused) cross-attention weights; 1.6 dropped them
            continue
        if key not in target:
            unexpected.append(key)
            continue
        want = target[key]
        if value.shape == want.shape:
            out[key] = value
            continue
        adapted = _adapt_tensor(key, value, want)
        if adapted is None:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(want.shape)}")
        else:
            out[key] = adapted.to(want.dtype)
    missing = [k for k in target if k not in out]
    # norm_cross_attn exists in MONAI's TransformerBlock but is unused without cross-attention
    for key in [k for k in missing if "norm_cross_attn" in k]:
        out[key] = target[key]
        missing.remove(key)
    if unexpected or mismatched or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if mismatched:
            parts.append(f"mismatched shapes {_few(mismatched)}")
        raise UsfmaeError(f"weights in {source} do not fit the model: {'; '.join(parts)}",
                          "check the preset/--img-size/--in-channels, or convert with usfmae import-weights")
    return out


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _adapt_tensor(key: str, value: torch.Tensor, want: torch.Tensor) -> torch.Tensor | None:
    if key.endswith(("position_embeddings", "decoder_pos_embed")):
        cls = 1 if key.endswith("decoder_pos_embed") else 0
        if value.shape[-1] != want.shape[-1]:
            return None
        n_old, n_new = value.shape[1] - cls, want.shape[1] - cls
        dims_new = 3 if round(n_new ** (1 / 3)) ** 3 == n_new and round(n_new**0.5) ** 2 != n_new else 2
        dims_old = 3 if round(n_old ** (1 / 3)) ** 3 == n_old and round(n_old**0.5) ** 2 != n_old else 2
        if dims_old != dims_new or key.endswith("decoder_pos_embed"):
            return want  # fixed sin-cos: the target's own values are exact for its grid
        from usfmae_core.networks.mae import interpolate_pos_embed

        body = interpolate_pos_embed(value[:, cls:], _grid_of(n_old, dims_old), _grid_of(n_new, dims_new))
        return torch.cat([value[:, :cls], body], dim=1)
    if key.endswith("patch_embeddings.weight") and value.dim() in (4, 5) and want.dim() in (4, 5):
        if value.shape[0] != want.shape[0]:
            return None
        w = value.float()
        c_old, c_new = w.shape[1], want.shape[1]
        if c_old != c_new:
            if c_old == 3 and c_new == 1:
                w = w.sum(1, keepdim=True)
            elif c_old == 1 and c_new == 3:
                w = w.repeat(1, 3, *([1] * (w.dim() - 2))) / 3
            else:
                return None
        if w.dim() == 4 and want.dim() == 5:  # inflate 2D -> 3D: same response to a depth-constant volume
            depth = want.shape[2]
            w = w.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
        if w.dim() != want.dim():
            return None
        if w.shape[2:] != want.shape[2:]:  # another patch size: resample the kernel, keeping its total response
            scale = math.prod(w.shape[2:]) / math.prod(want.shape[2:])
            mode = "bicubic" if w.dim() == 4 else "trilinear"
            w = F.interpolate(w, size=tuple(want.shape[2:]), mode=mode, align_corners=False) * scale
        return w
    if key.endswith(("decoder_pred.weight", "decoder_pred.bias")):
        n_new = want.shape[0]
        if value.shape[0] == 3 * n_new and value.shape[1:] == want.shape[1:]:  # (p*p*3) -> (p*p*1), channel-last
            return value.reshape(n_new, 3, *value.shape[1:]).mean(1)
    return None


# ----------------------------------------------------------------------------------------- foreign formats
_BLOCK_MAP = (("attn.proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.linear1."), ("mlp.fc2.", "mlp.linear2."))


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``model`` / ``state_dict`` wrappers and DDP ``module.`` prefixes removed."""
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "model_state_dict", "network"):
            if wrapper in obj and isinstance(obj[wrapper], dict) and obj[wrapper]:
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {}
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Name the layout of a state dict: ``usfmae_mae``, ``usfmae_classifier``, ``facebook_mae``,
    ``facebook_mae_encoder`` (an MAE encoder or a ViT backbone without head), ``timm_vit`` (ViT classifier),
    ``monai_mae``, ``monai_vit`` or ``unknown``."""
    keys = set(state)
    if "encoder.patch_embed.patch_embeddings.weight" in keys:
        return "usfmae_mae" if "decoder.decoder_pred.weight" in keys else "usfmae_classifier"
    if "patch_embed.proj.weight" in keys:
        if "decoder_pred.weight" in keys:
            return "facebook_mae"
        if "head.weight" in keys:
            return "timm_vit"
        return "facebook_mae_encoder"
    if "patch_embedding.patch_embeddings.weight" in keys:
        if "decoder_pred.weight" in keys:
            return "monai_mae"
        return "monai_vit"
    return "unknown"


def _block_key(rest: str) -> str:
    for old, new in _BLOCK_MAP:
        rest = rest.replace(old, new)
    return rest


def convert_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None,
                       decoder_num_heads: int | None = None, source: str = "weights"
                       ) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a foreign state dict to ours. Returns ``(arch, state, config)`` with the config inferred from shapes.

    Head counts cannot be read from weights; they default to width / 64 (ViT) and width / 32 (MAE decoder), which
    holds for facebook's and timm's ViT-T/S/B/L and the dec512d8b decoder.
    """
    fmt = detect_format(state)
    if fmt in ("usfmae_mae", "usfmae_classifier"):
        raise UsfmaeError(f"{source} is already in usfmae layout but lacks our checkpoint wrapper",
                          "load it with torch.load and save it with usfmae_core.checkpoints.make_checkpoint")
    if fmt == "unknown":
        raise UsfmaeError(f"{source}: unrecognised weight layout (first keys: {_few(sorted(state), 4)})",
                          "supported: facebook MAE / USF-MAE, MONAI MaskedAutoEncoderViT or ViT, timm/facebook ViT")
    if fmt.startswith("monai"):
        state = _monai_to_facebook(state)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key == "cls_token":
            out["encoder.cls_token"] = value
        elif key == "pos_embed":
            out["encoder.patch_embed.position_embeddings"] = value[:, 1:]
            # fold the cls slot's (learned, in timm ViTs) position into the cls token: exact and cls-free for us
            out["encoder.cls_token"] = state["cls_token"] + value[:, :1]
        elif key.startswith("patch_embed.proj."):
            out["encoder.patch_embed.patch_embeddings." + key.split(".")[-1]] = value
        elif key.startswith("blocks."):
            out["encoder." + _block_key(key)] = value
        elif key.startswith("norm."):
            out["encoder.norm." + key.split(".")[-1]] = value
        elif key.startswith("fc_norm."):
            continue  # below: facebook global-pool fine-tunes normalise the pooled token with fc_norm
        elif key in ("mask_token", "decoder_pos_embed") or key.startswith(("decoder_embed.", "decoder_norm.",
                                                                            "decoder_pred.")):
            out["decoder." + key] = value
        elif key.startswith("decoder_blocks."):
            out["decoder." + _block_key(key)] = value
        elif key.startswith("head."):
            out[key] = value
        else:
            unknown.append(key)
    if "fc_norm.weight" in state:
        out["encoder.norm.weight"], out["encoder.norm.bias"] = state["fc_norm.weight"], state["fc_norm.bias"]
    if unknown:
        raise UsfmaeError(f"{source}: keys with no usfmae equivalent: {_few(unknown)}",
                          "only ViT/MAE weights (patch_embed, blocks, norm, decoder, head) can be imported")

    proj = out["encoder.patch_embed.patch_embeddings.weight"]
    hidden, in_channels = proj.shape[0], proj.shape[1]
    patch = list(proj.shape[2:])
    spatial_dims = len(patch)
    n_tokens = out["encoder.patch_embed.position_embeddings"].shape[1]
    grid = _grid_of(n_tokens, spatial_dims)
    layers = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("encoder.blocks."))
    mlp = out["encoder.blocks.0.mlp.linear1.weight"].shape[0]
    config: dict[str, Any] = {"in_channels": in_channels, "img_size": [g * p for g, p in zip(grid, patch)],
                              "patch_size": patch, "spatial_dims": spatial_dims, "hidden_size": hidden,
                              "num_layers": layers, "num_heads": num_heads or max(1, hidden // 64),
                              "mlp_ratio": mlp / hidden, "qkv_bias": "encoder.blocks.0.attn.qkv.bias" in out,
                              "drop_path_rate": 0.0}
    if "head.weight" in out:
        config.update(num_classes=out["head.weight"].shape[0], pool="avg" if "fc_norm.weight" in state else "cls")
        return "classifier", out, config
    dec_hidden = out["decoder.decoder_embed.weight"].shape[0] if "decoder.decoder_embed.weight" in out else 512
    config.update(decoder_hidden_size=dec_hidden,
                  decoder_num_layers=(1 + max((int(k.split(".")[2]) for k in out if k.startswith("decoder.decoder_b")),
                                              default=7)),
                  decoder_num_heads=decoder_num_heads or max(1, dec_hidden // 32), mask_ratio=0.75,
                  norm_pix_loss=False)
    if "decoder.decoder_blocks.0.mlp.linear1.weight" in out:
        dec_ratio = out["decoder.decoder_blocks.0.mlp.linear1.weight"].shape[0] / dec_hidden
        if dec_ratio != config["mlp_ratio"]:
            config["decoder_mlp_ratio"] = dec_ratio
    return "mae", out, config


def _monai_to_facebook(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI ``MaskedAutoEncoderViT`` / ``ViT`` keys -> facebook keys (the final norms live inside MONAI's
    ``blocks`` / ``decoder_blocks`` Sequentials as their last element)."""
    def last_index(prefix: str) -> int:
        idx = [int(k.split(".")[1]) for k in state if k.startswith(prefix + ".") and k.split(".")[1].isdigit()]
        return max(idx) if idx else -1

    enc_last, dec_last = last_index("blocks"), last_index("decoder_blocks")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("patch_embedding.patch_embeddings."):
            out["patch_embed.proj." + parts[-1]] = value
        elif key == "patch_embedding.position_embeddings":
            out["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        elif key == "decoder_pos_embedding":
            out["decoder_pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        elif key == "mask_tokens":
            out["mask_token"] = value
        elif parts[0] in ("blocks", "decoder_blocks") and parts[1].isdigit():
            last = enc_last if parts[0] == "blocks" else dec_last
            if int(parts[1]) == last and len(parts) == 3:  # the trailing LayerNorm
                out[("norm." if parts[0] == "blocks" else "decoder_norm.") + parts[2]] = value
            else:
                rest = ".".join(parts[2:]).replace("attn.out_proj.", "attn.proj.").replace(
                    "mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2.")
                if ".cross_attn." in "." + rest or rest.startswith("norm_cross_attn."):
                    continue
                out[f"{parts[0]}.{parts[1]}.{rest}"] = value
        elif key == "norm.weight" or key == "norm.bias":
            out[key] = value
        elif key.startswith("classification_head.0."):
            out["head." + parts[-1]] = value
        else:
            out[key] = value
    if "pos_embed" in out and "cls_token" not in out:
        out["cls_token"] = torch.zeros_like(out["pos_embed"][:, :1])
    return out


def to_facebook_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MAE/classifier state dict -> facebook ``models_mae`` / timm ViT keys (for use in other tools)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "norm_cross_attn" in key:
            continue
        if key == "encoder.patch_embed.position_embeddings":
            out["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        elif key.startswith("encoder.patch_embed.patch_embeddings."):
            out["patch_embed.proj." + key.split(".")[-1]] = value
        elif key.startswith("encoder."):
            rest = key[len("encoder."):]
            for old, new in _BLOCK_MAP:
                rest = rest.replace(new, old)
            out[rest] = value
        elif key.startswith("decoder."):
            rest = key[len("decoder."):]
            for old, new in _BLOCK_MAP:
                rest = rest.replace(new, old)
            out[rest] = value
        else:
            out[key] = value
    return out


def import_weights(src: str | Path, out: str | Path, img_size: int | None = None, in_channels: int | None = None,
                   spatial_dims: int | None = None, num_heads: int | None = None,
                   decoder_num_heads: int | None = None) -> Path:
    """Convert foreign weights at ``src`` to our checkpoint at ``out`` (format detected automatically).

    An encoder-only source gives an MAE whose decoder is freshly initialised (recorded in ``meta``), ready to
    continue pretraining or to fine-tune. ``img_size`` / ``in_channels`` / ``spatial_dims`` re-fit the weights to
    another input (position embeddings interpolated, patch projection summed / inflated).
    """
    from usfmae_core.networks.presets import build_model

    src = Path(src)
    from usfmae_core.bundle_export import is_bundle, load_bundle

    if (src.is_dir() and is_bundle(src)) or (src.parent.name == "models" and is_bundle(src.parent.parent)):
        # a MONAI bundle's classifier (its models/model.pt alone is a plain state dict: the bundle says what it is)
        ckpt = load_bundle(src) if src.is_dir() else load_bundle(src.parent.parent, weights=src)
        ckpt["meta"] = {**ckpt["meta"], "imported_from": src.name, "source_format": "monai_bundle"}
        return save_checkpoint(out, ckpt)
    raw = _torch_load(src, allow_namespace=True)
    if isinstance(raw, dict) and {"arch", "config", "model"} <= set(raw):  # ours already: nothing to convert
        raise UsfmaeError(f"{src} is already a usfmae checkpoint ('{raw['arch']}' model)",
                          "use it as it is (no import needed)")
    state = _unwrap(raw)
    if not state:
        raise UsfmaeError(f"{src} holds no state dict of tensors", "pass a PyTorch checkpoint of a ViT / MAE model")
    fmt = detect_format(state)
    arch, converted, config = convert_state_dict(state, num_heads, decoder_num_heads, source=str(src))
    meta = {"imported_from": src.name, "source_format": fmt}
    source_dims = config["spatial_dims"]
    if fmt == "facebook_mae_encoder":
        meta["decoder"] = "initialised (the source had encoder weights only)"
    for key, value in (("img_size", img_size), ("in_channels", in_channels), ("spatial_dims", spatial_dims)):
        if value is not None:
            config[key] = value
    if spatial_dims is not None or img_size is not None:
        dims = config["spatial_dims"]
        config["patch_size"] = [config["patch_size"][-1]] * dims
        config["img_size"] = [img_size or config["img_size"][-1]] * dims
    model = build_model(arch, config)
    target = model.state_dict()
    if fmt == "facebook_mae_encoder":  # no decoder in the source: keep the fresh one
        converted.update({k: v for k, v in target.items() if k.startswith("decoder.")})
    elif arch == "mae" and config["spatial_dims"] != source_dims:  # pixels per patch change: new prediction layer
        converted.update({k: v for k, v in target.items() if k.startswith("decoder.decoder_pred.")})
        meta["decoder_pred"] = f"initialised for {config['spatial_dims']}D patches"
    check_finite(converted, src)
    model.load_state_dict(adapt_state_dict(converted, target, source=str(src)))
    config["preset"] = "imported"
    return save_checkpoint(out, {"model": model.state_dict(), "arch": arch, "config": config, "meta": meta})
