"""Where and on how many threads the library computes: the one device rule and the one thread
policy every module uses.

Device: ``resolve_device`` turns ``auto`` / ``cpu`` / ``cuda[:i]`` (or ``None``, meaning
``auto``) into a ``torch.device``; ``auto`` is CUDA when a GPU is visible, else the CPU, and
asking for CUDA without a GPU is a ``DeviceError``.

Threads: faiss and torch share one OpenMP runtime, so a thread count set for one is the other's
too. ``thread_limit(n)`` sets both for a block and restores both after (left set, a one-thread
faiss query would slow every later torch op in the process and change its float reductions,
hence training's exact numbers). ``default_threads`` is the count faiss searches use unless told
(``$DAS_FAISS_THREADS``, else the usable cores, at most 8); ``cpu_cores`` the usable cores.
torch and faiss are imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeviceError",
    "DeviceLike",
    "cpu_cores",
    "cuda_available",
    "default_threads",
    "resolve_device",
    "resolve_threads",
    "thread_limit",
]

DeviceLike: TypeAlias = "str | torch.device | None"


class DeviceError(ValueError, RuntimeError):
    """The requested device is not available or not a device (a ``ValueError``, as any bad
    argument; also a ``RuntimeError``, as it was first)."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``auto`` (or ``None``): CUDA when a GPU is visible, else the CPU. ``cpu``, ``cuda`` or
    ``cuda:i`` (or a ``torch.device``) as given; CUDA without a GPU, or any other name, is a
    ``DeviceError``."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda") from exc
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")
    if dev.type == "cuda" and not cuda_available():
        raise DeviceError(
            f"device {device!r} was requested but CUDA is not available (no GPU is visible to torch); "
            "use cpu or auto"
        )
    return dev


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$DAS_FAISS_THREADS``, else the usable CPU cores (at most 8)."""
    env = os.environ.get("DAS_FAISS_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, cpu_cores()))


def resolve_threads(threads: int | None = None) -> int:
    """The thread count to use: ``threads`` when positive, else ``default_threads()``."""
    return threads if threads is not None and threads > 0 else default_threads()


@contextlib.contextmanager
def thread_limit(n: int | None) -> Iterator[None]:
    """Run faiss and torch on ``n`` threads for the block, then restore both counts
    (``None``: leave them alone)."""
    if n is None:
        yield
        return
    import faiss
    import torch

    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)
