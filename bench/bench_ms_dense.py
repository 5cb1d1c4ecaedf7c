"""Issue 9: the dense multi-similarity miner + loss (das_core/training/ms_dense.py) vs PML's on the CPU.

The criterion's forward and backward (mining, loss) on fixed L2-normalised float32
embeddings, timed for both implementations in the same process, interleaved, on batches the
size of a plain and a DAS-enlarged (1 + T = 4) batch of 112. Ratio = dense / PML (< 1: the
dense one is faster). Decides ``das_core.training.losses.DENSE_MS_ON_CPU``; on CUDA the dense one is
always used (it saves the host synchronisations, which a CPU run does not have).

    python bench/bench_ms_dense.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
from typing import Any

from common import median_time, write_result


def main(argv: list[str] | None = None) -> int:
    import torch
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    from das_core.training.ms_dense import dense_multi_similarity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 30
    loss, miner = MultiSimilarityLoss(), MultiSimilarityMiner(epsilon=0.1)
    rows: list[dict[str, Any]] = []
    for n, dim in ((112, 512), (448, 512)):
        for mined in (True, False):
            dense = dense_multi_similarity(loss, miner if mined else None)
            assert dense is not None
            gen = torch.Generator().manual_seed(n)
            labels = torch.arange(n // 2).repeat_interleave(2)
            emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)

            def pml(mined: bool = mined, emb: Any = emb, labels: Any = labels) -> None:
                e = emb.clone().requires_grad_()
                indices = miner(e, labels) if mined else None
                loss(e, labels, indices).backward()

            def dns(dense: Any = dense, emb: Any = emb, labels: Any = labels) -> None:
                e = emb.clone().requires_grad_()
                dense(e, labels).backward()

            t_pml, t_dense = [], []
            for _ in range(3):  # interleaved rounds: drift of the machine hits both alike
                t_pml.append(median_time(pml, repeats))
                t_dense.append(median_time(dns, repeats))
            tp, td = min(t_pml), min(t_dense)
            rows.append({"n": n, "dim": dim, "miner": "multi-similarity" if mined else "none",
                         "ms_pml": 1e3 * tp, "ms_dense": 1e3 * td, "ratio_dense_over_pml": td / tp})
            print(f"N={n:4d} miner={rows[-1]['miner']:17s} PML {1e3 * tp:7.2f} ms  dense {1e3 * td:7.2f} ms  "
                  f"ratio {td / tp:.2f}")
    path = write_result("ms_dense_quick" if args.quick else "ms_dense", {"threads": args.threads, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
