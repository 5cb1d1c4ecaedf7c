"""Issues 5 and 9: GPU training throughput (runs only where CUDA is available).

ResNet-50 at 224 px, batch 112 (56 classes x 2), 512-d, multi-similarity + DAS, AMP (bf16 where
supported), channels_last, fused Adam (as the trainer uses on CUDA). Reports, with CUDA events,
  (a) the model's forward + backward alone (the reference, same device, same process),
  (b) the full training step: device-resident uint8 batch -> batched augmentation -> forward ->
      DAS -> miner -> loss -> backward -> optimiser step,
their ratio (target >= 0.9), DAS's own share of the step (target <= 1%), and the criterion and
the optimiser step alone. The measurement is ``bench/gpu_check.py``'s ``resnet_step``
(``bench/gpu_check.sh`` runs it with the CUDA tests and the DAS benchmarks). Without a GPU it
writes a "skipped" result and says so.

    python bench/bench_gpu.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse

from common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: skipped (no CUDA device on this machine)")
        write_result("gpu", {"skipped": True, "reason": "no CUDA device"})
        return
    from gpu_check import resnet_step

    res = resnet_step(torch.device("cuda"), steps=10 if args.quick else args.steps)
    res["device"] = torch.cuda.get_device_name(0)
    if "ratio_full_step_over_forward_backward" in res:  # the names bench/summarise.py reads
        res["ratio"] = res["ratio_full_step_over_forward_backward"]
    print(res)
    write_result("gpu", res)


if __name__ == "__main__":
    main()
