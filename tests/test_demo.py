"""The embedded demo checkpoints: each pair is what ``make demo-model`` trains, and each demo
finds its partner (with / without DAS, same dataset)."""

from __future__ import annotations

import pytest

from das_core.store.checkpoint import load_checkpoint
from das_core.store.demo import (
    DEMO_MODELS,
    DEMO_SEED,
    available_demos,
    demo_checkpoint,
    demo_dataset,
    demo_partner,
)
from das_core.training.presets import get_preset


@pytest.mark.parametrize("name", list(DEMO_MODELS))
def test_a_shipped_demo_was_trained_with_its_recipe(name: str) -> None:
    path = demo_checkpoint(name)
    if not path.is_file():
        pytest.skip(f"{path.name} is not built here (make demo-model)")
    cfg = load_checkpoint(path).config
    want = get_preset("cpu-demo").config(**DEMO_MODELS[name], seed=DEMO_SEED)
    for key in ("dataset", "das", "backbone", "image_size", "embedding_dim", "batch_size", "samples_per_class",
                "epochs", "lr", "val_classes", "val_fraction", "seed"):
        assert getattr(cfg, key) == getattr(want, key), (name, key)
    assert cfg.dataset == demo_dataset(name)
    assert (path.parent / f"{name}.metrics.jsonl").is_file()  # the Compare page's curves


def test_every_demo_names_its_partner_on_the_same_dataset() -> None:
    demos = available_demos()
    for path in demos:
        partner = demo_partner(path)
        if partner is None:
            continue
        assert partner != path and partner in demos
        assert demo_dataset(partner.stem) == demo_dataset(path.stem)
        assert cfg_das(path) != cfg_das(partner)  # one with DAS, one without
        assert demo_partner(partner) == path


def cfg_das(path: object) -> bool:
    return bool(load_checkpoint(path).config.das)  # type: ignore[arg-type]


def test_demo_build_for_a_dataset_without_demos_names_those_with_demos() -> None:
    from das_core.data import DatasetError
    from das_core.store.demo import build_demo

    with pytest.raises(DatasetError, match="no demo is trained on 'cub200'; demos exist for: emoji-styles, fashion-mnist"):
        build_demo(dataset="cub200")
