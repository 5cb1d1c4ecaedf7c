"""Replay a fixed-shape CUDA computation as one CUDA graph instead of ~100 kernel launches.

A small cache keyed by the caller (shape, dtype, device, addresses of the state it writes):
the first call with a key runs eagerly; the second runs eagerly on a side stream (the
warm-up ``torch.cuda.graph`` asks for) and captures the same computation; later calls
copy their inputs into the captured ones and replay. A capture that fails leaves that key
eager for good (the call that tried it already has its eager result), with one warning.
No host synchronisation anywhere (no ``torch.cuda.synchronize``, unlike the
``torch.cuda.graph`` context manager, which also empties the allocator's cache).

``torch.cuda.make_graphed_callables`` is not used: it would run the function several
times for warm-up, and the function here updates state (DAS's banks) on every call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    inputs: list[Tensor] = field(default_factory=list)
    output: Tensor | None = None
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    failed: bool = False


class GraphCache:
    """Capture-and-replay of ``fn(*inputs) -> Tensor`` per key (at most ``max_entries`` keys,
    least recently used dropped). ``fn`` must run only fixed-shape, synchronisation-free CUDA
    ops on its inputs and on tensors whose addresses are part of the key."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def captured(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.graph is not None

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphCache:  # graphs are not copyable
        return GraphCache(self.max_entries)

    def __getstate__(self) -> dict[str, Any]:  # nor picklable: a copy starts empty
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_entries"])  # type: ignore[misc]

    def run(self, key: Hashable, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        """``fn(*inputs)``, eagerly or by replaying its graph. A replayed result lives in the
        graph's memory: the caller must use (copy) it before the next call with this key."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return fn(*inputs)
        self._entries.move_to_end(key)
        if entry.failed:
            return fn(*inputs)
        if entry.graph is None:
            return self._capture(key, entry, fn, inputs)
        for static, new in zip(entry.inputs, inputs, strict=True):
            static.copy_(new)
        entry.graph.replay()
        assert entry.output is not None
        return entry.output

    def _capture(self, key: Hashable, entry: _Entry, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
        device = inputs[0].device
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        static = [t.detach().clone() for t in inputs]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = fn(*static)  # this call's result, and the warm-up on the capture stream
            graph = torch.cuda.CUDAGraph()
            try:
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    captured = fn(*static)
                finally:
                    graph.capture_end()
            except Exception as err:  # any failure: stay eager (this call is already done)
                entry.failed = True
                log.warning("CUDA graph capture failed for %r, running eagerly: %s", key, err)
                captured = None
        main.wait_stream(side)
        out.record_stream(main)  # allocated on the side stream, read on the main one
        if captured is not None:
            entry.inputs, entry.output, entry.graph = static, captured, graph
        return out
