"""The loss registry and the training criterion (DAS -> miner -> loss).

Losses come from pytorch-metric-learning. Each registry entry says what the trainer needs
to know about it (capability flags, after Roth et al.'s registries): whether it has
parameters of its own (proxies, a learnable margin) that get their own parameter group and
learning rate, and whether it takes a tuple miner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from das_core.training.miners import IndicesTuple, build_miner
from das_core.training.ms_dense import DenseMultiSimilarity, dense_multi_similarity
from das_core.training.triplet_dense import DenseTriplet, dense_triplet

if TYPE_CHECKING:
    from das_core.training.config import TrainConfig
    from das_core.training.das import DenselyAnchoredSampling
    from das_core.training.diagnostics import DASDiagnostics


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[[TrainConfig, int, int], nn.Module]  # (cfg, num_classes, embedding_dim)
    default_margin: float | None
    has_parameters: bool = False
    takes_miner: bool = True
    help: str = ""


def _module(obj: Any) -> nn.Module:
    """pytorch-metric-learning is untyped: check at runtime what mypy cannot."""
    assert isinstance(obj, nn.Module)
    return obj


def _lp_distance(power: int = 1) -> Any:
    # Embeddings arrive L2-normalised already. PML's default LpDistance re-normalises its
    # inputs, which would silently undo DAS with normalize=False, so it is switched off.
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(normalize_embeddings=False, p=2, power=power)


def _margin(cfg: TrainConfig, default: float) -> float:
    return cfg.margin if cfg.margin is not None else default


def _triplet(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import TripletMarginLoss

    if cfg.triplet_form == "squared":
        # The authors' form (loss/triplet.py): [d(a,p)^2 - d(a,n)^2 + m]_+ averaged over every
        # mined triplet, zeros included (PML's default averages over the non-zero ones only).
        from pytorch_metric_learning.reducers import MeanReducer

        return _module(
            TripletMarginLoss(margin=_margin(cfg, 0.2), distance=_lp_distance(power=2), reducer=MeanReducer())
        )
    return _module(TripletMarginLoss(margin=_margin(cfg, 0.2), distance=_lp_distance()))


def _contrastive(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import ContrastiveLoss

    return _module(ContrastiveLoss(pos_margin=0.0, neg_margin=_margin(cfg, 1.0), distance=_lp_distance()))


def _margin_loss(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import MarginLoss

    # Class-specific, learnable boundary beta (Wu et al. 2017; Roth et al.'s setting).
    return _module(
        MarginLoss(
            margin=_margin(cfg, 0.2),
            nu=0.0,
            beta=cfg.margin_beta,
            learn_beta=True,
            num_classes=c,
            distance=_lp_distance(),
        )
    )


def _multi_similarity(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    return _module(MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base))


def _npair(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.losses import NPairsLoss

    # PML's default similarity re-normalises: with --no-normalize-embeddings (the authors'
    # N-pair) the raw dot products are scored, as their loss/npair.py does.
    return _module(NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=cfg.normalize_embeddings)))


def _lifted(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import GeneralizedLiftedStructureLoss

    return _module(GeneralizedLiftedStructureLoss(neg_margin=_margin(cfg, 1.0), pos_margin=0.0, distance=_lp_distance()))


def _normalized_softmax(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

    return _module(NormalizedSoftmaxLoss(num_classes=c, embedding_size=d, temperature=0.05))


def _arcface(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import ArcFaceLoss

    return _module(ArcFaceLoss(num_classes=c, embedding_size=d, margin=_margin(cfg, 28.6), scale=64))


def _proxy_anchor(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    return _module(ProxyAnchorLoss(num_classes=c, embedding_size=d, margin=_margin(cfg, 0.1), alpha=32))


def _pddm(cfg: TrainConfig, c: int, d: int) -> nn.Module:
    from das_core.training.pddm import PDDMLoss

    return PDDMLoss(
        d,
        alpha=cfg.pddm_alpha,
        beta=cfg.pddm_beta,
        lam=cfg.pddm_lambda,
        num_quadruplets=cfg.pddm_quadruplets,
    )


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("triplet", _triplet, 0.2, help="triplet margin loss (Schroff et al. 2015)"),
        LossSpec("contrastive", _contrastive, 1.0, help="contrastive loss (Hadsell et al. 2006)"),
        LossSpec("margin", _margin_loss, 0.2, has_parameters=True, help="margin loss, learnable beta (Wu et al. 2017)"),
        LossSpec("multi-similarity", _multi_similarity, None, help="multi-similarity loss (Wang et al. 2019)"),
        LossSpec("npair", _npair, None, takes_miner=False, help="N-pair loss (Sohn 2016)"),
        LossSpec("lifted", _lifted, 1.0, help="generalised lifted structure loss (Hermans et al. 2017)"),
        LossSpec(
            "normalized-softmax",
            _normalized_softmax,
            None,
            has_parameters=True,
            takes_miner=False,
            help="normalised softmax with class proxies (Zhai & Wu 2019)",
        ),
        LossSpec("arcface", _arcface, 28.6, has_parameters=True, takes_miner=False, help="ArcFace (Deng et al. 2019)"),
        LossSpec(
            "proxy-anchor", _proxy_anchor, 0.1, has_parameters=True, takes_miner=False, help="Proxy Anchor (Kim et al. 2020)"
        ),
        LossSpec(
            "pddm",
            _pddm,
            None,
            has_parameters=True,
            takes_miner=False,
            help="PDDM: learned local metric, hard quadruplets, double-header hinge (Huang et al. 2016)",
        ),
    )
}


def get_loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses are: {', '.join(LOSSES)}")
    return LOSSES[name]


# The dense multi-similarity path on the CPU as well: it gives PML's value and gradient to the
# bit there (tests/test_ms_dense.py) and is faster on one thread (bench/bench_ms_dense.py:
# 0.5-0.9x PML's time at N = 112 and 448, with and without the miner).
DENSE_MS_ON_CPU = True
# The dense triplet criterion on the CPU as well: the same triplets (same random draws) and
# gradient to the bit, the value to an ulp or two (tests/test_triplet_dense.py); timed against
# the index-list path in bench/bench_triplet_dense.py.
DENSE_TRIPLET_ON_CPU = True


class Criterion(nn.Module):
    """What the trainer calls on a batch of real embeddings: DAS (when on) produces the
    enlarged batch, the miner mines it, the loss scores it.

    Holds every piece of training state outside the network (DAS buffers, proxies, the
    learnable margin, the PDDM unit) so that one ``state_dict`` carries it into checkpoints.

    Options that test why DAS helps or hurts (all off by default, the paper's behaviour):
    ``grad_norm`` rescales the DAS loss each step so the gradient reaching the real
    embeddings has the norm the plain loss on the real batch would give;
    ``exclude_own_copies`` drops mined tuples that pair an embedding with its own produced
    copies. ``diagnostics`` (set by the trainer) measures a few steps per epoch.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: Callable[[torch.Tensor, torch.Tensor], IndicesTuple] | None = None,
        das: DenselyAnchoredSampling | None = None,
        *,
        aux_weight: float = 0.0,
        embedding_l2: float = 0.0,
        grad_norm: bool = False,
        exclude_own_copies: bool = False,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.das = das
        self.aux_weight = aux_weight
        self.embedding_l2 = embedding_l2
        self.grad_norm = grad_norm
        self.exclude_own_copies = exclude_own_copies
        self.diagnostics: DASDiagnostics | None = None
        # Multi-similarity loss with multi-similarity (or no) mining: the same loss on dense
        # masks, without the host synchronisations of PML's index lists (das_core/training/ms_dense.py).
        self.dense_ms: DenseMultiSimilarity | None = dense_multi_similarity(loss, miner)
        self._dense_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        # Triplet loss with one of the batch miners: one triplet slot per anchor and a mask, no
        # index lists of data-dependent length (das_core/training/triplet_dense.py).
        self.dense_triplet: DenseTriplet | None = dense_triplet(loss, miner)
        self._dense_triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _score(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, IndicesTuple | None]:
        """The loss of the batch and the tuples it used (``None``: the loss chose them itself).
        ``source[i]``: the real embedding row ``i`` was produced from (drops own-copy tuples)."""
        if self.dense_ms is not None and (embeddings.is_cuda or DENSE_MS_ON_CPU):
            loss, pos, neg = self.dense_ms.loss_and_pairs(embeddings, labels, source)
            self._dense_pairs = (pos, neg)  # listed only for a diagnostics step (see forward)
            return loss, None
        if self.dense_triplet is not None and (embeddings.is_cuda or DENSE_TRIPLET_ON_CPU):
            loss, p, n, mined = self.dense_triplet.loss_and_triplets(embeddings, labels, source)
            self._dense_triplets = (p, n, mined)  # listed only for a diagnostics step (see forward)
            return loss, None
        if self.miner is None:
            if source is None:
                out: torch.Tensor = self.loss(embeddings, labels)
                return out, None
            from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_pairs_indices

            indices: IndicesTuple = drop_own_copies(tuple(get_all_pairs_indices(labels)), source)
            return self.loss(embeddings, labels, indices), indices
        mine_with_loss = getattr(self.miner, "mine_with_loss", None)
        if mine_with_loss is not None:  # PDDM mining also trains the PDDM unit (its metric loss)
            indices, extra = mine_with_loss(embeddings, labels)
            scored: torch.Tensor = self.loss(embeddings, labels, indices)
            unit_loss: torch.Tensor = extra
            return scored + unit_loss, indices
        indices = self.miner(embeddings, labels)
        if source is not None:
            indices = drop_own_copies(indices, source)
        result: torch.Tensor = self.loss(embeddings, labels, indices)
        return result, indices

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diag = self.diagnostics
        if self.das is None:
            score, _ = self._penalised(embeddings, labels)
            return score
        ptr_before = self.das.bank_ptr.clone() if diag is not None else None
        emb_all, labels_all = self.das(embeddings, labels)
        b = embeddings.shape[0]
        source = torch.arange(b, device=embeddings.device).repeat(1 + self.das.num_produce)
        if diag is not None and ptr_before is not None:
            diag.track_bank(self.das, labels, ptr_before)
        self._dense_pairs = None
        self._dense_triplets = None
        enlarged, indices = self._penalised(emb_all, labels_all, source if self.exclude_own_copies else None)
        measure = diag is not None and diag.measure_now()
        if measure and self._dense_pairs is not None:  # the dense loss's pairs as PML's index lists
            a1, p = torch.where(self._dense_pairs[0])
            a2, n = torch.where(self._dense_pairs[1])
            indices = (a1, p, a2, n)
        if measure and self._dense_triplets is not None:  # the dense loss's triplets as index lists
            p_all, n_all, mined = self._dense_triplets
            (a,) = torch.where(mined)
            indices = (a, p_all[a], n_all[a])
        if self.grad_norm or measure:
            # The baseline's loss on the same real batch: what the gradient size is matched to
            # (--das-grad-norm) and compared with (diagnostics). Mining it draws random numbers;
            # for diagnostics alone the RNG is put back, so measuring never changes training.
            rng = None if self.grad_norm else _rng_state(embeddings.device)
            base, _ = self._penalised(embeddings, labels)
            g_base = _grad_norm(base, embeddings)
            g_das = _grad_norm(enlarged, embeddings)
            if diag is not None and measure:
                diag.measure(self, embeddings, emb_all, labels_all, source, indices, g_das, g_base)
            if rng is not None:
                _set_rng_state(embeddings.device, rng)
            if self.grad_norm:
                # scale = |grad_E L_base| / |grad_E L_DAS|, a constant for this step (no gradient
                # through it); 1 when either is zero, capped at 100 so a vanishing DAS gradient
                # is not blown up into noise.
                scale = torch.where(
                    (g_das > 0) & (g_base > 0), (g_base / g_das.clamp_min(1e-12)).clamp(max=100.0), 1.0
                )
                enlarged = enlarged * scale.detach()
                if diag is not None and measure:
                    diag.add("grad_norm_scale", float(scale))
        if self.aux_weight > 0:  # the auxiliary-loss variant: L(real) + w * L(real and produced)
            plain, _ = self._penalised(embeddings, labels)
            return plain + self.aux_weight * enlarged
        return enlarged

    def _penalised(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, IndicesTuple | None]:
        """The loss plus ``embedding_l2 · mean ‖e‖₂`` over the batch it saw (real and produced),
        as the authors' lifted and N-pair losses regularise their unnormalised embeddings; and the
        tuples the loss used (see ``_score``)."""
        score, indices = self._score(embeddings, labels, source)
        if self.embedding_l2 <= 0:
            return score, indices
        penalty: torch.Tensor = torch.linalg.vector_norm(embeddings, dim=1).mean()
        return score + self.embedding_l2 * penalty, indices

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """Optimiser groups for the criterion's own parameters (proxies, margin beta: ``loss_lr``;
        the PDDM unit: ``pddm_lr``), each with its own learning rate."""
        groups: list[dict[str, Any]] = []
        pddm_params: list[nn.Parameter] = []
        if any(type(m).__name__ == "PDDMUnit" for m in self.modules()):
            from das_core.training.pddm import PDDMUnit

            for m in self.modules():
                if isinstance(m, PDDMUnit):
                    pddm_params += [p for p in m.parameters() if p.requires_grad]
        pddm_ids = {id(p) for p in pddm_params}
        loss_params = [p for p in self.parameters() if p.requires_grad and id(p) not in pddm_ids]
        if loss_params:
            groups.append(
                {"params": loss_params, "lr": cfg.loss_lr or 100.0 * cfg.lr, "weight_decay": 0.0, "name": "loss"}
            )
        if pddm_params:
            groups.append({"params": pddm_params, "lr": cfg.pddm_lr or 10.0 * cfg.lr, "name": "pddm"})
        return groups


def drop_own_copies(indices: IndicesTuple, source: torch.Tensor) -> IndicesTuple:
    """The tuples of ``indices`` without those pairing an embedding with its own produced copy:
    a triplet ``(a, p, n)`` goes when ``source[a] == source[p]``; of pairs
    ``(a1, p, a2, n)`` only positive pairs can go (a copy has its source's label)."""
    if len(indices) == 3:
        a, p, n = indices
        keep = source[a] != source[p]
        return a[keep], p[keep], n[keep]
    if len(indices) == 4:
        a1, p, a2, n = indices
        keep = source[a1] != source[p]
        return a1[keep], p[keep], a2, n
    raise ValueError(f"an indices tuple has 3 (triplets) or 4 (pairs) tensors, got {len(indices)}")


def _grad_norm(loss: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """``|d loss / d wrt|`` (detached), without touching any parameter's ``.grad``."""
    if not (loss.requires_grad and wrt.requires_grad):
        return torch.zeros((), device=wrt.device)
    (g,) = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    if g is None:
        return torch.zeros((), device=wrt.device)
    norm: torch.Tensor = torch.linalg.vector_norm(g.detach())
    return norm


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def build_das(cfg: TrainConfig, num_classes: int) -> DenselyAnchoredSampling | None:
    if not cfg.das:
        return None
    from das_core.training.das import DenselyAnchoredSampling

    return DenselyAnchoredSampling(num_classes, cfg.embedding_dim, **cfg.das_kwargs())


def build_criterion(cfg: TrainConfig, num_classes: int) -> Criterion:
    """Loss, miner and DAS of ``cfg`` for a training split of ``num_classes`` classes."""
    spec = get_loss_spec(cfg.loss)
    loss = spec.build(cfg, num_classes, cfg.embedding_dim)
    miner: Any
    if cfg.miner == "pddm":
        from das_core.training.pddm import PDDMMiner

        miner = PDDMMiner(
            cfg.embedding_dim, alpha=cfg.pddm_alpha, num_quadruplets=cfg.pddm_quadruplets
        )
    else:
        miner = build_miner(
            cfg.miner,
            margin=_margin(cfg, spec.default_margin or 0.2),
            ms_epsilon=cfg.ms_epsilon,
            dw_cutoff=cfg.dw_cutoff,
        )
    if miner is not None and not spec.takes_miner:
        raise ValueError(f"loss {cfg.loss} takes no miner; use --miner none")
    return Criterion(
        loss,
        miner,
        build_das(cfg, num_classes),
        aux_weight=cfg.das_aux_weight,
        embedding_l2=cfg.embedding_l2,
        grad_norm=cfg.das_grad_norm,
        exclude_own_copies=cfg.das_exclude_own_copies,
    )
