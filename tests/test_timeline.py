"""The training timeline (probe embeddings per epoch in timeline.npz), its aligned maps, the DAS
state statistics and the TensorBoard event files of ``--tensorboard``."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICK_DIGITS
from das_core.cli import main
from das_core.explorer import timeline as tl
from das_core.store.io import read_jsonl
from das_core.store.timeline import (
    TIMELINE,
    Timeline,
    TimelineError,
    empty_timeline,
    load_timeline,
    probe_indices,
    timeline_due,
)
from das_core.training.observers import TENSORBOARD_DIR, scalars


def _train(out: Path, *extra: str) -> int:
    return main(["train", *QUICK_DIGITS, "--out", str(out), *extra])


# -- the probe and the file -------------------------------------------------------------------


def test_probe_is_fixed_sorted_and_depends_only_on_the_split_size() -> None:
    a, b = probe_indices(5000, 2000), probe_indices(5000, 2000)
    assert np.array_equal(a, b) and len(a) == 2000 and len(np.unique(a)) == 2000
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 5000
    assert np.array_equal(probe_indices(300, 2000), np.arange(300))  # a small split: all of it
    assert not np.array_equal(probe_indices(5001, 2000), a)  # another split: other images
    with pytest.raises(ValueError):
        probe_indices(-1, 3)


def test_long_runs_store_every_kth_epoch_and_the_last() -> None:
    assert [e for e in range(11) if timeline_due(e, 10)] == list(range(11))
    stored = [e for e in range(301) if timeline_due(e, 300)]
    assert stored[:3] == [0, 6, 12] and stored[-1] == 300 and len(stored) == 51
    odd = [e for e in range(102) if timeline_due(e, 101)]  # stride 3, and the last epoch
    assert odd[-2:] == [99, 101] and len(odd) <= 50 + 2


def _tiny(n: int = 6, d: int = 4) -> Timeline:
    return empty_timeline(np.arange(n) * 3, np.arange(n) % 2, d, {"dataset": "x", "split_size": 3 * n,
                                                                    "class_names": ["a", "b"]})


def test_timeline_appends_round_trips_and_drops_recomputed_epochs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
    t = _tiny()
    for epoch, e in enumerate(emb):
        t = t.with_epoch(epoch, e)
    path = tmp_path / TIMELINE
    t.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [TIMELINE]  # no temporary file left
    back = Timeline.load(path)
    assert back.epochs.tolist() == [0, 1, 2] and back.embeddings.dtype == np.float16
    assert back.class_names == ["a", "b"] and back.meta["split_size"] == 18
    # float16 keeps 11 significant bits: relative error <= 2^-11 per value
    for e, stored in zip(emb, back.embeddings, strict=True):
        assert np.all(np.abs(stored.astype(np.float32) - e) <= np.abs(e) * 2.0**-11 + 1e-7)
    assert back.keep_before(2).epochs.tolist() == [0, 1]
    # appending an epoch again (a resumed run) replaces it and every later one
    again = back.with_epoch(1, np.zeros((6, 4), np.float32))
    assert again.epochs.tolist() == [0, 1] and not again.embeddings[1].any()
    with pytest.raises(TimelineError, match="shape"):
        back.with_epoch(3, np.zeros((5, 4)))


def test_a_damaged_or_missing_timeline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TimelineError, match="no training timeline"):
        load_timeline(tmp_path)
    (tmp_path / TIMELINE).write_bytes(b"not a zip")
    with pytest.raises(TimelineError, match="damaged"):
        load_timeline(tmp_path)


# -- what training writes ---------------------------------------------------------------------


def test_training_records_the_probe_every_epoch_without_changing_the_run(tmp_path: Path) -> None:
    from das_core.models.embed import embed_dataset
    from das_core.store.checkpoint import load_checkpoint
    from das_core.training.loop import load_splits_for

    assert _train(tmp_path / "on", "--das", "--seed", "4", "--epochs", "2", "--timeline-probe", "300") == 0
    assert _train(tmp_path / "off", "--das", "--seed", "4", "--epochs", "2", "--timeline-probe", "0") == 0
    assert _train(tmp_path / "seed", "--seed", "9", "--timeline-probe", "300") == 0
    assert not (tmp_path / "off" / TIMELINE).exists()

    # the timeline only reads the model: the metrics are the same with and without it
    on, off = read_jsonl(tmp_path / "on" / "metrics.jsonl"), read_jsonl(tmp_path / "off" / "metrics.jsonl")
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in on] == [
        {k: v for k, v in r.items() if k not in drop} for r in off
    ]

    t = load_timeline(tmp_path / "on")
    ckpt = load_checkpoint(tmp_path / "on" / "last.safetensors")
    test = load_splits_for(ckpt.config).test
    assert test is not None
    assert t.epochs.tolist() == [0, 1, 2]
    assert np.array_equal(t.indices, probe_indices(len(test), 300))
    assert np.array_equal(t.labels, test.labels[t.indices])
    assert t.meta["dataset"] == "digits" and t.meta["split_size"] == len(test)
    assert t.embeddings.shape == (3, 300, 32)
    assert not np.array_equal(t.embeddings[0], t.embeddings[2])  # training moved the space
    # the last epoch's probes are the final model's embeddings of those images; float16 keeps
    # 11 significant bits, and the components of a unit vector are <= 1: error <= 2^-11
    want, _ = embed_dataset(ckpt.build_model(), test.subset(t.indices, relabel=False), device="cpu")
    assert np.abs(t.embeddings[-1].astype(np.float32) - want).max() <= 2.0**-11

    # another seed, the same probe: runs can be compared point by point
    other = load_timeline(tmp_path / "seed")
    assert np.array_equal(other.indices, t.indices) and tl.comparable(t, other) is None


def test_resume_keeps_the_timeline_of_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["--das", "--seed", "2", "--timeline-probe", "200"]
    assert _train(tmp_path / "full", *args, "--epochs", "2") == 0
    assert _train(tmp_path / "part", *args, "--epochs", "1") == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "part"), "--epochs", "2", "--no-progress"]) == 0
    full, part = load_timeline(tmp_path / "full"), load_timeline(tmp_path / "part")
    assert part.epochs.tolist() == [0, 1, 2]
    assert np.array_equal(full.embeddings, part.embeddings)  # exact resume on the CPU


# -- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_history(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert _train(out, "--das", "--epochs", "2", "--val-fraction", "0.2", "--tensorboard", "--timeline-probe", "0") == 0
    history = read_jsonl(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train_loss", "lr", "val/R@1", "test/R@1", "test/MAP@R", "weight_norm/total",
                "das_diagnostics/grad_ratio", "das_state/bank_fill", "das_state/mask_overlap"):
        assert tag in tags, (tag, sorted(tags))
    want = {tag: {int(r["epoch"]): v for r in history for t, v in scalars(r).items() if t == tag} for tag in tags}
    for tag in tags:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        # TensorBoard stores a scalar as a float32: equal to the history's value rounded to float32
        assert got == {e: float(np.float32(v)) for e, v in want[tag].items()}, tag
    assert sorted(next(iter(want.values()))) == [1, 2]


def test_scalars_flatten_a_record() -> None:
    rec = {"epoch": 3, "train_loss": 0.5, "val": {"R@1": 0.9}, "das_state": {"bank_fill": 1.0},
           "note": "text", "bad": math.nan, "flag": True}
    assert scalars(rec) == {"train_loss": 0.5, "val/R@1": 0.9, "das_state/bank_fill": 1.0}


def test_tensorboard_and_timeline_flags_parse() -> None:
    from das_core.cli import build_parser, resolve_train_config

    ns = build_parser().parse_args(["train", "--tensorboard", "--timeline-probe", "0"])
    cfg = resolve_train_config(ns)
    assert cfg.tensorboard is True and cfg.timeline_probe == 0


# -- DAS state --------------------------------------------------------------------------------


def test_das_state_matches_a_pairwise_count() -> None:
    from das_core.training.das import DenselyAnchoredSampling
    from das_core.training.diagnostics import das_state

    das = DenselyAnchoredSampling(num_classes=5, dim=8, num_produce=1, topk=3, bank_size=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        das.frequency[:4] = torch.rand(4, 8, generator=gen)  # class 4 never seen
        das.bank_filled.copy_(torch.tensor([4, 2, 0, 1, 0]))
    got = das_state(das)
    mask = das.mask.numpy()
    shared = [(mask[i] & mask[j]).sum() / 3 for i, j in itertools.combinations(range(4), 2)]
    assert got["mask_overlap"] == pytest.approx(float(np.mean(shared)), abs=1e-12)
    assert got["bank_fill"] == pytest.approx((4 + 2 + 0 + 1 + 0) / (5 * 4))
    assert got["classes_seen"] == pytest.approx(4 / 5)


# -- maps over epochs -------------------------------------------------------------------------


def _rotate(xy: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return (xy @ np.array([[c, -s], [s, c]]) * scale + np.array(shift)).astype(np.float32)


def test_align_chain_undoes_rotation_scale_and_shift() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 2)).astype(np.float32)
    frames = [base, _rotate(base, 1.0, 3.0, (5, -2)), _rotate(base, -2.0, 0.5, (0, 9))]
    out = tl.align_chain(frames)
    assert np.array_equal(out[0], base)  # the first frame is kept
    # each frame is an exact similarity transform of the first, so Procrustes recovers it up to
    # float32 rounding (values ~1, ~10 operations: well under 1e-4)
    assert np.abs(out[1] - base).max() < 1e-4 and np.abs(out[2] - base).max() < 1e-4


def test_align_runs_moves_all_frames_by_one_transform() -> None:
    rng = np.random.default_rng(2)
    a_last = rng.normal(size=(40, 2)).astype(np.float32)
    b_frames = np.stack([rng.normal(size=(40, 2)), _rotate(a_last, 0.7, 2.0, (1, 1))]).astype(np.float32)
    idx, labels = np.arange(40), np.zeros(40, np.int64)
    a = tl.TimelineMaps(np.array([0, 1]), np.stack([a_last, a_last]), labels, idx, ["c"], "")
    b = tl.TimelineMaps(np.array([0, 1]), b_frames, labels, idx, ["c"], "")
    moved = tl.align_runs(a, b)
    assert np.abs(moved.coords[-1] - a_last).max() < 1e-4  # the last maps coincide
    # the first frame went through the same transform: pairwise distances scale by 1/2
    d0 = np.linalg.norm(b_frames[0][:, None] - b_frames[0][None], axis=-1)
    d1 = np.linalg.norm(moved.coords[0][:, None] - moved.coords[0][None], axis=-1)
    assert np.allclose(d1, d0 / 2.0, atol=1e-4)


def test_frames_and_schedule() -> None:
    assert tl.frame_rows(5, 30).tolist() == [0, 1, 2, 3, 4]
    rows = tl.frame_rows(301, 30)
    assert rows[0] == 0 and rows[-1] == 300 and len(rows) == 30
    union, (ra, rb) = tl.frame_schedule(np.array([0, 1, 2]), np.array([0, 2, 4]))
    assert union.tolist() == [0, 1, 2, 4]
    assert ra.tolist() == [0, 1, 2, 2] and rb.tolist() == [0, 0, 1, 2]


def test_timeline_maps_of_a_synthetic_run() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16))
    labels = np.repeat(np.arange(3), 20)
    t = empty_timeline(np.arange(60), labels, 16, {"dataset": "x", "split_size": 60, "class_names": ["a", "b", "c"]})
    for epoch in range(3):  # classes separate over the epochs
        emb = rng.normal(size=(60, 16)) + (epoch + 1) * 2.0 * centres[labels]
        t = t.with_epoch(epoch, emb / np.linalg.norm(emb, axis=1, keepdims=True))
    maps = tl.timeline_maps(t)
    assert maps.epochs.tolist() == [0, 1, 2] and maps.coords.shape == (3, 60, 2)
    assert np.isfinite(maps.coords).all() and maps.class_names == ["a", "b", "c"]
    # aligned: each frame is at least as close to the one before as the unaligned map was
    from das_core.explorer.umap_fit import fit_map

    raw = fit_map(t.embeddings[2].astype(np.float32), labels=labels).coords
    assert np.linalg.norm(maps.coords[2] - maps.coords[1]) <= np.linalg.norm(raw - maps.coords[1]) + 1e-6


def test_timeline_maps_are_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    t = empty_timeline(np.arange(30), np.repeat(np.arange(3), 10), 8, {"dataset": "x", "split_size": 30,
                                                                       "class_names": ["a", "b", "c"]})
    for epoch in range(2):
        t = t.with_epoch(epoch, rng.normal(size=(30, 8)))
    t.save(tmp_path / "run" / TIMELINE)
    first = tl.get_timeline_maps(tmp_path / "run", root=tmp_path / "cache")

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(tl, "timeline_maps", no_fit)
    again = tl.get_timeline_maps(tmp_path / "run", root=tmp_path / "cache")
    assert np.array_equal(first.coords, again.coords) and again.class_names == ["a", "b", "c"]
    assert again.epochs.tolist() == [0, 1] and again.method == first.method
    # a new epoch changes the timeline: mapped again
    t.with_epoch(2, rng.normal(size=(30, 8))).save(tmp_path / "run" / TIMELINE)
    with pytest.raises(AssertionError, match="refitted"):
        tl.get_timeline_maps(tmp_path / "run", root=tmp_path / "cache")


# -- hover thumbnails on the animation ----------------------------------------------------------


def test_animation_points_carry_their_split_index_and_the_sprites(tmp_path: Path) -> None:
    """Every point, in the first data and in every frame, carries the stored probe index of its
    image in the split, and that index's sprite cell is that image."""
    from app.timeline_plot import timeline_animation
    from das_core.data.base import ArrayDataset
    from das_core.explorer.thumbs import cached_sprites, sprite_metadata, thumbnail_of

    n_split, rng = 40, np.random.default_rng(5)
    split_labels = rng.integers(0, 3, n_split)
    # image i of the split is filled with the value 5 * i: its cell says which image it is
    images = np.repeat((np.arange(n_split, dtype=np.uint8) * 5)[:, None, None], 8, axis=1).repeat(8, axis=2)
    split = ArrayDataset("toy", "test", images, split_labels, ["a", "b", "c"])
    idx = probe_indices(n_split, 12)  # a subset: probe position != split index
    t = empty_timeline(idx, split_labels[idx], 4, {"dataset": "toy", "split": "test", "split_size": n_split,
                                                   "class_names": ["a", "b", "c"]})
    for epoch in range(3):
        t = t.with_epoch(epoch, rng.normal(size=(12, 4)))
    t.save(tmp_path / "run" / TIMELINE)
    stored = load_timeline(tmp_path / "run")
    info, folder = cached_sprites("f" * 16, "test", split, root=tmp_path / "static", per_row=4)
    ids = tl.thumbnail_ids(stored, info.count)
    assert np.array_equal(ids, idx)

    coords = rng.normal(size=(3, 12, 2)).astype(np.float32)  # frame k: coords[k], probe order
    rows = np.arange(3)
    thumbs = {**sprite_metadata(info), "base": "/static/x/"}
    fig = timeline_animation([("A", coords), ("B", coords[::-1].copy())], [rows, rows], np.arange(3),
                             stored.labels, stored.class_names, ids, thumbs=thumbs)
    assert fig.layout.meta["thumbs"] == thumbs
    assert len(fig.frames) == 3
    for k, data in [(0, fig.data), *((k, f.data) for k, f in enumerate(fig.frames))]:
        seen: list[int] = []
        for trace in data:
            cd = np.asarray(trace.customdata)
            assert cd.ndim == 2 and cd.shape[1] == 1, cd.shape
            panel = coords if trace.xaxis == "x" else coords[::-1]
            for (x, y), (i,) in zip(zip(trace.x, trace.y, strict=True), cd, strict=True):
                j = int(np.searchsorted(idx, i))  # the probe position of split index i
                assert idx[j] == i and (x, y) == tuple(panel[k][j])  # the point of that image
                assert stored.class_names[split_labels[i]] == trace.name  # its class, in the split
                cell = np.asarray(thumbnail_of(info, tmp_path / "static" / folder, int(i)))
                assert (cell == 5 * i).all()  # its sprite cell is its image
                seen.append(int(i))
        assert sorted(seen) == sorted(2 * idx.tolist())  # both panels, every probe image once


def test_thumbnail_ids_refuse_another_split() -> None:
    t = empty_timeline(np.array([1, 4, 7]), np.zeros(3, np.int64), 2, {"split": "test", "split_size": 10})
    assert tl.thumbnail_ids(t, 10).tolist() == [1, 4, 7]
    with pytest.raises(TimelineError, match="split of 10 images, but the thumbnails cover one of 12"):
        tl.thumbnail_ids(t, 12)
    bad = empty_timeline(np.array([1, 4, 12]), np.zeros(3, np.int64), 2, {"split": "test"})
    with pytest.raises(TimelineError, match="outside the test split of 10 images"):
        tl.thumbnail_ids(bad, 10)
