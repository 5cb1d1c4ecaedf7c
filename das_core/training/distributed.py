"""Multi-process training with ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N -m das_core train ...`` starts N processes; each embeds its own
share of the global batch, then the embeddings and labels of all ranks are gathered
(``torch.distributed.nn.all_gather``, which keeps the autograd graph) so that DAS, the miner and
the loss see the global batch on every rank. Every rank therefore feeds DAS the same batch in
the same order and holds the same frequency recorder and banks, and computes the same loss.

Gradient scale: the backward of the differentiable all-gather sums, over the ranks, the
gradients of each rank's slice; every rank computed the same loss ``L``, so a rank's slice gets
``world_size × ∂L/∂slice``; DDP then averages parameter gradients over the ranks, which
divides by ``world_size`` again: the result is exactly ``∂L/∂θ`` of the global-batch loss, as
one process on the whole batch would compute it (checked by ``tests/test_distributed.py``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The context torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU) when running under torchrun."""
    import torch.distributed as dist

    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per process: ``cuda:LOCAL_RANK`` when training on CUDA."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


def gather_batch(
    ctx: DistContext, embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch ``cat over ranks`` (rank order), differentiable for the embeddings.
    All ranks must pass the same batch size."""
    if not ctx.enabled:
        return embeddings, labels
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    emb_parts = dist_fn.all_gather(embeddings)  # type: ignore[no-untyped-call]
    label_parts = [torch.empty_like(labels) for _ in range(ctx.world_size)]
    dist.all_gather(label_parts, labels)
    return torch.cat(list(emb_parts)), torch.cat(label_parts)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_flag(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (e.g. 'stop training')."""
    if not ctx.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(ctx: DistContext) -> None:
    """Every rank leaves the process group together: a barrier first (queued behind any
    collective still in flight on the group, so none is pending when its backend is torn down),
    then ``destroy_process_group``. Rank 1 used to leave at once while rank 0 still wrote its
    files, and once (one run in five, both ranks pinned to one core) aborted at exit in gloo
    ("terminate called without an active exception")."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
