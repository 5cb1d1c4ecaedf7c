"""Issue 2 check: our trainer (triplet + semi-hard, small CNN, Fashion-MNIST, 5 epochs)
against an off-the-shelf pytorch-metric-learning loop with the same network, data,
augmentation and seed. Both are scored by the same ``evaluate_embeddings`` on the 5
unseen test classes. Writes ``bench/results/pml_baseline.json``.

The PML loop is what its README shows: ``TripletMarginLoss(margin=0.2)`` +
``TripletMarginMiner(margin=0.2, type_of_triplets="semihard")`` + ``MPerClassSampler``,
Adam, plain ``for x, y in loader`` steps.

    python bench/bench_pml_baseline.py [--epochs 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

from common import machine_info, write_result


def pml_loop(epochs: int, seed: int) -> dict[str, float]:
    import torch
    from pytorch_metric_learning import losses, miners, samplers

    from das_core.data import load_splits
    from das_core.data.base import uint8_batch
    from das_core.models import build_model
    from das_core.models.embed import embed_dataset
    from das_core.retrieval.evaluation import evaluate_embeddings
    from das_core.training.config import TrainConfig

    cfg = TrainConfig.from_mapping({"dataset": "fashion-mnist", "seed": seed})
    splits = load_splits("fashion-mnist")
    torch.manual_seed(seed)
    model = build_model(cfg)
    prep = model.preprocessing
    loss_func = losses.TripletMarginLoss(margin=0.2)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    labels = splits.train.labels
    sampler = samplers.MPerClassSampler(labels, m=20, batch_size=100, length_before_new_iter=len(labels))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
    loader = torch.utils.data.DataLoader(torch.arange(len(labels)), batch_size=100, sampler=sampler)
    label_t = torch.from_numpy(labels)
    for _ in range(epochs):
        model.train()
        for idx in loader:
            x = prep.train_batch(uint8_batch(splits.train, idx.numpy()))
            emb = model(x)
            y = label_t[idx]
            loss = loss_func(emb, y, miner(emb, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    emb, lab = embed_dataset(model, splits.test)
    return evaluate_embeddings(emb, lab)


def ours(epochs: int, seed: int, out: str) -> dict[str, float]:
    from das_core.training.loop import train
    from das_core.training.presets import get_preset

    cfg = get_preset("cpu-demo").config(das=False, val_fraction=0.0, epochs=epochs, seed=seed, out=out, device="cpu")
    result = train(cfg, show_progress=False)
    test: dict[str, float] = result.last["test"]
    return test


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        ours_m = ours(args.epochs, args.seed, f"{tmp}/run")
        t_ours = time.time() - t
    t = time.time()
    pml_m = pml_loop(args.epochs, args.seed)
    t_pml = time.time() - t
    print(f"{'':<28}{'R@1':>8}{'MAP@R':>8}{'NMI':>8}{'F1':>8}{'seconds':>9}")
    for name, m, s in (("das_core trainer", ours_m, t_ours), ("pytorch-metric-learning loop", pml_m, t_pml)):
        print(f"{name:<28}" + "".join(f"{100 * m[k]:8.2f}" for k in ("R@1", "MAP@R", "NMI", "F1")) + f"{s:9.0f}")
    path = write_result(
        "pml_baseline",
        {
            "setting": f"Fashion-MNIST 0-4 train / 5-9 test, small CNN 128-d, triplet + semi-hard, batch 100 "
            f"(5 classes x 20), Adam 1e-3, {args.epochs} epochs, seed {args.seed}",
            "ours": ours_m,
            "pml": pml_m,
            "seconds": {"ours": t_ours, "pml": t_pml},
            "ours_at_least_pml_R@1": ours_m["R@1"] >= pml_m["R@1"],
        },
    )
    print(f"wrote {path}  ({machine_info()['cpu']})")


if __name__ == "__main__":
    main()
