"""Multi-GPU / multi-node helpers on PyTorch's own engine (``torchrun`` + DistributedDataParallel).

A run launched by ``torchrun`` has ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR/PORT``) in its
environment; :func:`init_distributed` reads them, picks ``nccl`` on CUDA and ``gloo`` otherwise, and binds each
process to GPU ``LOCAL_RANK``. Without those variables everything here is a no-op on a single process, so the same
training code serves one CPU, one GPU and many nodes::

    torchrun --nproc_per_node=4 -m usfmae_core.cli pretrain --corpus CORPUS --out RUN        # one node, 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        -m usfmae_core.cli pretrain ...                                                      # node 0 of 2

Only the main process (rank 0) logs and writes files; :func:`barrier` keeps the others from racing ahead of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from usfmae_core.device import resolve_device
from usfmae_core.errors import UsfmaeError

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "unwrap_model",
    "wrap_ddp",
]


@dataclass
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 is the main process).
        world_size: number of processes.
        local_rank: rank within this node (selects the GPU).
        device: the device this process computes on.
        backend: ``nccl`` / ``gloo``, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - a torch.device is immutable
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Initialise the process group from ``torchrun``'s environment (a no-op for a single process).

    Args:
        device: ``auto|cuda|mps|cpu``; with several CUDA processes each one takes GPU ``LOCAL_RANK``.
        timeout_s: collective timeout (long enough for a rank-0 checkpoint save).

    Returns:
        the :class:`DistContext` of this process.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        if world_size > 1 and local_rank >= torch.cuda.device_count():
            raise UsfmaeError(f"process with LOCAL_RANK {local_rank} has no GPU (this node has "
                              f"{torch.cuda.device_count()})", "set torchrun --nproc_per_node to the number of GPUs")
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, None)
    if dev.type == "mps":
        raise UsfmaeError("multi-process training is not supported on Apple MPS", "use --device cpu or one process")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU (no guessing in barrier())
        dist.init_process_group(**kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def cleanup(sync: bool = True) -> None:
    """Tear down the process group (safe to call when none exists). After a normal end, a barrier first: a rank that
    destroys its group while another still finishes a collective or a rank-0 checkpoint can make gloo abort or hang
    at exit. After an error no barrier (the other ranks may never reach it)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if sync:
                barrier()
        finally:
            dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, **kwargs: Any) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when ``ctx`` is distributed, else ``model`` itself."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None, **kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
