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

from das_core.miners import IndicesTuple, build_miner

if TYPE_CHECKING:
    from das_core.config import TrainConfig
    from das_core.das import DenselyAnchoredSampling


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
    from das_core.pddm import PDDMLoss

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


class Criterion(nn.Module):
    """What the trainer calls on a batch of real embeddings: DAS (when on) produces the
    enlarged batch, the miner mines it, the loss scores it.

    Holds every piece of training state outside the network (DAS buffers, proxies, the
    learnable margin, the PDDM unit) so that one ``state_dict`` carries it into checkpoints.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: Callable[[torch.Tensor, torch.Tensor], IndicesTuple] | None = None,
        das: DenselyAnchoredSampling | None = None,
        *,
        aux_weight: float = 0.0,
        embedding_l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.das = das
        self.aux_weight = aux_weight
        self.embedding_l2 = embedding_l2

    def _score(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.miner is None:
            out: torch.Tensor = self.loss(embeddings, labels)
            return out
        mine_with_loss = getattr(self.miner, "mine_with_loss", None)
        if mine_with_loss is not None:  # PDDM mining also trains the PDDM unit (its metric loss)
            indices, extra = mine_with_loss(embeddings, labels)
            scored: torch.Tensor = self.loss(embeddings, labels, indices)
            unit_loss: torch.Tensor = extra
            return scored + unit_loss
        result: torch.Tensor = self.loss(embeddings, labels, self.miner(embeddings, labels))
        return result

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.das is None:
            return self._penalised(embeddings, labels)
        emb_all, labels_all = self.das(embeddings, labels)
        enlarged = self._penalised(emb_all, labels_all)
        if self.aux_weight > 0:  # the auxiliary-loss variant: L(real) + w * L(real and produced)
            return self._penalised(embeddings, labels) + self.aux_weight * enlarged
        return enlarged

    def _penalised(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss plus ``embedding_l2 · mean ‖e‖₂`` over the batch it saw (real and produced),
        as the authors' lifted and N-pair losses regularise their unnormalised embeddings."""
        score = self._score(embeddings, labels)
        if self.embedding_l2 <= 0:
            return score
        penalty: torch.Tensor = torch.linalg.vector_norm(embeddings, dim=1).mean()
        return score + self.embedding_l2 * penalty

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """Optimiser groups for the criterion's own parameters (proxies, margin beta: ``loss_lr``;
        the PDDM unit: ``pddm_lr``), each with its own learning rate."""
        groups: list[dict[str, Any]] = []
        pddm_params: list[nn.Parameter] = []
        if any(type(m).__name__ == "PDDMUnit" for m in self.modules()):
            from das_core.pddm import PDDMUnit

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


def build_das(cfg: TrainConfig, num_classes: int) -> DenselyAnchoredSampling | None:
    if not cfg.das:
        return None
    from das_core.das import DenselyAnchoredSampling

    return DenselyAnchoredSampling(
        num_classes,
        cfg.embedding_dim,
        num_produce=cfg.das_num_produce,
        topk=cfg.das_topk,
        r_s=cfg.das_r_s,
        r_b=cfg.das_r_b,
        bank_size=cfg.das_bank_size,
        normalize=cfg.das_normalize,
        detach=cfg.das_detach,
        use_dfs=cfg.das_mode in ("both", "dfs"),
        use_mts=cfg.das_mode in ("both", "mts"),
        gamma_range=cfg.gamma_range() if cfg.das_gamma_low is not None else None,
        bank_overflow="authors" if cfg.das_bank_overflow == "authors" else "fifo",
    )


def build_criterion(cfg: TrainConfig, num_classes: int) -> Criterion:
    """Loss, miner and DAS of ``cfg`` for a training split of ``num_classes`` classes."""
    spec = get_loss_spec(cfg.loss)
    loss = spec.build(cfg, num_classes, cfg.embedding_dim)
    miner: Any
    if cfg.miner == "pddm":
        from das_core.pddm import PDDMMiner

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
        loss, miner, build_das(cfg, num_classes), aux_weight=cfg.das_aux_weight, embedding_l2=cfg.embedding_l2
    )
