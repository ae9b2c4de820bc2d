"""Multi-process pretraining with ``torchrun`` (2 CPU processes, gloo) and the single-process fallbacks of
:mod:`usfmae_core.workflows.distributed`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usfmae_core.checkpoints import load_model
from usfmae_core.data import phantom
from usfmae_core.data.corpus import prepare_corpus
from usfmae_core.workflows import distributed as D

REPO = Path(__file__).resolve().parents[1]

# Runs the real CLI under torchrun; wraps pretrain's end-of-run replica check so that every rank also dumps its
# own final weights, which the test compares itself.
DUMP_SCRIPT = '''
import os, sys, torch
from usfmae_core import cli
from usfmae_core.workflows import pretrain as P

_orig = P.weights_sha1

def _dump(model):
    torch.save(P.D.unwrap_model(model).state_dict(),
               os.path.join(os.environ["DUMP_DIR"], f"rank{os.environ['RANK']}.pt"))
    return _orig(model)

P.weights_sha1 = _dump
sys.exit(cli.main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_train_identical_replicas(tmp_path: Path) -> None:
    src = phantom.write_unlabelled_corpus_sources(tmp_path / "src", n_images=10, n_volumes=1, n_cines=1, seed=1,
                                                  size=48)
    prepare_corpus([src], tmp_path / "corpus", image_size=32, progress=False)
    script = tmp_path / "dump_pretrain.py"
    script.write_text(DUMP_SCRIPT)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(DUMP_DIR=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    steps, batch = 4, 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script),
           "pretrain", "--corpus", str(tmp_path / "corpus"), "--out", str(run), "--preset", "vit_test",
           "--patch-size", "8", "--batch-size", str(batch), "--max-steps", str(steps), "--workers", "0",
           "--precision", "fp32", "--device", "cpu", "--log-every", "1", "--ckpt-every", "2", "--picture-every", "0",
           "--clip-grad", "1.0"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # both ranks hold bitwise identical weights after training (they started from different seeds: DDP
    # broadcast rank 0's initial weights and all-reduced every gradient)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    _, ckpt = load_model(run / "model.pt", expect="mae")
    for name, value in ckpt["model"].items():
        assert torch.equal(value, r0[name]), name

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True and summary["steps"] == steps
    assert summary["effective_batch"] == 2 * batch
    # rank 0 alone wrote the logs; the training state holds every rank's RNG streams (they differ)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    rngs = state["rng"]["per_rank"]
    assert state["world_size"] == 2 and len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    print(f"torchrun 2x CPU: {summary['img_per_s']} img/s in total")


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed, ctx.main) == (0, 1, None, False, True)
    assert D.is_main() and not D.is_distributed() and D.get_world_size() == 1
    D.barrier()
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}] and D.broadcast_object(3) == 3
    t = torch.tensor([1.0, 2.0])
    out = D.all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model, ctx) is model

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule (it keeps ``_orig_mod``)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert D.unwrap_model(Wrapper(model)) is model
    D.cleanup()


def test_cuda_requested_without_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from usfmae_core.errors import UsfmaeError

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsfmaeError, match="CUDA"):
        D.init_distributed("cuda")
