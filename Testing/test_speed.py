"""The fast training path gives the plain path's results: attention computed from the same weights as MONAI's SABlock,
the fused AdamW, the whole MAE and fine-tuning steps (losses, gradients, updated weights) in fp32 and bf16; the
precision choice (``--precision auto``) and its cache; the benchmark's GEMM log."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from usfmae_core import precision as P
from usfmae_core.networks import build_model, mae_config
from usfmae_core.networks.mae import Block
from usfmae_core.workflows.optim import adamw, param_groups

REPO = Path(__file__).resolve().parents[1]


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose blocks run MONAI's own ``SABlock.forward`` (the reference path)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, Block):
            m.attention = m.attn  # instance attribute: Block.forward then calls SABlock.forward
    return ref


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=rtol, atol=atol, msg=k)


def test_block_attention_equals_monai_sablock() -> None:
    torch.manual_seed(0)
    blk = Block(64, num_heads=4).train()
    x = torch.randn(3, 17, 64, requires_grad=True)
    ours = blk.attention(x)
    ref = blk.attn(x)  # MONAI's SABlock.forward, same weights
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    # the weights are MONAI's: same state-dict keys as TransformerBlock
    assert {"attn.qkv.weight", "attn.out_proj.weight", "mlp.linear1.weight", "norm1.weight"} <= set(blk.state_dict())


@pytest.mark.parametrize("tokens", [17, 200])
def test_bf16_attention_on_cpu_is_explicit_and_equals_the_flash_kernel(monkeypatch, tokens: int) -> None:
    """In bf16 on CPU ``Block.attention`` computes ``softmax(q k^T) v`` explicitly (faster there than the flash
    kernel); its output and gradients equal the flash kernel's in bf16 to bf16 rounding, and both the fp32 result to
    bf16 accuracy. Past EXPLICIT_ATTENTION_MAX_TOKENS the flash kernel is used again."""
    from usfmae_core.networks import mae as M

    torch.manual_seed(0)
    blk = Block(64, num_heads=4).train()
    assert blk.explicit_attention_max_tokens == M.EXPLICIT_ATTENTION_MAX_TOKENS
    x = torch.randn(3, tokens, 64)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))

    def run(explicit_max: int, dtype: torch.dtype | None) -> list[torch.Tensor]:
        blk.explicit_attention_max_tokens = explicit_max
        xi = x.clone().requires_grad_(True)
        blk.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            y = blk.attention(xi)
        y.float().square().sum().backward()
        return [y.float().detach(), xi.grad, blk.attn.qkv.weight.grad.clone()]

    explicit = run(1024, torch.bfloat16)
    assert not calls  # explicit
    flash = run(tokens - 1, torch.bfloat16)
    assert len(calls) == 1  # longer than the limit: flash kernel
    fp32 = run(1024, None)
    assert len(calls) == 2  # fp32: always the flash kernel
    # output, input gradient, weight gradient: both bf16 paths are as close to fp32 as bf16 allows
    for e, f, ref in zip(explicit, flash, fp32, strict=True):
        err_e, err_f = ((e - ref).norm() / ref.norm()).item(), ((f - ref).norm() / ref.norm()).item()
        assert err_e < 2e-2 and err_f < 2e-2 and err_e < 2 * err_f + 2e-3, (err_e, err_f)
        assert ((e - f).norm() / ref.norm()).item() < 2e-2


def test_cpu_allocator_tuning_is_set_once_and_can_be_turned_off(monkeypatch) -> None:
    import platform

    from usfmae_core import device as D

    D.tune_cpu_allocator.cache_clear()
    monkeypatch.setenv("USFMAE_MALLOC_TUNING", "0")
    assert D.tune_cpu_allocator() is False
    D.tune_cpu_allocator.cache_clear()
    monkeypatch.delenv("USFMAE_MALLOC_TUNING")
    assert D.resolve_device("cpu").type == "cpu"
    info = D.tune_cpu_allocator.cache_info()
    assert info.misses == 1  # resolve_device asked for it
    assert D.tune_cpu_allocator() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert D.tune_cpu_allocator.cache_info().hits >= 1


def test_adamw_is_fused_on_cpu_and_matches_the_loop() -> None:
    """The fused update equals PyTorch's per-parameter loop, step after step, given the same gradients (the models'
    own gradients would drift apart: Adam amplifies rounding differences of near-zero gradients)."""
    torch.manual_seed(0)
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    other = copy.deepcopy(model)
    fast = adamw(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    loop = torch.optim.AdamW(param_groups(other, 0.05), lr=1e-3, betas=(0.9, 0.95), foreach=False)
    assert fast.defaults["fused"] is True
    for step in range(3):
        model.zero_grad()
        model(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(step)))[0].backward()
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        fast.step()
        loop.step()
        close(dict(model.named_parameters()), dict(other.named_parameters()), rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_without_a_fused_kernel() -> None:
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))  # a device without a fused kernel: foreach instead
    opt = adamw([p], lr=1e-3)
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
    assert adamw([p], lr=1e-3, fused=False).defaults["foreach"] is None  # PyTorch's own default


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_mae_step_fast_path_equals_plain_path(dtype: torch.dtype | None) -> None:
    """One MAE training step through the engine's fast path (:func:`mae_train_step`, :func:`make_optimizer`) and
    through the plain path (MONAI's attention): equal losses and gradients."""
    from usfmae_core.workflows.pretrain import mae_train_step, make_optimizer

    torch.manual_seed(0)
    fast = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    ref = plain(fast)
    x = torch.rand(6, 3, 32, 32)
    opt_fast = make_optimizer(fast, lr=1e-3)
    assert opt_fast.defaults["fused"]
    torch.manual_seed(1)  # the same masks in both paths
    loss_fast = mae_train_step(fast, x, None, opt_fast, amp_dtype=dtype, step=False)["loss"]
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss_ref = ref(x)[0]
    loss_ref.backward()
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype is None else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss_fast, loss_ref.detach(), **tol)
    close(grads(fast), grads(ref), **tol)
    # (the updates themselves: test_adamw_is_fused_on_cpu_and_matches_the_loop, from identical gradients; Adam's
    # first step is lr * sign(g) for |g| >> eps, so gradients equal to rounding give updates equal to rounding)


