"""Run under torchrun (2 CPU processes, gloo) by tests/test_distributed.py.

Every rank takes its half of one fixed global batch, embeds it through DDP, gathers the global
batch (das_core.training.distributed.gather_batch), runs DAS + miner + loss and steps the optimiser, for
a few steps. Each rank writes its losses, DAS state and final weights to OUT/rank<r>.pt; the
test compares them with one process training on the whole global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from das_core.training.distributed import context_from_env, gather_batch, init_distributed, shutdown


def setup(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Model, criterion (with DAS), optimiser and one global batch, all in float64.

    float64 so that the comparison with one process does not depend on the machine: the two
    runs differ only in the order of floating-point sums (the all-reduce of the gradients, the
    batch split of the convolutions), which in float64 moves results by ~1e-16 relative per
    operation instead of ~1e-7 (see test_distributed.py for the tolerances that follow)."""
    from das_core.models import build_model
    from das_core.training.config import TrainConfig
    from das_core.training.losses import build_criterion

    cfg = TrainConfig.from_mapping(
        {"dataset": "digits", "embedding_dim": 16, "das": True, "loss": "triplet", "miner": "semi-hard",
         "das_bank_size": 4}
    )
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    crit = build_criterion(cfg, num_classes=4).double()  # DAS keeps its state in float32
    opt = torch.optim.SGD(list(model.parameters()) + list(crit.parameters()), lr=0.05)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(16, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2)
    # BatchNorm in eval mode: per-rank batch statistics would differ from the global batch's
    # (real multi-GPU runs use SyncBatchNorm); everything else is what training does.
    model.eval()
    return model, crit, opt, x, y


def train_steps(model: torch.nn.Module, crit: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, ctx: object, steps: int = 3,
                seen: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[float]:
    """``steps`` optimiser steps; the gathered (global-batch) embeddings and labels that DAS saw
    at each step are appended to ``seen`` when given."""
    losses = []
    for step in range(steps):
        torch.manual_seed(1000 + step)  # the same DAS / miner draws on every rank, as in training
        emb, labels = gather_batch(ctx, model(x), y)  # type: ignore[arg-type]
        if seen is not None:
            seen.append((emb.detach().clone(), labels.clone()))
        loss = crit(emb, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    out = Path(sys.argv[1])
    ctx = context_from_env()
    init_distributed(ctx, torch.device("cpu"))
    model, crit, opt, x, y = setup()
    net = torch.nn.parallel.DistributedDataParallel(model)
    half = len(y) // ctx.world_size
    sl = slice(ctx.rank * half, (ctx.rank + 1) * half)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses = train_steps(net, crit, opt, x[sl], y[sl], ctx, seen=seen)
    torch.save(
        {"losses": losses, "das": crit.das.state_dict(), "model": model.state_dict(),  # type: ignore[union-attr]
         "seen": seen},
        out / f"rank{ctx.rank}.pt",
    )
    shutdown(ctx)


if __name__ == "__main__":
    main()
