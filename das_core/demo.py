"""The embedded demo: two small-CNN checkpoints trained by this CLI on the Fashion-MNIST
zero-shot split (classes 0-4 train, 5-9 test), one with DAS and one without, shipped in
``assets/demo/`` so that the app opens on a trained model with no training and no download.

``python -m das_core demo build`` (``make demo-model``) regenerates them with the same seed
and therefore the same metrics.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from das_core.presets import get_preset
from das_core.runs import REPO_ROOT

log = logging.getLogger(__name__)

DEMO_DIR = REPO_ROOT / "assets" / "demo"
DEMO_SEED = 0
# name -> overrides of the cpu-demo preset
DEMO_MODELS: dict[str, dict[str, object]] = {
    "fashion-mnist-das": {"das": True},
    "fashion-mnist-baseline": {"das": False},
}
DEFAULT_DEMO = "fashion-mnist-das"


def demo_checkpoint(name: str = DEFAULT_DEMO) -> Path:
    return DEMO_DIR / f"{name}.safetensors"


def available_demos() -> list[Path]:
    return [p for p in (demo_checkpoint(n) for n in DEMO_MODELS) if p.is_file()]


def build_demo(work_dir: Path | None = None, *, epochs: int | None = None) -> list[Path]:
    """Train every demo model and copy its selected checkpoint and metrics into ``assets/demo``."""
    from das_core.data.fashion_mnist import load_fashion_mnist
    from das_core.training import train

    load_fashion_mnist()  # the demo is Fashion-MNIST or nothing: no silent fallback to digits here
    work = work_dir or REPO_ROOT / ".cache" / "demo-build"
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, overrides in DEMO_MODELS.items():
        run = work / name
        if run.exists():
            shutil.rmtree(run)
        values = dict(overrides, seed=DEMO_SEED, out=str(run), device="cpu")
        if epochs is not None:
            values["epochs"] = epochs
        cfg = get_preset("cpu-demo").config(**values)
        train(cfg, show_progress=False)
        src = run / ("best.safetensors" if (run / "best.safetensors").exists() else "last.safetensors")
        dst = demo_checkpoint(name)
        shutil.copyfile(src, dst)
        shutil.copyfile(run / "metrics.jsonl", DEMO_DIR / f"{name}.metrics.jsonl")
        log.info("demo checkpoint %s written (%d KB)", dst, dst.stat().st_size // 1024)
        written.append(dst)
    return written