def test_classifier_fast_path_equals_plain_path() -> None:
    from usfmae_core.workflows.finetune import build_classifier, make_optimizer

    torch.manual_seed(0)
    fast, _ = build_classifier(3, preset="vit_test", image_size=32, patch_size=8, drop_path=0.0)
    ref = plain(fast)
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 1, 0])
    for m in (fast, ref):
        F.cross_entropy(m(x), y, label_smoothing=0.1).backward()
    close(grads(fast), grads(ref), rtol=1e-4, atol=1e-6)
    assert make_optimizer(fast, 1e-3).defaults["fused"]


# ------------------------------------------------------------------------------------------------ precision
def test_explicit_precisions_and_bad_value() -> None:
    from usfmae_core.errors import UsfmaeError

    cpu = torch.device("cpu")
    assert P.resolve_precision("fp32", cpu) is None
    assert P.resolve_precision("bf16", cpu) is torch.bfloat16
    assert P.resolve_precision("fp16", cpu) is torch.float16
    with pytest.raises(UsfmaeError, match="unknown precision"):
        P.resolve_precision("fp8", cpu)


def test_auto_without_native_bf16_is_fp32_without_probing(monkeypatch, capsys) -> None:
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    monkeypatch.setattr(P, "probe_speed", lambda *a, **k: pytest.fail("no probe without native bf16"))
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    assert P.resolve_precision("auto", torch.device("cpu"), model, (2, 3, 32, 32)) is None
    assert "no native bf16" in capsys.readouterr().out


@pytest.mark.parametrize("fp32_s,bf16_s,expected", [(1.0, 0.5, torch.bfloat16), (1.0, 0.97, None), (0.4, 0.6, None)])
def test_auto_keeps_bf16_only_where_measured_faster(monkeypatch, tmp_path, capsys, fp32_s, bf16_s, expected) -> None:
    monkeypatch.setenv("USFMAE_HOME", str(tmp_path))
    monkeypatch.setattr(P, "native_bf16", lambda: True)
    monkeypatch.setattr(P, "_MEMO", {})
    calls = []

    def fake_probe(model, shape, device, train=True, **_):
        calls.append((tuple(shape), train))
        return {"fp32_s": fp32_s, "bf16_s": bf16_s, "batch": shape[0], "pairs": 3}

    monkeypatch.setattr(P, "probe_speed", fake_probe)
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    cpu = torch.device("cpu")
    assert P.resolve_precision("auto", cpu, model, (4, 3, 32, 32)) is expected
    first = capsys.readouterr().out
    assert f"precision auto -> {P.precision_name(expected)}" in first and "measured now" in first
    # cached on disk: a new process (empty memo) does not probe again; another shape or mode does
    monkeypatch.setattr(P, "_MEMO", {})
    assert P.resolve_precision("auto", cpu, model, (4, 3, 32, 32)) is expected
    assert "cached" in capsys.readouterr().out and len(calls) == 1
    P.resolve_precision("auto", cpu, model, (4, 3, 32, 32), train=False)
    P.resolve_precision("auto", cpu, model, (8, 3, 32, 32))
    assert calls[1:] == [((4, 3, 32, 32), False), ((8, 3, 32, 32), True)]
    cache = json.loads(P.cache_path().read_text())
    assert len(cache) == 3 and all("fp32_s" in v and "bf16_s" in v for v in cache.values())


