"""A deliberately naive, per-sample port of Densely-Anchored Sampling (DAS).

Written from ``/work/shared/method-notes.md`` in the style of the authors' code:
Python loops over samples and pairs, ``.item()`` calls, one list-based FIFO
(``collections.deque(maxlen=Z)``) per class. It is the test oracle of the
deterministic parts of ``das_core.training.das.DenselyAnchoredSampling`` (frequency
recorder, mask, bank contents) and the speed reference of ``bench/bench_das.py``.
It is not used by the library. Its random draws are not in the same order as the
vectorised module's, so produced rows agree only in distribution.

``bank_overflow="authors"`` ports the authors' ring buffer (``MemoryBank.enqueue_dequeue``
in ``modules/embedding_producer.py`` of lizhaoliu-Lec/DAS, lines 203-232) one class push at a
time: more than ``Z`` pairs overwrite the whole buffer with the last ``Z`` and leave the
pointer where it was; otherwise the pairs go in at the pointer, wrapping around.
``gamma_range=(low, high)`` draws ``γ ~ U[low, high)`` as their ``range_rand`` (line 11).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class ReferenceDAS:
    """Per-sample loop DAS with the same public behaviour as the vectorised module.

    State: ``frequency`` (the ``(C, d)`` frequency recorder, float32) and ``banks``
    (one ``deque`` of at most ``bank_size`` transformations per class, oldest first).
    """

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
        bank_overflow: str = "fifo",
    ) -> None:
        self.num_classes = num_classes
        self.gamma_range = gamma_range
        self.bank_overflow = bank_overflow
        self.filled = [0] * num_classes  # rows of the ring in use (authors' mode: non-zero rows)
        self.dim = dim
        self.num_produce = num_produce
        self.topk = topk
        self.r_s = r_s
        self.r_b = r_b
        self.bank_size = bank_size
        self.normalize = normalize
        self.detach = detach
        self.use_dfs = use_dfs
        self.use_mts = use_mts
        self.frequency = torch.zeros(num_classes, dim, dtype=torch.float32)
        self.banks: list[deque[Tensor]] = [deque(maxlen=bank_size) for _ in range(num_classes)]
        # The same FIFO as a physical ring buffer with a write pointer per class, to check the
        # module's slot layout too (the deque above gives the order, oldest first).
        self.ring = torch.zeros(num_classes, bank_size, dim, dtype=torch.float32)
        self.ring_ptr = [0] * num_classes

    def mask_of(self, y: int, topk: int | None = None) -> Tensor:
        """The ``(d,)`` bool mask of class ``y``: top-``K`` dims of its frequency row."""
        k = self.topk if topk is None else topk
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[torch.topk(self.frequency[y], k).indices] = True
        return mask

    def mask(self) -> Tensor:
        return torch.stack([self.mask_of(y) for y in range(self.num_classes)])

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Frequency recorder, then banks, one sample / one pair at a time."""
        emb = embeddings.detach().float()
        n = emb.shape[0]
        if self.use_dfs:
            for i in range(n):
                y = int(labels[i].item())
                top = torch.topk(emb[i], self.topk).indices
                self.frequency[y, top] += 1
        if self.use_mts:
            pairs: dict[int, list[Tensor]] = {}  # per class, in row-major (i, j) order
            for i in range(n):
                yi = labels[i].item()
                for j in range(n):
                    if i == j or labels[j].item() != yi:
                        continue
                    diff = emb[i] - emb[j]
                    if torch.count_nonzero(diff).item() == 0:  # identical images
                        continue
                    pairs.setdefault(int(yi), []).append(diff.clone())
            for c, new in pairs.items():
                if self.bank_overflow == "authors":
                    self._push_authors(c, new)
                    continue
                for diff in new:
                    self.banks[c].append(diff)
                    # the same push on a physical ring buffer (slot = pointer, then advance)
                    self.ring[c, self.ring_ptr[c]] = diff
                    self.ring_ptr[c] = (self.ring_ptr[c] + 1) % self.bank_size
                    self.filled[c] = min(self.filled[c] + 1, self.bank_size)

    def _push_authors(self, c: int, new: list[Tensor]) -> None:
        """One class's pairs of one batch into its ring, as the authors' ``enqueue_dequeue``."""
        z, q, ptr = self.bank_size, len(new), self.ring_ptr[c]
        if q > z:  # overflow: the last Z pairs fill the buffer from slot 0; the pointer stays
            for k in range(z):
                self.ring[c, k] = new[q - z + k]
        elif ptr + q > z:  # wrap around: the end part, then the beginning
            head = z - ptr
            for k in range(head):
                self.ring[c, ptr + k] = new[k]
            for k in range(q - head):
                self.ring[c, k] = new[head + k]
            self.ring_ptr[c] = q - head
        else:
            for k in range(q):
                self.ring[c, ptr + k] = new[k]
            self.ring_ptr[c] = ptr + q
        self.filled[c] = int((self.ring[c].abs().sum(1) > 0).sum().item())
        # the authors' pointer can equal Z (it wraps on the next push); the module keeps it mod Z
        self.ring_ptr[c] %= z

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
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``num_produce`` rounds; row ``t·B + i`` is round ``t + 1`` of sample ``i``."""
        r_s = self.r_s if r_s is None else r_s
        r_b = self.r_b if r_b is None else r_b
        rounds = self.num_produce if num_produce is None else num_produce
        use_dfs = self.use_dfs if use_dfs is None else use_dfs
        use_mts = self.use_mts if use_mts is None else use_mts
        src = embeddings.detach() if self.detach else embeddings
        rows: list[Tensor] = []
        for _ in range(rounds):
            for i in range(src.shape[0]):
                y = int(labels[i].item())
                v = src[i].float()
                if use_dfs:
                    low, high = (1 - r_s, 1 + r_s) if self.gamma_range is None else self.gamma_range
                    gamma = torch.rand(self.dim, generator=generator) * (high - low) + low
                    scale = torch.where(self.mask_of(y, topk), gamma, torch.ones(self.dim))
                else:
                    scale = torch.ones(self.dim)
                new = scale * v
                bank = list(self.banks[y]) if self.bank_overflow != "authors" else list(self.ring[y, : self.filled[y]])
                if use_mts and len(bank) > 0:
                    k = int(torch.randint(len(bank), (1,), generator=generator).item())
                    new = new + r_b * bank[k]
                if self.normalize:
                    new = new / new.norm().clamp_min(1e-12)
                rows.append(new.to(embeddings.dtype))
        if not rows:
            return embeddings.new_zeros(0, self.dim)
        return torch.stack(rows)

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        self.update(embeddings, labels)
        produced = self.produce(embeddings, labels)
        return torch.cat([embeddings, produced]), labels.long().repeat(1 + self.num_produce)

    __call__ = forward
