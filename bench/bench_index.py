"""Benchmark: retrieval index latency, build time and recall (issue 5, item 2).

Target: single-query latency on 100k x 512 (exact) and on 1M x 128 (approximate), and the
approximate index's recall@10 against exact search: >= 0.95 at >= 10x the exact search's speed.

Data: synthetic clustered, L2-normalised embeddings with a fixed seed, shaped like a metric
learning model's output (``ClusteredData``): classes of ~100 items in groups of related
classes, each item its class centre plus variation along the class's own 16-dim subspace plus
isotropic noise; neighbouring classes overlap about as much as in a well-trained model's
embedding (the exact neighbours' class purity is reported). Queries are fresh items of the
same classes (not in the gallery). Latency is the median over many
queries searched one at a time (after a warm-up); builds and batches use ``--threads``
threads, single queries one (the exact case also reports faiss fanned out on all threads).

For the approximate case the bench builds exact search (the baseline and the ground truth),
IVF-Flat (nlist = 4 sqrt(N), nprobe tuned at build time to recall 0.95) and HNSW (M = 32,
efConstruction = 40, efSearch tuned likewise), then sweeps each one's search depth to show
the recall / latency trade-off. Writes ``bench/results/index.json`` (``index-quick.json``
with ``--quick``: every size 10x smaller, well under a minute).

    python bench/bench_index.py [--quick] [--threads N] [--skip-hnsw]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from common import cpu_model  # noqa: E402
from das_core.retrieval.index import RetrievalIndex, recall_at_k  # noqa: E402
from das_core.retrieval.knn import L2_KNN  # noqa: E402

TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0
K = 10


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "faiss_threads": threads,
        "faiss": faiss.__version__,
        "faiss_simd": faiss.get_compile_options(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


class ClusteredData:
    """Classes of ~100 items in groups of ~10 related classes (like bird species in families):
    a class centre is its group's centre plus an offset of norm ``separation``; an item is its
    class centre plus variation of norm ``spread`` along the class's own ``intrinsic``-dim
    subspace plus isotropic noise of norm ``noise``, L2-normalised. The defaults make a
    gallery about as separable as a well-trained model's (``class_purity`` in the results)."""

    def __init__(
        self,
        dim: int,
        classes: int,
        seed: int,
        *,
        per_group: int = 10,
        intrinsic: int = 16,
        separation: float = 0.12,
        spread: float = 0.5,
        noise: float = 0.3,
    ):
        self.rng = np.random.default_rng(seed)
        self.dim, self.classes, self.spread, self.noise = dim, classes, spread, noise
        groups = max(1, classes // per_group)
        g = unit(self.rng.standard_normal((groups, dim)).astype(np.float32))
        offsets = self.rng.standard_normal((classes, dim)).astype(np.float32) / np.sqrt(dim)
        self.centres = unit(g[self.rng.integers(0, groups, classes)] + separation * offsets)
        b = self.rng.standard_normal((classes, intrinsic, dim)).astype(np.float32)
        self.bases = b / np.sqrt(intrinsic * dim)  # z @ basis has norm ~ 1
        self.description = {
            "classes": classes,
            "classes_per_group": per_group,
            "intrinsic_dim": intrinsic,
            "separation": separation,
            "spread": spread,
            "noise": noise,
            "seed": seed,
        }

    def sample(self, n: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((n, self.dim), np.float32)
        labels = self.rng.integers(0, self.classes, n)
        for start in range(0, n, chunk):
            y = labels[start : start + chunk]
            z = self.rng.standard_normal((len(y), self.bases.shape[1])).astype(np.float32)
            v = self.centres[y] + self.spread * np.einsum("mr,mrd->md", z, self.bases[y])
            v += (self.noise / np.sqrt(self.dim)) * self.rng.standard_normal((len(y), self.dim)).astype(np.float32)
            out[start : start + len(y)] = unit(v)
        return out, labels


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def single_query_latency(index: RetrievalIndex, queries: np.ndarray, warmup: int = 5) -> float:
    """Median seconds of one ``search(query, K)`` call, queries one at a time."""
    for q in queries[:warmup]:
        index.search(q, K)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q, K)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_build(x: np.ndarray, kind: str, params: dict[str, Any] | None, threads: int) -> RetrievalIndex:
    t0 = time.perf_counter()
    index = RetrievalIndex.build(x, kind=kind, params=params, threads=threads, target_recall=TARGET_RECALL)
    print(f"  built {kind:<5} in {time.perf_counter() - t0:7.1f} s  {index.params}", flush=True)
    return index


def measure(index: RetrievalIndex, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    found = index.search(queries, K)[1]
    return {
        "recall@10": round(recall_at_k(found, truth), 4),
        "latency_ms": round(1000 * single_query_latency(index, queries), 4),
    }


def exact_case(n: int, dim: int, n_queries: int, threads: int, seed: int) -> dict[str, Any]:
    print(f"exact: {n} x {dim}", flush=True)
    data = ClusteredData(dim, max(10, n // 100), seed)
    x, queries = data.sample(n)[0], data.sample(n_queries)[0]
    index = timed_build(x, "flat", None, threads)
    result = {
        "gallery": [n, dim],
        "data": data.description,
        "kind": "flat",
        "build_seconds": round(index.build_seconds, 3),
        "latency_ms": round(1000 * single_query_latency(index, queries), 4),
        "queries": n_queries,
        "latency_ms_all_threads": round(1000 * fanned_out_latency(index, queries), 4),
    }
    print(f"  {result}", flush=True)
    return result


def fanned_out_latency(index: RetrievalIndex, queries: np.ndarray) -> float:
    """Median single-query latency of the raw faiss index on all ``index.threads`` threads
    (what ``RetrievalIndex.search`` avoids by searching small batches on one thread)."""
    faiss.omp_set_num_threads(index.threads)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.index.search(q.reshape(1, -1), K)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep(index: RetrievalIndex, name: str, values: list[int], queries: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    tuned = index.params[name]
    for v in values:
        index.set_search_depth(v)
        rows.append({name: v, **measure(index, queries, truth)})
        print(f"    {name}={v:<4} {rows[-1]}", flush=True)
    index.set_search_depth(tuned)
    return rows


def approx_case(n: int, dim: int, n_queries: int, threads: int, seed: int, hnsw: bool) -> dict[str, Any]:
    print(f"approximate: {n} x {dim}", flush=True)
    data = ClusteredData(dim, max(10, n // 100), seed + 1)
    (x, labels), (queries, query_labels) = data.sample(n), data.sample(n_queries)
    t0 = time.perf_counter()
    truth = L2_KNN(queries, x, K)[1]
    print(f"  ground truth in {time.perf_counter() - t0:.1f} s", flush=True)
    # How separable the data is: the share of exact neighbours in the query's class.
    purity = {"R@1": round(float((labels[truth[:, 0]] == query_labels).mean()), 3)}
    purity["same_class@10"] = round(float((labels[truth] == query_labels[:, None]).mean()), 3)
    print(f"  class purity of exact neighbours: {purity}", flush=True)
    result: dict[str, Any] = {
        "gallery": [n, dim],
        "data": {**data.description, "class_purity": purity},
        "queries": n_queries,
        "k": K,
    }

    flat = timed_build(x, "flat", None, threads)
    result["exact"] = {"build_seconds": round(flat.build_seconds, 3), **measure(flat, queries, truth)}
    exact_ms = result["exact"]["latency_ms"]
    del flat
    gc.collect()

    kinds: list[tuple[str, str, list[int]]] = [("ivf", "nprobe", [4, 8, 16, 32, 64, 128])]
    if hnsw:
        kinds.append(("hnsw", "efSearch", [16, 32, 64, 128, 256]))
    for kind, depth, values in kinds:
        index = timed_build(x, kind, None, threads)
        row = {"build_seconds": round(index.build_seconds, 3), "params": dict(index.params), **measure(index, queries, truth)}
        row["speedup_vs_exact"] = round(exact_ms / row["latency_ms"], 1)
        row["meets_target"] = row["recall@10"] >= TARGET_RECALL and row["speedup_vs_exact"] >= TARGET_SPEEDUP
        print(f"  {kind} tuned: {row}", flush=True)
        trade = sweep(index, depth, values, queries, truth)
        for r in trade:
            r["speedup_vs_exact"] = round(exact_ms / r["latency_ms"], 1)
        row["sweep"] = trade
        result[kind] = row
        del index
        gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller galleries (< 60 s)")
    ap.add_argument("--threads", type=int, default=2, help="faiss threads (default 2)")
    ap.add_argument("--queries", type=int, default=None, help="queries timed one at a time (default 300)")
    ap.add_argument("--skip-hnsw", action="store_true", help="do not build the HNSW comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    scale = 10 if args.quick else 1
    n_queries = args.queries or 300
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "retrieval index",
        "quick": args.quick,
        "target": {"recall@10": TARGET_RECALL, "speedup_vs_exact": TARGET_SPEEDUP},
        "machine": machine_info(args.threads),
    }
    report["exact"] = exact_case(100_000 // scale, 512, n_queries, args.threads, args.seed)
    report["approximate"] = approx_case(1_000_000 // scale, 128, n_queries, args.threads, args.seed, not args.skip_hnsw)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started, 1)

    out = args.out or ROOT / "bench" / "results" / ("index-quick.json" if args.quick else "index.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