def test_probe_leaves_the_model_and_the_random_streams_alone(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("USFMAE_HOME", str(tmp_path))
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = P.probe_speed(model, (2, 3, 32, 32), torch.device("cpu"), train=True)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert result["fp32_s"] > 0 and result["bf16_s"] > 0 and result["batch"] in (1, 2)  # 1: a slow, busy machine


def test_probe_with_a_batchnorm_cnn_keeps_its_statistics(monkeypatch, tmp_path) -> None:
    from usfmae_core.networks.classifier import cnn_baseline

    model = cnn_baseline("resnet", 3, 1, depth=10)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    P.probe_speed(model, (2, 1, 32, 32), torch.device("cpu"), train=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


# ---------------------------------------------------------------------------------------------- benchmark
def test_gemm_log_counts_the_products_of_a_training_step() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchlib

    lin = torch.nn.Linear(32, 48)
    x = torch.randn(4, 10, 32)

    def fwd_bwd() -> None:
        lin(x).sum().backward()

    log = benchlib.GemmLog()
    with log:
        fwd_bwd()
    shapes = sorted((k[0], k[2]) for k, n in log.calls.items() for _ in range(n))
    # forward (40, 32) x (32, 48); weight gradient (48, 40) x (40, 32); x needs no gradient
    assert shapes == sorted([((40, 32), (32, 48)), ((48, 40), (40, 32))])
    ceiling = benchlib.gemm_ceiling(fwd_bwd, torch.device("cpu"), reps=2)
    assert ceiling["products"] == 2 and ceiling["seconds"] > 0
    assert ceiling["gflop"] == pytest.approx(2 * 2 * 40 * 32 * 48 / 1e9)


def test_bundle_precision_inferer_autocasts_on_cpu(monkeypatch) -> None:
    """The bundle's inferer applies the engine's precision on the CPU too (MONAI's amp is CUDA only): decided once,
    for the network's mode and the input shape, output as float32."""
    from usfmae_core.bundle_support import FrameAveragingInferer, PrecisionInferer
    from usfmae_core.workflows.finetune import build_classifier

    seen = []

    def fake_probe(model, shape, device, train=True, **_):
        seen.append((tuple(shape), train))
        return {"fp32_s": 1.0, "bf16_s": 0.5, "batch": shape[0], "pairs": 1}

    monkeypatch.setattr(P, "native_bf16", lambda: True)
    monkeypatch.setattr(P, "_MEMO", {})
    monkeypatch.setattr(P, "_read_cache", dict)
    monkeypatch.setattr(P, "_write_cache", lambda *a: None)
    monkeypatch.setattr(P, "probe_speed", fake_probe)
    net, _ = build_classifier(3, preset="vit_test", image_size=32, patch_size=8)
    dtypes = []
    net.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    inferer = PrecisionInferer("auto")
    out = inferer(torch.randn(4, 3, 32, 32), net.train())
    inferer(torch.randn(4, 3, 32, 32), net)
    assert out.dtype == torch.float32 and dtypes == [torch.bfloat16] * 2 and seen == [((4, 3, 32, 32), True)]
    frames = PrecisionInferer("auto", FrameAveragingInferer(frame_batch_size=5))
    probs = frames(torch.randn(1, 7, 3, 32, 32), net.eval())
    assert probs.shape == (1, 3) and seen[-1] == ((5, 3, 32, 32), False)
    assert PrecisionInferer("fp32")(torch.randn(2, 3, 32, 32), net).dtype == torch.float32
    assert dtypes[-1] == torch.float32


@pytest.mark.slow  # torch.compile on CPU: a minute or more of C++ compilation
def test_compiled_training_step_equals_eager(monkeypatch) -> None:
    """``--compile`` (pretrain and finetune) steps through ``torch.compile(model)``: same loss and gradients."""
    import torch._inductor.config as inductor_config

    from usfmae_core.workflows.pretrain import mae_train_step

    # compiled code draws its random numbers (the MAE's masking noise) its own way unless told to use eager's
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch.manual_seed(0)
    model = build_model("mae", mae_config("vit_test", img_size=32, patch_size=8))
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 32, 32)
    opt = adamw(model.parameters(), 1e-3)
    torch.manual_seed(1)
    loss = mae_train_step(torch.compile(model), x, None, opt, step=False)["loss"]
    torch.manual_seed(1)
    loss_ref = ref(x)[0]
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-4, atol=1e-6)
    close(grads(model), grads(ref), rtol=1e-3, atol=1e-5)
