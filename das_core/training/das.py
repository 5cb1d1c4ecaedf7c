"""Densely-Anchored Sampling (DAS; Liu et al., ECCV 2022), vectorised.

Every real embedding ``v`` (label ``y``) of a mini-batch is treated as an anchor
around which ``T`` new embeddings are *produced*, ``v' = s ⊙ v + b``:

* **DFS** (discriminative feature scaling): a *frequency recorder*
  ``P ∈ R^{C×d}`` counts, per class, how often each dimension is among the
  top-``K`` (signed) values of a real embedding of that class. The *mask*
  ``M[y]`` holds the top-``K`` dimensions of ``P[y]``; the scale is
  ``s = γ ⊙ M[y] + 1 ⊙ (1 − M[y])`` with ``γ ~ U[1 − r_s, 1 + r_s]^d``, drawn
  afresh per embedding and per round, so only the masked dimensions change.
* **MTS** (memorized transformation shifting): a *bank* per class, a FIFO ring
  buffer of size ``Z`` fed with the differences ``v_i − v_j`` of all ordered
  same-class pairs of the (detached) batch. The shift is ``b = r_b · t`` with
  ``t`` drawn uniformly from the filled rows of the class bank (``b = 0`` while
  the bank is empty).

A call ``das(embeddings, labels)`` first updates the state with the batch
(frequency recorder, then banks), then produces ``T`` rounds, and returns
``cat([real, round_1, …, round_T])`` with the labels repeated ``1 + T`` times;
the miner and the loss are used unchanged on that.

Unlike the authors' code there is no per-sample Python loop and no host
synchronisation in the hot path, the state lives in registered buffers (so
checkpoints carry it) on the module's device, and the bank's "is full" test is
an explicit ``bank_filled`` counter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from das_core.training.cuda_graphs import GraphCache
from das_core.training.ranges import GAMMA, R_B, R_S, K, T, Z

__all__ = ["DASDtypeError", "DenselyAnchoredSampling"]

BankPath = Literal["compact", "fixed"]
BankOverflow = Literal["fifo", "authors"]


class DASDtypeError(TypeError, ValueError):
    """A tensor of an unsupported dtype. Both a ``TypeError`` and a ``ValueError``."""


def _nonzero_rows(diff: Tensor) -> Tensor:
    """``(diff != 0).any(-1)``: False exactly for the all-zero rows (NaN counts as non-zero),
    computed as ``max |diff| != 0``, which is several times faster on CPU."""
    return diff.abs().amax(dim=-1) != 0


def _duplicate_representative(x: Tensor, labels: Tensor) -> Tensor:
    """For each row ``i`` of ``x`` (float32), the smallest ``j`` with ``labels[j] == labels[i]``
    and ``x[i] − x[j]`` an all-zero row (``i`` itself when there is none: rows with a NaN or an
    infinity never give a zero difference), with the work of one ``B × B`` matrix product.

    ``x[i] − x[j]`` is all zero exactly when both rows are finite and equal as values
    (``−0.0 == 0.0``; no two distinct finite floats have a zero difference, subnormals
    included), i.e. when their bit patterns are equal once ``−0.0`` is made ``+0.0``. Each
    row becomes integers held in float64, ``u_i``: its 32-bit patterns read as two 16-bit
    integers each, its label, and ``-1`` (finite row) or ``i`` (a row with a NaN or an
    infinity, so that it equals no other). Then ``D_ij = ‖u_i − u_j‖² = G_ii + G_jj − 2 G_ij``
    with ``G = u uᵀ`` is a sum of integers below ``2d·2^30 + 2·2^48 < 2^53`` (labels and
    batch indices below ``2^24``: a bank of ``2^24`` classes would not fit in memory), exact
    in float64 whatever the summation order, and zero exactly for equal ``u``. Along row
    ``i``, ``G_jj − 2 G_ij = D_ij − G_ii`` (exact too) is smallest exactly where
    ``D_ij = 0`` (at ``j = i`` at least): its first minimum is the smallest such ``j``."""
    finite = (x * 0).sum(dim=1) == 0  # x·0 is ±0 for a finite value, NaN for an infinity or a NaN
    bits = (x + 0.0).view(torch.int16)  # −0.0 + 0.0 = +0.0, every other value unchanged; (B, 2d)
    tag = torch.where(finite, -1, torch.arange(x.shape[0], device=x.device))
    u = torch.cat([bits, labels.unsqueeze(1), tag.unsqueeze(1)], dim=1).to(torch.float64)
    gram = u @ u.mT
    return torch.sub(gram.diagonal(), gram, alpha=2).argmin(dim=1)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not allowed: must be {allowed}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value!r} is out of range: must be {allowed}")
    return int(value)


def _check_topk(value: object, dim: int) -> int:
    """K inside its range (``das_core.training.ranges.K``) and at most the dimension."""
    k = K.check_int(value)
    if k > dim:
        raise ValueError(f"topk={value!r} is out of range: must be <= dim={dim}")
    return k


def _check_gamma_range(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise ValueError(f"gamma_range={value!r} is not allowed: must be (low, high), each {GAMMA.describe()}")
    lo, hi = (GAMMA.check(end, f"gamma_range={value!r}: {which}") for end, which in zip(value, ("low", "high"), strict=True))
    if not lo < hi:
        raise ValueError(f"gamma_range={value!r} is not allowed: must be (low, high) with low < high")
    return (lo, hi)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed: must be True or False")
    return value


class DenselyAnchoredSampling(nn.Module):
    """Densely-Anchored Sampling: produce ``num_produce`` embeddings around every real one.

    Args:
        num_classes: ``C``, the number of training classes (labels are ``0..C-1``).
        dim: ``d``, the embedding dimension.
        num_produce: ``T``, rounds of produced embeddings per real embedding.
        topk: ``K``, the dimensions counted by the frequency recorder per embedding,
            and the size of each class mask.
        r_s: the scale range: ``γ ~ U[1 − r_s, 1 + r_s]`` on the masked dimensions.
        r_b: the shift ratio: ``b = r_b · t`` with ``t`` a row of the class bank.
        bank_size: ``Z``, the rows of each class's transformation bank.
        normalize: L2-normalise the produced embeddings.
        detach: produce from a detached copy of the embeddings (constants for the
            loss; the real embeddings still get gradients through the pairs they form).
        use_dfs: discriminative feature scaling on (frequency recorder + mask + scale).
        use_mts: memorized transformation shifting on (banks + shift).
        gamma_range: ``(low, high)``: an asymmetric scale range, ``γ ~ U[low, high)``,
            instead of ``1 ∓ r_s`` (the authors' SOP runs: ``(0.5, 2.0)``).
        bank_overflow: ``"fifo"`` (default): a class bringing ``n > Z`` pairs to one batch
            pushes them all in order, so its last ``Z`` remain and the pointer advances by
            ``n``. ``"authors"``: as the authors' ``MemoryBank.enqueue_dequeue``, the bank is
            overwritten with the last ``Z`` pairs in slots ``0..Z-1`` and the pointer is not
            advanced (same rows, another slot layout, so later pushes evict other rows).

    State (registered buffers, all on the module's device):
        ``frequency`` ``(C, d)`` float32 counts ``P``; ``bank`` ``(C, Z, d)`` float32;
        ``bank_filled`` ``(C,)`` int64 filled rows per class bank; ``bank_ptr``
        ``(C,)`` int64 next slot to write per class bank (ring write pointer). A class bank
        with ``bank_filled`` 0 holds zeros (its shift is then ``r_b · 0 = 0``).
    """

    frequency: Tensor
    bank: Tensor
    bank_filled: Tensor
    bank_ptr: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        num_produce: int = 3,
        topk: int = 4,
        r_s: float = 0.01,
        r_b: float = 0.01,
        bank_size: int = 10,
        normalize: bool = True,
        detach: bool = True,
        use_dfs: bool = True,
        use_mts: bool = True,
        gamma_range: tuple[float, float] | None = None,
        bank_overflow: BankOverflow = "fifo",
    ) -> None:
        super().__init__()
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.dim = _check_int("dim", dim, 1)
        # T, K, Z, r_s, r_b and gamma: the ranges of das_core.training.ranges (as the config's)
        self.num_produce = T.check_int(num_produce)
        self.topk = _check_topk(topk, self.dim)
        self.r_s = R_S.check(r_s)
        self.r_b = R_B.check(r_b)
        self.bank_size = Z.check_int(bank_size)
        self.normalize = _check_bool("normalize", normalize)
        self.detach = _check_bool("detach", detach)
        self.use_dfs = _check_bool("use_dfs", use_dfs)
        self.use_mts = _check_bool("use_mts", use_mts)
        self.gamma_range = _check_gamma_range(gamma_range)
        if bank_overflow not in ("fifo", "authors"):
            raise ValueError(f"bank_overflow={bank_overflow!r} is not allowed: must be 'fifo' or 'authors'")
        self.bank_overflow: BankOverflow = bank_overflow
        # Which bank-update implementation to use: None picks by device ("compact" on CPU,
        # "fixed" elsewhere). Tests set it to compare the two.
        self._bank_path: BankPath | None = None
        # CUDA graphs of the fixed-shape forward (see `forward`); False: always eager.
        self.cuda_graphs = True
        self._graphs = GraphCache()

        c, d, z = self.num_classes, self.dim, self.bank_size
        self.register_buffer("frequency", torch.zeros(c, d, dtype=torch.float32))
        self.register_buffer("bank", torch.zeros(c, z, d, dtype=torch.float32))
        self.register_buffer("bank_filled", torch.zeros(c, dtype=torch.int64))
        self.register_buffer("bank_ptr", torch.zeros(c, dtype=torch.int64))

    # ------------------------------------------------------------------ configuration

    def config(self) -> dict[str, Any]:
        """The hyper-parameters, as keyword arguments of the constructor."""
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "num_produce": self.num_produce,
            "topk": self.topk,
            "r_s": self.r_s,
            "r_b": self.r_b,
            "bank_size": self.bank_size,
            "normalize": self.normalize,
            "detach": self.detach,
            "use_dfs": self.use_dfs,
            "use_mts": self.use_mts,
            "gamma_range": self.gamma_range,
            "bank_overflow": self.bank_overflow,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **hparams: Any) -> DenselyAnchoredSampling:
        """A module holding ``state`` (from ``state_dict()``); ``C``, ``d`` and ``Z`` are read
        from the shapes, the other hyper-parameters come from ``hparams`` (else defaults).
        The module is put on the device of ``state["frequency"]``."""
        missing = [k for k in ("frequency", "bank", "bank_filled", "bank_ptr") if k not in state]
        if missing:
            raise ValueError(f"state has no {', '.join(missing)}: not a DenselyAnchoredSampling state_dict")
        c, z, d = state["bank"].shape
        shapes = {"num_classes": c, "dim": d, "bank_size": z}
        for key, val in shapes.items():
            if key in hparams and hparams[key] != val:
                raise ValueError(f"{key}={hparams[key]!r} disagrees with the state, which has {key}={val}")
        module = cls(**{**hparams, **shapes})
        module.load_state_dict(dict(state))
        return module.to(state["frequency"].device)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DenselyAnchoredSampling:
        # ``.half()`` / ``.to(bfloat16)`` on a model holding this module must not turn the
        # counts and the banks into low precision: they always stay float32.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name in ("frequency", "bank"):
            buf = self._buffers[name]
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    # ------------------------------------------------------------------ state views

    def compute_mask(self, topk: int | None = None) -> Tensor:
        """The ``(C, d)`` bool mask ``M``: the top-``topk`` dimensions of each row of the
        frequency recorder (ties broken as ``torch.topk`` breaks them)."""
        k = self.topk if topk is None else _check_topk(topk, self.dim)
        freq = self.frequency
        return torch.zeros(freq.shape, dtype=torch.bool, device=freq.device).scatter_(
            1, freq.topk(k, dim=1).indices, True
        )

    @property
    def mask(self) -> Tensor:
        """The ``(C, d)`` bool mask ``M`` (top-``topk`` of each row of ``frequency``)."""
        return self.compute_mask()

    def bank_in_order(self, cls: int) -> Tensor:
        """The filled rows of the bank of class ``cls``, oldest first (not for the hot path)."""
        c = _check_int("cls", cls, 0, self.num_classes - 1)
        return self.bank[c, self.bank_slots(c)]

    def bank_slots(self, cls: int) -> Tensor:
        """The slots of the filled rows of the bank of class ``cls``, oldest first (int64)."""
        c = _check_int("cls", cls, 0, self.num_classes - 1)
        filled = int(self.bank_filled[c])
        start = (int(self.bank_ptr[c]) - filled) % self.bank_size
        return (start + torch.arange(filled, device=self.bank.device)) % self.bank_size

    @torch.no_grad()
    def reset_state(self) -> None:
        """Empty the frequency recorder and the banks."""
        self.frequency.zero_()
        self.bank.zero_()
        self.bank_filled.zero_()
        self.bank_ptr.zero_()

    # ------------------------------------------------------------------ input checks

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Validate the batch; return the labels as int64."""
        if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
            raise DASDtypeError("embeddings and labels must be torch tensors")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (B, dim={self.dim}), got {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise DASDtypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have shape (B,) = ({embeddings.shape[0]},) to match the embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DASDtypeError(f"labels must be an integer tensor, got {labels.dtype}")
        device = self.frequency.device
        if embeddings.device != device or labels.device != device:
            raise ValueError(
                f"inputs are on {embeddings.device} (embeddings) and {labels.device} (labels) but the "
                f"DAS state is on {device}: move the module with .to(device)"
            )
        labels = labels.long()
        if labels.numel() == 0:
            return labels
        if labels.device.type == "cpu":
            lo, hi = (int(v) for v in labels.aminmax())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"labels must lie in [0, num_classes - 1] = [0, {self.num_classes - 1}], "
                    f"got values in [{lo}, {hi}]"
                )
        else:  # no host synchronisation: the check fails asynchronously on the device
            torch._assert_async(
                ((labels >= 0) & (labels < self.num_classes)).all(),
                f"DAS: labels out of range [0, {self.num_classes - 1}]",
            )
        return labels

    # ------------------------------------------------------------------ state update

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Update the frequency recorder (when ``use_dfs``), then the banks (when ``use_mts``),
        with a batch of real embeddings (used detached)."""
        labels = self._check_inputs(embeddings, labels)
        self._update(embeddings, labels)

    def _update(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[0] == 0:
            return
        with torch.no_grad():
            x = embeddings.detach().to(torch.float32)
            if self.use_dfs:
                self._update_frequency(x, labels)
            if self.use_mts:
                ptr_before = self.bank_ptr.clone() if self.bank_overflow == "authors" else None
                path = self._bank_path or ("compact" if x.device.type == "cpu" else "fixed")
                if path == "compact":
                    counts = self._update_bank_compact(x, labels)
                elif path == "fixed":
                    counts = self._update_bank_fixed(x, labels)
                else:
                    raise ValueError(f"_bank_path={path!r}: must be 'compact', 'fixed' or None")
                if ptr_before is not None:
                    self._authors_overflow(labels, ptr_before, counts)

    def _update_frequency(self, x: Tensor, labels: Tensor) -> None:
        """Frequency recorder: ``P[y, k] += 1`` for the top-``K`` (signed) dims of each ``v``."""
        idx = x.topk(self.topk, dim=1).indices  # (B, K)
        flat = torch.add(idx, labels.unsqueeze(1), alpha=self.dim).view(-1)  # into frequency.view(-1)
        # index_add_ sums duplicates (same class, same dim) exactly: integer counts in float32
        # (in any order on CUDA, where it adds atomically: one kernel, no sort).
        ones = torch.ones(1, device=x.device).expand(flat.numel())
        self.frequency.view(-1).index_add_(0, flat, ones)

    def _advance_pointers(self, counts: Tensor) -> None:
        """After ``counts[c]`` new pairs of class ``c`` were pushed: the filled rows and the ring
        write pointer (which, once the bank is full, points at the oldest row)."""
        z = self.bank_size
        self.bank_filled.add_(counts).clamp_(max=z)
        self.bank_ptr.add_(counts).remainder_(z)

    def _update_bank_compact(self, x: Tensor, labels: Tensor) -> Tensor:
        """Bank update with dynamic shapes (``nonzero``): free on CPU, syncs on CUDA.

        The ``n_c`` new pairs of class ``c``, in the row-major ``(i, j)`` order of the
        same-class mask, are pushed one after the other into the ring of class ``c``: the pair
        of within-class rank ``r`` lands in slot ``(bank_ptr[c] + r) mod Z`` and the pointer
        advances by ``n_c``, exactly as pushing them one at a time would. Only the last
        ``min(n_c, Z)`` can survive (ranks ``r >= s_c = max(n_c − Z, 0)``, distinct slots), so
        only those are written. Returns ``n``, the ``(C,)`` valid pairs per class."""
        z, c = self.bank_size, self.num_classes
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        same.fill_diagonal_(False)
        ii, jj = same.nonzero(as_tuple=True)  # row-major: for i, for j
        diff = x.index_select(0, ii) - x.index_select(0, jj)
        # Identical embeddings give zero rows: dropped, by giving them the key C (sorts last).
        key = torch.where(_nonzero_rows(diff), labels.index_select(0, ii), c)
        counts = torch.bincount(key, minlength=c + 1)
        # Group by class keeping the row-major order (stable sort); work in sorted order.
        order = torch.argsort(key, stable=True)
        skey = key.index_select(0, order)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(skey.numel(), device=x.device) - start.index_select(0, skey)
        skip = torch.clamp(counts - z, min=0)  # s_c: the pairs pushed out within this batch
        write = (rank >= skip.index_select(0, skey)) & (skey < c)
        w = write.nonzero().squeeze(1)
        cls = skey.index_select(0, w)
        slot = torch.remainder(self.bank_ptr.index_select(0, cls) + rank.index_select(0, w), z)
        self.bank.index_put_((cls, slot), diff.index_select(0, order.index_select(0, w)))
        n = counts[:c]
        self._advance_pointers(n)
        return n

    def _authors_overflow(self, labels: Tensor, ptr_before: Tensor, counts: Tensor) -> None:
        """``bank_overflow="authors"``, applied after the FIFO push: for each class with more
        than ``Z`` valid pairs in this batch, lay its bank out as the authors' code leaves it
        (the last ``Z`` pairs in slots ``0..Z-1``, oldest first) and restore its pointer.

        After the FIFO push, the pair of rank ``n − Z + k`` sits in slot ``(ptr_new + k) mod Z``
        (``ptr_new = ptr + n``), so the authors' layout is the bank rolled by ``ptr_new``.
        Works per sample (``B·Z`` rows, not ``C·Z``); same-class samples write identical rows.
        ``counts``: the valid pairs of each class in this batch (from the bank update)."""
        z = self.bank_size
        over = counts.index_select(0, labels) > z  # (B,)
        ptr_new = self.bank_ptr.index_select(0, labels)
        slots = torch.remainder(ptr_new.unsqueeze(1) + torch.arange(z, device=labels.device), z)  # (B, Z)
        current = self.bank.index_select(0, labels)  # (B, Z, d)
        rolled = current.gather(1, slots.unsqueeze(2).expand_as(current))
        self.bank.index_put_((labels,), torch.where(over.view(-1, 1, 1), rolled, current))
        self.bank_ptr.index_put_((labels,), torch.where(over, ptr_before.index_select(0, labels), ptr_new))

    def _update_bank_fixed(self, x: Tensor, labels: Tensor) -> Tensor:
        """Bank update with fixed shapes and no host synchronisation (the CUDA path).

        Same result as :meth:`_update_bank_compact`, computed in the other direction: every
        slot of the bank of every sample's class *gathers* the pair that ends up in it. The
        pairs are never listed: each class's pair list is known arithmetically from counts.

        1. Duplicate groups: ``rep[i]`` is the smallest index ``j`` of the same class with
           ``v_j − v_i`` a zero row (exact; :func:`_duplicate_representative`). Row ``i``
           has ``w_i = m_c − g_i`` valid partners (``m_c`` samples of its class, ``g_i`` in
           its group, itself included), class ``c`` has ``n_c = Σ w_i`` valid pairs.
        2. In label-sorted order (a stable sort of ``B`` labels: classes contiguous, index
           order within) the exclusive cumsum of ``w`` is the global rank of each row's
           first pair; the class's pairs are then one contiguous, row-major run.
        3. As in the compact path the last ``m_c = min(n_c, Z)`` pairs are written, rank
           ``r`` to slot ``(ptr_c + r) mod Z`` for ``r >= s_c = max(n_c − Z, 0)``. Inverted:
           slot ``z`` has ``k = (z − ptr_c − s_c) mod Z`` and receives rank ``s_c + k`` when
           ``k < m_c``, else keeps its old row. A ``searchsorted`` on the row starts finds
           the pair's row ``a`` and ``t``, its position among ``a``'s valid partners.
        4. The ``t``-th valid partner of ``a`` is the class member of within-class rank
           ``t + #{ℓ : q_ℓ − ℓ <= t}`` where ``q_0 < q_1 < …`` are the within-class ranks of
           ``a``'s duplicate group (those members are skipped); one ``searchsorted`` over
           all groups, laid out by a stable sort of ``rep``, counts them.
        5. Each sample rebuilds the ``(Z, d)`` bank of its class (``B·Z`` differences) and
           writes it back with ``index_put_``. Samples of the same class write bit-identical
           rows, so duplicate indices are harmless.

        Work: sorts and searches over ``B`` (and ``B·Z``) elements, plus one ``B × B``
        float64 product for the exact duplicate test; no ``B²·d`` temporaries. Returns ``n``,
        the ``(C,)`` valid pairs per class.
        """
        b = x.shape[0]
        z, c = self.bank_size, self.num_classes
        dev = x.device
        ar = torch.arange(b, device=dev)
        one = torch.ones(b, dtype=torch.int64, device=dev)
        rep = _duplicate_representative(x, labels)
        # per class: samples m_c and their start in label-sorted order
        m = torch.zeros(c, dtype=torch.int64, device=dev).scatter_add_(0, labels, one)
        cls_start = torch.cumsum(m, 0) - m
        sorted_labels, order = torch.sort(labels, stable=True)
        sorted_cls_start = cls_start.index_select(0, sorted_labels)
        member = torch.empty_like(ar).scatter_(0, order, ar - sorted_cls_start)  # rank in class
        group = torch.zeros(b, dtype=torch.int64, device=dev).scatter_add_(0, rep, one)
        w = m.index_select(0, labels) - group.index_select(0, rep)  # valid partners of each row
        n = torch.zeros(c, dtype=torch.int64, device=dev).scatter_add_(0, labels, w)
        w_sorted = w.index_select(0, order)
        row_start = torch.cumsum(w_sorted, 0) - w_sorted  # nondecreasing
        # per sample: its class's n_c, ring pointer and first label-sorted position
        n_i, ptr_i, start_i = torch.stack([n, self.bank_ptr, cls_start]).index_select(1, labels).unsqueeze(2)
        pair_start_i = row_start.index_select(0, start_i.view(-1)).unsqueeze(1)  # pairs of earlier classes

        # (B, Z): the rank, within its class, of the pair each slot receives
        skip = torch.clamp(n_i - z, min=0)  # s_c
        k = torch.remainder(torch.arange(z, device=dev) - ptr_i - skip, z)
        written = k < torch.clamp(n_i, max=z)
        query = pair_start_i + skip + k  # past the class's pairs where not written: unused
        pos = torch.searchsorted(row_start, query, right=True) - 1  # >= 0: row_start[0] = 0
        row = order[pos]  # the pair's first sample a
        t = query - row_start[pos]  # a's t-th valid partner

        # skip a's duplicate group: groups contiguous in rep order (any order of the groups
        # would do), index order within
        gorder = torch.argsort(rep, stable=True)
        gpos = torch.empty_like(ar).scatter_(0, gorder, ar)
        gstart = gpos.index_select(0, rep)  # the rep is its group's smallest index: comes first
        # q_ℓ − ℓ (in [0, B)), nondecreasing within a group; groups in increasing gstart
        # = gstart·(B + 1) + q_ℓ − ℓ with ℓ = gpos − gstart
        key = (gstart * (b + 2) + member - gpos).index_select(0, gorder)
        g_row = gstart[row]
        before = torch.searchsorted(key, g_row * (b + 1) + t, right=True) - g_row
        # clamp: only slots that are not written can point past the batch
        partner = order[torch.clamp(start_i + t + before, max=b - 1)]
        new = x[row] - x[partner]  # (B, Z, d)
        rows = torch.where(written.unsqueeze(2), new, self.bank.index_select(0, labels))
        self.bank.index_put_((labels,), rows)
        self._advance_pointers(n)
        return n

    # ------------------------------------------------------------------ produce

    def produce(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        r_s: float | None = None,
        r_b: float | None = None,
        num_produce: int | None = None,
        topk: int | None = None,
        use_dfs: bool | None = None,
        use_mts: bool | None = None,
        normalize: bool | None = None,
        bank_slots: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Produce ``T`` rounds from the current state, without changing it.

        Returns ``(T·B, d)`` rows in the input dtype; row ``t·B + i`` is round ``t + 1`` of
        sample ``i``: ``v' = s ⊙ v + b`` with ``s = γ ⊙ M[y] + 1 ⊙ (1 − M[y])``,
        ``γ ~ U[1 − r_s, 1 + r_s]^d`` (or ``U[gamma_range)`` when the module has one and ``r_s``
        is not overridden; fresh per embedding and round) and ``b = r_b · t``, ``t``
        uniform over the filled rows of ``bank[y]`` (``b = 0`` for an empty bank), then
        L2-normalised when ``normalize``. Keyword arguments override the module's
        hyper-parameters for this call only (the app's sliders), within the ranges of
        :mod:`das_core.training.ranges`. ``bank_slots`` ``(R, B)``: shift round ``t`` of
        sample ``i`` by the bank row in slot ``bank_slots[t, i]`` instead of a random one
        (``T = R``: a replay of chosen rows, e.g. :meth:`bank_slots` of one class, not bounded
        by ``T``'s range; needs ``use_mts``). Random draws come from ``generator`` (default:
        torch's global RNG). The arithmetic is done in float32 (the dtype of the state)
        whatever the input dtype.
        """
        labels = self._check_inputs(embeddings, labels)
        mts = self.use_mts if use_mts is None else _check_bool("use_mts", use_mts)
        if bank_slots is not None:
            rounds = self._check_slots(bank_slots, embeddings.shape[0], mts, num_produce)
        else:
            rounds = self.num_produce if num_produce is None else T.check_int(num_produce)
        return self._produce(
            embeddings,
            labels,
            r_s=self.r_s if r_s is None else R_S.check(r_s),
            r_b=self.r_b if r_b is None else R_B.check(r_b),
            num_produce=rounds,
            topk=self.topk if topk is None else _check_topk(topk, self.dim),
            use_dfs=self.use_dfs if use_dfs is None else _check_bool("use_dfs", use_dfs),
            use_mts=mts,
            normalize=self.normalize if normalize is None else _check_bool("normalize", normalize),
            generator=generator,
            bank_slots=bank_slots,
        )

    def _check_slots(self, slots: Tensor, batch: int, use_mts: bool, num_produce: int | None) -> int:
        """The rounds of a ``bank_slots`` replay, after checking it."""
        if not use_mts:
            raise ValueError("bank_slots replays bank rows: it needs use_mts")
        if not isinstance(slots, Tensor) or slots.dtype != torch.int64 or slots.dim() != 2 or slots.shape[1] != batch:
            raise ValueError(f"bank_slots must be an int64 tensor of shape (rounds, B={batch})")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.bank_size):
            raise ValueError(f"bank_slots must lie in [0, {self.bank_size - 1}] (the bank size Z)")
        if num_produce is not None and num_produce != slots.shape[0]:
            raise ValueError(f"num_produce={num_produce!r} disagrees with bank_slots, which has {slots.shape[0]} rounds")
        return int(slots.shape[0])

    def _gamma_bounds(self, r_s: float) -> tuple[float, float]:
        """The scale range: the module's asymmetric ``gamma_range`` (when set and ``r_s`` is the
        module's own), else ``[1 − r_s, 1 + r_s]``."""
        if self.gamma_range is not None and r_s == self.r_s:
            return self.gamma_range
        return (1.0 - r_s, 1.0 + r_s)

    def _produce(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        r_s: float,
        r_b: float,
        num_produce: int,
        topk: int,
        use_dfs: bool,
        use_mts: bool,
        normalize: bool,
        generator: torch.Generator | None,
        bank_slots: Tensor | None = None,
    ) -> Tensor:
        b, d = embeddings.shape
        t_rounds = num_produce
        dev = embeddings.device
        src = embeddings.detach() if self.detach else embeddings
        v = src.to(torch.float32)  # compute in float32, cast back at the end
        out = v.unsqueeze(0).expand(t_rounds, b, d)
        if b == 0:
            return out.reshape(0, d).to(embeddings.dtype)
        if use_dfs:
            # s ⊙ v only differs from v on the masked dims: scatter γ ⊙ v there. The mask
            # indices are exactly those of `self.mask` (same topk call on the same tensor).
            idx = self.frequency.topk(topk, dim=1).indices.index_select(0, labels)  # (B, K)
            gamma = torch.rand(t_rounds, b, topk, generator=generator, device=dev, dtype=torch.float32)
            low, high = self._gamma_bounds(r_s)
            gamma = gamma.mul_(high - low).add_(low)  # U[low, high): [1 - r_s, 1 + r_s] by default
            idx3 = idx.unsqueeze(0).expand(t_rounds, b, topk)
            out = out.scatter(2, idx3, gamma * v.gather(1, idx).unsqueeze(0))
        # `out` is our own tensor from here on (not a view of the input): in-place is safe
        # (large temporaries cost page faults on CPU); autograd allows the in-place add.
        owned = use_dfs
        if use_mts:
            if bank_slots is None:
                filled = self.bank_filled.index_select(0, labels)  # (B,)
                u = torch.rand(t_rounds, b, generator=generator, device=dev, dtype=torch.float32)
                # floor(u · filled) is uniform on 0..filled-1; the clamp guards float rounding up
                # to `filled` and the empty bank (row 0, multiplied by 0 below).
                row = torch.minimum((u * filled).long(), (filled - 1).clamp(min=0))
            else:
                row = bank_slots.to(dev)
            z = self.bank_size
            flat = (labels * z + row).reshape(-1)  # (T·B,) rows of bank viewed as (C·Z, d)
            shift = self.bank.reshape(-1, d).index_select(0, flat).view(t_rounds, b, d)
            # b = r_b·t; an empty class bank (bank_filled 0) holds zeros, so b = 0 there
            shift.mul_(r_b)
            out = out.add_(shift) if owned else out + shift
            owned = True
        if normalize:
            # = F.normalize(out, dim=2): same eps and arithmetic, without its expand_as copy.
            norm = torch.linalg.vector_norm(out, dim=2, keepdim=True).clamp_min(1e-12)
            # the division's backward needs `out`, so only divide in place without autograd
            out = out.div_(norm) if owned and not out.requires_grad else out / norm
        elif not owned:  # both halves off, no normalisation: still return a fresh tensor
            out = out.clone()
        return out.reshape(t_rounds * b, d).to(embeddings.dtype)

    # ------------------------------------------------------------------ forward

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Update the state with the batch, then produce: returns
        ``(cat([real, round_1, …, round_T]), labels.repeat(1 + T))``; the real part is the
        input tensor itself (its gradients flow).

        On CUDA with the fixed-shape bank path, when the produced rows need no gradient
        (``detach`` on, or no gradient wanted), the update and the production run as one
        CUDA graph per batch shape, captured on the second call with that shape (see
        :mod:`das_core.training.cuda_graphs`; ``cuda_graphs = False`` turns it off). The state
        evolves exactly as in eager mode; the random draws come from the same generator.
        """
        labels = self._check_inputs(embeddings, labels)
        key = self._graph_key(embeddings)
        if key is None:
            produced = self._update_and_produce(embeddings, labels)
        else:
            with torch.no_grad():
                produced = self._graphs.run(key, self._update_and_produce, embeddings.detach(), labels)
        return torch.cat([embeddings, produced]), labels.repeat(1 + self.num_produce)

    def _update_and_produce(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The body of :meth:`forward` after the input checks (what a CUDA graph captures)."""
        self._update(embeddings, labels)
        return self._produce(
            embeddings,
            labels,
            r_s=self.r_s,
            r_b=self.r_b,
            num_produce=self.num_produce,
            topk=self.topk,
            use_dfs=self.use_dfs,
            use_mts=self.use_mts,
            normalize=self.normalize,
            generator=None,
        )

    def _graph_key(self, embeddings: Tensor) -> tuple[Any, ...] | None:
        """The CUDA-graph cache key of this call, or None when it must run eagerly: not CUDA,
        graphs off, the compact bank path forced, an empty batch, produced rows that need
        gradients, or a capture or ``torch.compile`` trace already under way."""
        if (
            not self.cuda_graphs
            or embeddings.device.type != "cuda"
            or self._bank_path == "compact"
            or embeddings.shape[0] == 0
            or (not self.detach and embeddings.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()
        ):
            return None
        state = tuple(buf.data_ptr() for buf in (self.frequency, self.bank, self.bank_filled, self.bank_ptr))
        config = tuple(self.config().values())
        return (embeddings.shape[0], embeddings.dtype, embeddings.device, state, config)
