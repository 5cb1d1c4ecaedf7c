"""Issue 5: GPU training throughput (runs only where CUDA is available).

ResNet-50 at 224 px, batch 112 (56 classes x 2), 512-d, multi-similarity + DAS, AMP (bf16 where
supported), channels_last. Reports images per second of
  (a) the model's forward + backward alone (the reference, same device, same process),
  (b) the full training step: device-resident uint8 batch -> batched augmentation -> forward ->
      DAS -> miner -> loss -> backward -> optimiser step,
and their ratio (target >= 0.8), plus DAS's own share of the step (target <= 5%), measured with
CUDA events. Without a GPU it writes a "skipped" result and says so.

    python bench/bench_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
from typing import Any

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
    from das_core.config import TrainConfig
    from das_core.losses import build_criterion
    from das_core.models import build_model

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    cfg = TrainConfig.from_mapping({"dataset": "cub200", "backbone": "resnet50", "pretrained": False, "embedding_dim": 512,
                                    "pooling": "avg+max", "loss": "multi-similarity", "miner": "multi-similarity",
                                    "das": True, "das_topk": 8, "batch_size": 112, "samples_per_class": 2})
    model = build_model(cfg).to(dev).to(memory_format=torch.channels_last)
    crit = build_criterion(cfg, 100).to(dev)
    opt = torch.optim.Adam(list(model.parameters()) + list(crit.parameters()), lr=1e-5)
    prep = model.preprocessing
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raw = torch.randint(0, 256, (112, 3, 256, 256), dtype=torch.uint8, device=dev)
    labels = torch.arange(56, device=dev).repeat_interleave(2)
    x_fixed = prep.train_batch(raw).contiguous(memory_format=torch.channels_last)
    steps = 10 if args.quick else args.steps

    def timed(fn: Any) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps

    def fwd_bwd() -> None:
        with torch.autocast("cuda", dtype=amp):
            emb = model(x_fixed)
        emb.float().sum().backward()

    das_time = {"ms": 0.0}

    def full_step() -> None:
        x = prep.train_batch(raw).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp):
            emb = model(x)
        loss = crit(emb.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_ref = timed(fwd_bwd)
    t_full = timed(full_step)
    assert crit.das is not None
    emb = torch.nn.functional.normalize(torch.randn(112, 512, device=dev), dim=1)
    t_das = timed(lambda: crit.das(emb, labels))
    das_time["ms"] = 1000 * t_das
    res = {
        "device": torch.cuda.get_device_name(0),
        "images_per_s_forward_backward": 112 / t_ref,
        "images_per_s_full_step": 112 / t_full,
        "ratio": t_ref / t_full,
        "das_ms": 1000 * t_das,
        "das_share_of_step": t_das / t_full,
        "targets": {"ratio": ">= 0.8", "das_share": "<= 5%"},
    }
    print(res)
    write_result("gpu", res)


if __name__ == "__main__":
    main()
