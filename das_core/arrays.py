"""Input checks for the arrays the library computes on: embeddings (float32 matrices), labels
(int64 vectors) and per-query gallery exclusions (and the counts that size them). Every public function that takes such an
array checks it here, at the edge, so that a bad array fails with one message that names the
argument and the problem, instead of deep inside faiss, torch or numpy.

Torch tensors are accepted wherever an array is (detached and copied to the CPU).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = ["ArrayInput", "FloatArray", "IndexArray", "as_exclude", "as_labels", "as_matrix", "check_positive_int"]

FloatArray: TypeAlias = npt.NDArray[np.float32]
IndexArray: TypeAlias = npt.NDArray[np.int64]
ArrayInput: TypeAlias = "npt.ArrayLike | torch.Tensor"


def _numpy(x: ArrayInput, name: str, kinds: str, what: str) -> np.ndarray:
    """``x`` as a numpy array whose dtype kind is one of ``kinds`` (a tensor is detached and
    brought to the CPU; float tensors of other widths become float32)."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex() or (t.dtype == torch.bool and "b" not in kinds):
            raise ValueError(f"{name} must be {what}, got dtype {t.dtype}")
        if t.is_floating_point():
            if "f" not in kinds:
                raise ValueError(f"{name} must be {what}, got dtype {t.dtype}")
            t = t.to(dtype=torch.float32)
        arr: np.ndarray = t.to(device="cpu").numpy()
        return arr
    arr = np.asarray(x)
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {what}, got dtype {arr.dtype}")
    return arr


def as_matrix(
    x: ArrayInput,
    name: str = "embeddings",
    *,
    dim: int | None = None,
    allow_vector: bool = False,
    allow_empty: bool = True,
    finite: bool = True,
) -> FloatArray:
    """``x`` as a C-contiguous float32 ``(n, d)`` matrix of real numbers.

    ``dim``: the number of columns it must have. ``allow_vector``: a 1-D ``(d,)`` vector is
    taken as one row (say so with ``np.ndim(x) == 1`` to give 1-D results back).
    ``allow_empty=False`` refuses zero rows or columns; ``finite`` refuses NaN and infinities
    (including values too large for float32). Raises ``ValueError`` naming ``name``.
    """
    arr = _numpy(x, name, "fiu", "real numbers")
    shape = tuple(arr.shape)
    if allow_vector and arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {tuple(arr.shape)}")
    if not allow_empty and (arr.shape[0] == 0 or arr.shape[1] == 0):
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have dimension {arr.shape[1]} but {dim} is expected (shape {shape})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if finite and not np.isfinite(out).all():
        raise ValueError(f"{name} contain NaN or inf (or values too large for float32)")
    return out


def as_labels(y: ArrayInput, n: int | None = None, name: str = "labels", *, allow_empty: bool = True) -> IndexArray:
    """Integer labels of shape ``(n,)`` or ``(n, 1)`` as an int64 vector; ``n``: the number of
    items they must label (None: any). Raises ``ValueError`` naming ``name``."""
    arr = _numpy(y, name, "iub", "integers")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} items")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return arr.astype(np.int64, copy=False)


def as_exclude(exclude: int | ArrayInput | None, n_queries: int, gallery_size: int) -> IndexArray | None:
    """One gallery index per query to leave out of its results (-1: none), from an array of
    ``n_queries`` indices or one index for every query; None stays None."""
    if exclude is None:
        return None
    raw = _numpy(exclude, "exclude", "iub", "integers")
    ex = as_labels(raw.reshape(-1) if raw.ndim == 0 else raw, None, "exclude")
    if ex.size == 1 and n_queries != 1:
        ex = np.full(n_queries, int(ex[0]), dtype=np.int64)
    if ex.shape != (n_queries,):
        raise ValueError(f"exclude must hold one gallery index per query ({n_queries}), got {ex.size}")
    if ((ex < -1) | (ex >= gallery_size)).any():
        raise ValueError("exclude entries must be gallery indices or -1")
    return ex


def check_positive_int(value: int | None, name: str) -> None:
    """``value`` is None or an integer >= 1; else a ``ValueError`` naming ``name``."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
