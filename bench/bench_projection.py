"""Benchmark: embedding-space maps (UMAP fit on a capped sample + placement) on CPU.

Issue 5, item 3: map time for 10k / 50k / 200k points, and the placement time of 1,000
produced points against a refit of real + produced (ratio). Also:

* ``cold_demo``: a fresh interpreter does what the Explore page does the first time it opens
  the demo (35,000 Fashion-MNIST test images, 128-d small CNN): load the split, embed it,
  import umap and fit the map, numba's first-call compilation included (umap-learn's
  functions are not disk-cached, so every new process compiles them);
* ``max_fit_sweep``: fit time and map quality against the cap, on 35,000 demo-like points
  (the data for choosing ``DEFAULT_MAX_FIT``);
* ``slider_move``: what one slider move costs on the demo-sized map (produce from 250
  anchors x T=4, place, gap fill, honesty).

Data: synthetic clustered, L2-normalised 128-d embeddings (fixed seed; each class a mixture
of three Gaussian blobs; 10-NN label agreement ~0.88 in the original space). Threads: 1
(``OMP_NUM_THREADS=1``; the UMAP layout runs single-threaded anyway). Writes
``bench/results/projection.json`` (``--quick``: ``projection-quick.json``: 10k points and a
small refit only, under a minute).

    python bench/bench_projection.py [--quick] [--skip-cold] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import cpu_model  # noqa: E402
from das_core.explorer import umap_fit  # noqa: E402
from das_core.explorer.umap_fit import (  # noqa: E402
    DEFAULT_MAX_FIT,
    MapParams,
    fit_map,
    joint_map,
    map_placer,
    place_points,
)
from das_core.retrieval.knn import EXPLORER_KNN  # noqa: E402

DIM = 128
N_PRODUCED = 1000


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "threads": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
        },
        "versions": umap_fit.library_versions(),
        "load_average": list(os.getloadavg()),
    }


def synthetic(n: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised ``(n, 128)`` embeddings: each class three blobs, noisy enough
    that ~88 % of the 10 nearest neighbours share the label (a decent trained model)."""
    rng = np.random.default_rng(seed)
    class_centers = rng.normal(size=(classes, DIM))
    sub = class_centers[:, None, :] + 0.6 * rng.normal(size=(classes, 3, DIM))
    labels = rng.integers(0, classes, n)
    blob = rng.integers(0, 3, n)
    x = sub[labels, blob] + 2.95 * rng.normal(size=(n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def produced_points(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1,000 DAS-produced points: 250 anchors (50 per class) x T = 4, r_b = 0.3, from a DAS
    state computed over the split."""
    import torch

    from das_core.explorer.analysis import compute_das_state, select_anchors

    classes = int(y.max()) + 1
    das = compute_das_state(x, y, classes, batch_size=100, samples_per_class=20, num_batches=50, seed=seed)
    anchors = select_anchors(y, N_PRODUCED // (4 * classes), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    p = das.produce(
        torch.from_numpy(x[anchors]), torch.from_numpy(y[anchors]), r_b=0.3, num_produce=4, generator=gen
    )
    return p.numpy(), np.tile(y[anchors], 4), anchors


def timed(fn: Any, *args: Any, repeat: int = 1, **kw: Any) -> tuple[float, Any]:
    """Median seconds over ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def label_agreement(coords: np.ndarray, labels: np.ndarray, k: int = 10, sample: int = 5000) -> float:
    """Share of the k nearest map neighbours with the same label (map quality, on a sample)."""
    rng = np.random.default_rng(0)
    q = rng.choice(len(coords), size=min(sample, len(coords)), replace=False)
    _, idx = EXPLORER_KNN(coords[q], coords, k + 1)
    return float((labels[idx[:, 1:]] == labels[q, None]).mean())


COLD_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
max_fit = int(sys.argv[2])
embed_threads = int(sys.argv[3])
out = {"embed_threads": embed_threads}
import numpy as np
from das_core.explorer.umap_fit import MapParams, fit_map
try:
    from das_core.data import load_splits
    from das_core.models.embed import embed_dataset
    from das_core.models import build_model
    from das_core.training.presets import get_preset
    t = time.perf_counter()
    split = load_splits("fashion-mnist").test
    out["load_split_s"] = time.perf_counter() - t
    import torch
    torch.set_num_threads(embed_threads)  # as the app runs (make run: 2 threads)
    t = time.perf_counter()
    model = build_model(get_preset("cpu-demo").config(), pretrained=False).eval()
    emb, labels = embed_dataset(model, split, batch_size=256)
    out["embed_s"] = time.perf_counter() - t
    torch.set_num_threads(1)
    out["points"] = int(len(emb))
    out["embedding_source"] = "Fashion-MNIST test split (classes 5-9), small-cnn 128-d, untrained weights"
except Exception as exc:  # no Fashion-MNIST here: time the map alone on synthetic data
    sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
    from bench_projection import synthetic
    emb, labels = synthetic(35000)
    out["embedding_source"] = f"synthetic (Fashion-MNIST unavailable: {exc})"
    out["points"] = int(len(emb))
t = time.perf_counter()
import umap  # noqa: F401
out["import_umap_s"] = time.perf_counter() - t
from das_core.explorer.umap_fit import warm_up
out["compile_s"] = warm_up()  # numba compilation of umap's layout, on a tiny fit
t = time.perf_counter()
res = fit_map(emb, labels=labels, params=MapParams(max_fit=max_fit))
out["fit_map_s"] = time.perf_counter() - t
out["fitted"] = res.n_fitted
out["total_cold_s"] = time.perf_counter() - t0
out["map_part_s"] = out["import_umap_s"] + out["compile_s"] + out["fit_map_s"]
print("RESULT " + json.dumps(out))
"""


def cold_demo(max_fit: int, embed_threads: int) -> dict[str, Any]:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", COLD_SCRIPT, str(ROOT), str(max_fit), str(embed_threads)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, Any] = json.loads(line[7:])
            res["max_fit"] = max_fit
            return {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
    return {"error": proc.stderr[-2000:]}


def size_run(n: int, max_fit: int, *, refit_max_fit: int, seed: int = 0) -> dict[str, Any]:
    x, y = synthetic(n, seed=seed)
    fit_s, res = timed(fit_map, x, labels=y, params=MapParams(max_fit=max_fit), seed=seed)
    prod, prod_y, _ = produced_points(x, y, seed=seed)
    # placement as the app does it: into the fitted points (index built, then placed)
    place_s, _ = timed(lambda: map_placer(res, x)(prod), repeat=5)
    place_all_s, _ = timed(place_points, res.coords, x, prod, repeat=3)
    refit_s, _ = timed(joint_map, x, prod, labels=y, params=MapParams(max_fit=refit_max_fit), seed=seed)
    return {
        "points": n,
        "max_fit": max_fit,
        "fitted": res.n_fitted,
        "fit_map_s": round(fit_s, 2),
        "map_label_agreement@10": round(label_agreement(res.coords, y), 3),
        "produced": len(prod),
        "place_produced_ms": round(place_s * 1000, 1),
        "place_produced_against_all_points_ms": round(place_all_s * 1000, 1),
        "refit_real_plus_produced_s": round(refit_s, 2),
        "refit_fitted_points": min(n + len(prod), refit_max_fit),
        "refit_over_place_ratio": round(refit_s / place_s, 1),
    }


def max_fit_sweep(caps: list[int]) -> list[dict[str, Any]]:
    x, y = synthetic(35000, seed=1)
    rows = []
    for cap in caps:
        s, res = timed(fit_map, x, labels=y, max_fit=cap, seed=0)
        rows.append(
            {
                "points": len(x),
                "max_fit": cap,
                "fit_map_s": round(s, 2),
                "map_label_agreement@10": round(label_agreement(res.coords, y), 3),
            }
        )
        print(f"  max_fit {cap:>6}: {s:6.1f} s", flush=True)
    return rows


def slider_move(n: int = 35000) -> dict[str, Any]:
    """One slider move on a demo-sized map: produce, place, gap fill, honesty."""
    import torch

    from das_core.explorer.analysis import (
        compute_das_state,
        gap_fill,
        gap_reference,
        produced_honesty,
        select_anchors,
    )

    x, y = synthetic(n, seed=2)
    res = fit_map(x, labels=y, seed=0)
    das = compute_das_state(x, y, 5, batch_size=100, samples_per_class=20, seed=0)
    anchors = select_anchors(y, 50)
    ref_s, ref = timed(gap_reference, x, y, anchors=anchors)
    xa, ya = torch.from_numpy(x[anchors]), torch.from_numpy(y[anchors])
    prod_s, p = timed(lambda: das.produce(xa, ya, r_b=0.3, num_produce=4).numpy(), repeat=5)
    py = np.tile(y[anchors], 4)
    placer = map_placer(res, x)  # built once per map (the app keeps it)
    place_s, _ = timed(placer, p, repeat=5)
    gap_s, g = timed(gap_fill, x, y, p, py, reference=ref, repeat=5)
    hon_s, h = timed(produced_honesty, x, y, p, py, produced_from=np.tile(anchors, 4), repeat=3)
    return {
        "points": n,
        "anchors": len(anchors),
        "produced": len(p),
        "produce_ms": round(prod_s * 1000, 1),
        "place_ms": round(place_s * 1000, 1),
        "gap_fill_ms": round(gap_s * 1000, 1),
        "honesty_ms": round(hon_s * 1000, 1),
        "per_move_ms": round((prod_s + place_s + gap_s + hon_s) * 1000, 1),
        "gap_reference_once_ms": round(ref_s * 1000, 1),
        "gap_fill": round(g["overall"], 4),
        "fraction_own_closer": round(h["fraction_own_closer"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="10k points and a small refit only (< 1 min)")
    ap.add_argument("--skip-cold", action="store_true", help="skip the fresh-process demo timing")
    ap.add_argument(
        "--embed-threads", type=int, default=2, help="torch threads for the cold demo's embedding"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out_path = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("projection-quick.json" if args.quick else "projection.json")
    )
    result: dict[str, Any] = {"machine": machine(), "default_max_fit": DEFAULT_MAX_FIT, "quick": args.quick}
    t_all = time.perf_counter()
    if not args.quick and not args.skip_cold:
        print("cold demo (fresh process: load, embed, import umap, compile, fit) ...", flush=True)
        result["cold_demo"] = cold_demo(DEFAULT_MAX_FIT, args.embed_threads)
        print(" ", result["cold_demo"], flush=True)
    print("warm-up (numba compilation) ...", flush=True)
    result["warm_up_s"] = round(umap_fit.warm_up(), 2)
    sizes = [10_000] if args.quick else [10_000, 50_000, 200_000]
    result["sizes"] = []
    for n in sizes:
        print(f"size {n:,} ...", flush=True)
        row = size_run(n, DEFAULT_MAX_FIT, refit_max_fit=5_000 if args.quick else DEFAULT_MAX_FIT)
        print(" ", row, flush=True)
        result["sizes"].append(row)
    if not args.quick:
        print("max_fit sweep on 35,000 points ...", flush=True)
        result["max_fit_sweep"] = max_fit_sweep([5_000, 10_000, 15_000, 20_000, 35_000])
        print("slider move on 35,000 points ...", flush=True)
        result["slider_move"] = slider_move()
        print(" ", result["slider_move"], flush=True)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
