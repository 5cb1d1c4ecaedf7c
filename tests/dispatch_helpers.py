"""What becomes a host synchronisation on CUDA, caught on the CPU: a TorchDispatchMode that
records every op whose output shape or a host value depends on the data (for the dense
criteria's tests, tests/test_ms_dense.py and tests/test_triplet_dense.py), and the two
training steps (plain and DAS) those tests watch with it; and a DAS criterion's diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from das_core.training.losses import Criterion


class DataDependentOps(TorchDispatchMode):
    """Records every op whose output shape or a host value depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in ("nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2"):
            self.seen.append(name)
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.seen.append(f"{name} with a boolean mask")
        if name == "where" and len(args) == 1:  # torch.where(cond): a nonzero
            self.seen.append("where(cond)")
        return func(*args, **(kwargs or {}))


def data_dependent_ops(fn: Callable[[], Any]) -> list[str]:
    """The data-dependent ops ``fn()`` runs, in order."""
    with DataDependentOps() as mode:
        fn()
    return mode.seen


def criterion_steps(plain: Criterion, crit: Criterion, emb: torch.Tensor,
                    labels: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two training steps to watch with ``data_dependent_ops``, DAS itself left out (its CPU
    path is allowed syncs): ``plain``'s loss and backward on ``emb``, and ``crit``'s (a DAS
    criterion) on ``emb`` plus the points its DAS produced from it (made once here, after a call
    that fills its bank), with and without ``--das-exclude-own-copies``."""
    assert crit.das is not None
    crit.das(emb, labels)
    produced, labels_all = crit.das(emb, labels)
    source = torch.arange(len(emb)).repeat(len(labels_all) // len(emb))

    def plain_step() -> None:
        plain(emb.clone().requires_grad_(), labels).backward()

    def das_step() -> None:
        e = emb.clone().requires_grad_()
        emb_all = torch.cat([e, produced[len(emb) :].detach()])
        crit._penalised(emb_all, labels_all)[0].backward()
        crit._penalised(emb_all, labels_all, source)[0].backward()  # --das-exclude-own-copies

    return plain_step, das_step


def diagnostics_summary(crit: Criterion, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``DASDiagnostics``' means over one training step of ``crit`` (a DAS criterion) per batch of
    ``(embeddings, labels)``, every step measured."""
    from das_core.training.diagnostics import DASDiagnostics

    diag = DASDiagnostics(len(batches))
    crit.diagnostics = diag
    diag.start_epoch(len(batches))
    for emb, labels in batches:
        crit(emb.requires_grad_(), labels)
    return diag.summary()
