"""Issue 9: the dense triplet criterion (das_core/training/triplet_dense.py) vs today's index lists on the CPU.

Mining (our batch miners) and triplet loss, forward and backward, on fixed L2-normalised
float32 embeddings, timed for both paths in the same process, interleaved call by call (CPU time of
the thread, median of 50 calls), on batches the
size of a plain and a DAS-enlarged (1 + T = 4) batch of 112 at 2 per class. "index lists":
``miner(e, y)`` (its boolean-indexed triplets) into PML's ``TripletMarginLoss``; "dense": the
criterion's CPU path (one slot per anchor, compacted once for the sum); "fixed": its CUDA
path (no data-dependent shape) run on the CPU, for information. Ratio = dense / index lists
(< 1: the dense one is faster). Decides ``das_core.training.losses.DENSE_TRIPLET_ON_CPU``;
on CUDA the dense one is always used (it saves the host synchronisations).

    python bench/bench_triplet_dense.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import write_result


def main(argv: list[str] | None = None) -> int:
    import torch

    from das_core.training.config import TrainConfig
    from das_core.training.losses import build_criterion
    from das_core.training.triplet_dense import DenseTriplet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 10 if args.quick else 50
    cases = [(m, "plain") for m in ("semi-hard", "random", "soft-hard", "distance-weighted")]
    cases.append(("semi-hard", "squared"))
    rows: list[dict[str, Any]] = []
    for miner_name, form in cases:
        cfg = TrainConfig.from_mapping({"loss": "triplet", "miner": miner_name, "triplet_form": form})
        crit = build_criterion(cfg, 10)
        dense = crit.dense_triplet
        assert dense is not None and crit.miner is not None
        fixed = DenseTriplet(dense.miner, dense.distance, dense.margin, dense.nonzero_mean, fixed_shape=True)
        loss, miner = crit.loss, crit.miner
        for n in (112, 448):
            gen = torch.Generator().manual_seed(n)
            labels = torch.arange(n // 2).repeat_interleave(2)
            emb = torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=1)

            def lists(emb: Any = emb, labels: Any = labels, loss: Any = loss, miner: Any = miner) -> None:
                e = emb.clone().requires_grad_()
                loss(e, labels, miner(e, labels)).backward()

            def run(fn: Any, emb: Any = emb, labels: Any = labels) -> None:
                e = emb.clone().requires_grad_()
                fn(e, labels).backward()

            fns = {"lists": lists, "dense": lambda d=dense: run(d), "fixed": lambda f=fixed: run(f)}
            for fn in fns.values():  # warm-up
                fn()
                fn()
            times: dict[str, list[float]] = {k: [] for k in fns}
            # Interleaved call by call, timed in this thread's CPU time: the machine is shared,
            # and waiting for a core (or drift) must not land on one path only.
            for _ in range(repeats):
                for key, fn in fns.items():
                    t = time.thread_time()
                    fn()
                    times[key].append(time.thread_time() - t)
            times = {k: [statistics.median(v)] for k, v in times.items()}
            tl, td, tf = (min(times[k]) for k in ("lists", "dense", "fixed"))
            rows.append({"n": n, "dim": 512, "miner": miner_name, "triplet_form": form,
                         "ms_index_lists": 1e3 * tl, "ms_dense": 1e3 * td, "ms_fixed_shape": 1e3 * tf,
                         "ratio_dense_over_index_lists": td / tl, "ratio_fixed_over_index_lists": tf / tl})
            print(f"N={n:4d} {miner_name:17s} {form:7s} index lists {1e3 * tl:6.2f} ms  dense {1e3 * td:6.2f} ms "
                  f"(ratio {td / tl:.2f})  fixed-shape {1e3 * tf:6.2f} ms (ratio {tf / tl:.2f})")
    worst = max(r["ratio_dense_over_index_lists"] for r in rows)
    best = min(r["ratio_dense_over_index_lists"] for r in rows)
    print(f"dense / index lists: {best:.2f}-{worst:.2f}")
    path = write_result("triplet_dense_quick" if args.quick else "triplet_dense",
                        {"threads": args.threads, "rows": rows, "ratio_min": best, "ratio_max": worst})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
