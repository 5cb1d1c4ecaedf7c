"""The embedded demos, shipped in ``assets/demo/`` so that the app opens on a trained model
with no training and no download: pairs of small-CNN checkpoints trained by this CLI, one with
DAS and one without,

- on the Fashion-MNIST zero-shot split (classes 0-4 train, 5-9 test: few classes, many images);
- on ``emoji-styles`` (about 600 training classes of 5-8 vendor styles each: many classes,
  few images, the regime DAS is built for). Its images come from the installed dataset
  (``make data``), not from the checkpoint.

``python -m das_core demo build`` (``make demo-model``) regenerates them with the same seed
and therefore the same metrics; ``--dataset NAME`` rebuilds one pair.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from das_core.store.layout import RunLayout, demo_metrics
from das_core.store.runs import REPO_ROOT
from das_core.training.presets import get_preset

log = logging.getLogger(__name__)

DEMO_DIR = REPO_ROOT / "assets" / "demo"
DEMO_SEED = 0
# emoji-styles: grey 32-px small CNN, 2 images per class in a batch as in the paper's recipe,
# a class-disjoint validation split for model selection
EMOJI_DEMO: dict[str, object] = {
    "dataset": "emoji-styles", "image_size": 32, "embedding_dim": 64, "batch_size": 120, "samples_per_class": 2,
    "epochs": 15, "lr": 1e-3, "val_fraction": 0.0, "val_classes": 60,
}
# name -> overrides of the cpu-demo preset (the first is the app's default checkpoint)
DEMO_MODELS: dict[str, dict[str, object]] = {
    "fashion-mnist-das": {"das": True},
    "fashion-mnist-baseline": {"das": False},
    "emoji-styles-das": {**EMOJI_DEMO, "das": True},
    "emoji-styles-baseline": {**EMOJI_DEMO, "das": False},
}
DEFAULT_DEMO = "fashion-mnist-das"


def demo_checkpoint(name: str = DEFAULT_DEMO) -> Path:
    return DEMO_DIR / f"{name}.safetensors"


def available_demos() -> list[Path]:
    return [p for p in (demo_checkpoint(n) for n in DEMO_MODELS) if p.is_file()]


def demo_dataset(name: str) -> str:
    """The dataset demo ``name`` was trained on."""
    return str(DEMO_MODELS[name].get("dataset", get_preset("cpu-demo").values["dataset"]))


def demo_partner(path: Path | str) -> Path | None:
    """The other checkpoint of a demo pair (DAS <-> baseline on the same dataset), if present."""
    stem = Path(path).stem
    for mine, other in (("-das", "-baseline"), ("-baseline", "-das")):
        if stem.endswith(mine):
            partner = demo_checkpoint(stem[: -len(mine)] + other)
            return partner if partner.is_file() and partner.stem in DEMO_MODELS else None
    return None


def build_demo(work_dir: Path | None = None, *, epochs: int | None = None, dataset: str | None = None) -> list[Path]:
    """Train every demo model (or those on ``dataset``) and copy its selected checkpoint and
    metrics into ``assets/demo``."""
    from das_core.data import DatasetError, load_splits
    from das_core.data.fashion_mnist import load_fashion_mnist
    from das_core.training.loop import train

    models = {n: o for n, o in DEMO_MODELS.items() if dataset is None or demo_dataset(n) == dataset}
    if not models:
        known = sorted({demo_dataset(n) for n in DEMO_MODELS})
        raise DatasetError(f"no demo is trained on {dataset!r}; demos exist for: {', '.join(known)}")
    for ds in sorted({demo_dataset(n) for n in models}):  # every dataset present before any training
        if ds == "fashion-mnist":
            load_fashion_mnist()  # the demo is Fashion-MNIST or nothing: no silent fallback to digits here
            continue
        try:
            load_splits(ds)
        except DatasetError as exc:
            if dataset is not None:
                raise
            # building every demo: the others need not wait for this dataset (e.g. npm unreachable)
            log.warning("skipping the %s demos: %s", ds, exc)
            models = {n: o for n, o in models.items() if demo_dataset(n) != ds}
    work = work_dir or REPO_ROOT / ".cache" / "demo-build"
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, overrides in models.items():
        run = work / name
        if run.exists():
            shutil.rmtree(run)
        values = dict(overrides, seed=DEMO_SEED, out=str(run), device="cpu")
        if epochs is not None:
            values["epochs"] = epochs
        cfg = get_preset("cpu-demo").config(**values)
        train(cfg, show_progress=False)
        layout = RunLayout(run)
        src = layout.best if layout.best.exists() else layout.last
        dst = demo_checkpoint(name)
        shutil.copyfile(src, dst)
        shutil.copyfile(layout.history, demo_metrics(dst))
        log.info("demo checkpoint %s written (%d KB)", dst, dst.stat().st_size // 1024)
        written.append(dst)
    return written
