"""Running a model over a dataset: embeddings for evaluation, maps and retrieval."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from das_core.data.base import DMLDataset


class DeviceError(RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but no GPU is visible (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto"
        )
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def auto_workers(device: torch.device, requested: int = -1) -> int:
    """DataLoader workers: 0 on the CPU (the cores are busy training), up to 8 on CUDA."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module,
    dataset: DMLDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings float32 (N, d), labels int64 (N,))`` of ``dataset`` prepared with the
    model's own evaluation preprocessing. ``progress(done, total)`` is called per batch."""
    device = torch.device(device)
    from das_core.models.preprocessing import Preprocessing

    prep = model.preprocessing
    if not isinstance(prep, Preprocessing):
        raise TypeError("embed_dataset needs a model with a .preprocessing (an EmbeddingNet)")
    ds = dataset.with_transform(prep.eval_transform())
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    done = 0
    total = len(ds)
    try:
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            chunks.append(model(x).float().cpu().numpy())
            done += len(x)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    d = int(getattr(model, "embedding_dim", 0))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, d), dtype=np.float32)
    return emb.astype(np.float32, copy=False), dataset.labels.copy()
