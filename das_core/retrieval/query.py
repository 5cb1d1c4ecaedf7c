"""Query by image or by item: embed query images, retrieve the nearest gallery items, and the
shipped sample query images.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

RECALL_KS = (1, 2, 4, 8)  # the R@k a query summary reports

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from das_core.retrieval.index import RetrievalIndex


def embed_images(model: torch.nn.Module, images: Sequence[Image.Image], device: str = "cpu") -> np.ndarray:
    """``(n, d)`` float32 embeddings of PIL images, each prepared with the model's own
    evaluation preprocessing (``model.preprocessing.prepare``: the checkpoint's, the same
    as the gallery's)."""
    import torch

    prep = getattr(model, "preprocessing", None)
    if prep is None:
        raise TypeError("embed_images needs a model with a .preprocessing (an EmbeddingNet)")
    if not images:
        d = int(getattr(model, "embedding_dim", 0))
        return np.zeros((0, d), np.float32)
    x = torch.cat([prep.prepare(img) for img in images]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x).float().cpu().numpy()
    finally:
        model.train(was_training)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class QueryResult:
    """The k nearest gallery items of one query, nearest first."""

    indices: np.ndarray  # (k,) int64 gallery indices
    distances: np.ndarray  # (k,) float32 L2 distances
    labels: np.ndarray  # (k,) int64 gallery labels
    query_label: int | None
    exclude: int | None  # the gallery index left out (the query itself), if any
    relevant: int | None  # same-class items in the gallery (without the excluded one)
    seconds: float

    @property
    def k(self) -> int:
        return int(len(self.indices))

    @property
    def correct(self) -> np.ndarray | None:
        """``(k,)`` bool: result has the query's label (``None`` when the label is unknown)."""
        if self.query_label is None:
            return None
        out: np.ndarray = self.labels == int(self.query_label)
        return out

    def summary(self) -> dict[str, Any]:
        """Per-query numbers: ``R@n`` (1 if one of the first n is right), ``P@k``, hits, rank
        of the first right result, AP over the k results (``None`` without a label)."""
        return query_summary(self.correct, relevant=self.relevant)


def query_summary(correct: np.ndarray | Sequence[bool] | None, *, relevant: int | None = None) -> dict[str, Any]:
    """Recall@n-style numbers of one ranked result list (``correct``: right/wrong per rank).

    ``R@n`` for n in 1, 2, 4, 8 (up to k) is 1.0 when one of the first n results is right, as
    the dataset-level R@n averages; ``P@k`` is the share of right results; ``first_hit`` the
    1-based rank of the first right result (``None`` if none); ``AP@k`` the average precision
    over the k results (normalised by min(k, relevant) when ``relevant`` is known)."""
    if correct is None:
        return {"k": None, "hits": None, "P@k": None, "first_hit": None, "AP@k": None, "relevant": relevant}
    c = np.asarray(correct, dtype=bool).reshape(-1)
    k = len(c)
    out: dict[str, Any] = {"k": k, "relevant": relevant}
    for n in RECALL_KS:
        if n <= k:
            out[f"R@{n}"] = float(c[:n].any())
    hits = int(c.sum())
    out["hits"] = hits
    out["P@k"] = hits / k if k else float("nan")
    first = np.flatnonzero(c)
    out["first_hit"] = int(first[0]) + 1 if len(first) else None
    prec = np.cumsum(c) / np.arange(1, k + 1) if k else np.zeros(0)
    denom = min(k, relevant) if relevant is not None else hits
    out["AP@k"] = float((prec * c).sum() / denom) if denom > 0 else 0.0
    return out


def retrieve(
    index: RetrievalIndex,
    gallery_labels: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    query_label: int | None = None,
    exclude: int | None = None,
) -> QueryResult:
    """Search ``index`` (the gallery of ``gallery_labels``) for one query embedding ``(d,)``;
    ``exclude`` leaves that gallery index out (a query taken from the gallery)."""
    labels = np.asarray(gallery_labels, dtype=np.int64).reshape(-1)
    if len(labels) != index.size:
        raise ValueError(f"the index holds {index.size} items but {len(labels)} labels were given")
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    t0 = time.perf_counter()
    dist, idx = index.search(q, int(k), exclude=exclude)
    seconds = time.perf_counter() - t0
    keep = idx >= 0  # an approximate index may find fewer
    idx, dist = idx[keep], dist[keep]
    relevant = None
    if query_label is not None:
        relevant = int((labels == int(query_label)).sum())
        if exclude is not None and 0 <= exclude < len(labels) and labels[exclude] == int(query_label):
            relevant -= 1
    return QueryResult(
        indices=idx.astype(np.int64), distances=dist.astype(np.float32), labels=labels[idx],
        query_label=None if query_label is None else int(query_label),
        exclude=exclude, relevant=relevant, seconds=seconds,
    )


def slug(text: str) -> str:
    """``"Ankle boot"`` -> ``"ankle-boot"``, ``"T-shirt/top"`` -> ``"t-shirt-top"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class SampleQuery:
    path: Path
    label: int | None  # class index in the given class names, when the name says it
    split: str | None  # the split and index the image was taken from, when the name says it
    index: int | None

    @property
    def name(self) -> str:
        return self.path.name


_SAMPLE_RE = re.compile(r"^(?P<cls>.+?)-(?P<split>train|val|test)(?P<index>\d+)$")


def parse_sample_name(filename: str, class_names: Sequence[str]) -> tuple[int | None, str | None, int | None]:
    """``(label, split, index)`` from a sample's file name ``<class>-<split><index>.<ext>``
    (``bag-test31374.png``): the class whose slug matches (``None`` if none of
    ``class_names`` does) and where the image came from. Also ``<class>.<ext>`` or
    ``<class>-anything.<ext>``: the label only."""
    stem = Path(filename).stem
    slugs = {slug(c): i for i, c in enumerate(class_names)}
    m = _SAMPLE_RE.match(stem)
    if m is not None:
        label = slugs.get(slug(m["cls"]))
        return label, m["split"], int(m["index"])
    s = slug(stem)
    if s in slugs:
        return slugs[s], None, None
    # the longest class slug that prefixes the name (``ankle-boot-2`` -> ankle-boot)
    best = max((c for c in slugs if s.startswith(c + "-")), key=len, default=None)
    return (slugs[best] if best is not None else None), None, None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def sample_queries(folder: str | Path, class_names: Sequence[str]) -> list[SampleQuery]:
    """The image files in ``folder`` (sorted by name), with what their names say."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            label, split, index = parse_sample_name(p.name, class_names)
            out.append(SampleQuery(p, label, split, index))
    return out
