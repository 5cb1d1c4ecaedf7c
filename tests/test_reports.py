"""The Retrieve, Train and Compare pages' library side: retrieval.query, explorer.train_form, runs_view, bench_view, compare."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from das_core.explorer import bench_view, compare, runs_view, train_form
from das_core.retrieval import query
from das_core.retrieval.index import RetrievalIndex
from das_core.training.config import ConfigError, TrainConfig
from das_core.training.presets import PRESETS

# -- one query ------------------------------------------------------------------------------------


def test_query_summary_marks_and_recall() -> None:
    s = query.query_summary([False, True, False, True, True])
    assert s["k"] == 5 and s["hits"] == 3 and s["first_hit"] == 2
    assert (s["R@1"], s["R@2"], s["R@4"]) == (0.0, 1.0, 1.0)
    assert "R@8" not in s  # only ranks that exist
    # small rationals computed in float64 both sides: a few ulps apart, inside approx's rel=1e-6
    assert s["P@k"] == pytest.approx(0.6)
    # AP over the hits: (1/2 + 2/4 + 3/5) / 3
    assert s["AP@k"] == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    # with 10 relevant items in the gallery, normalised by min(k, relevant) = 5
    assert query.query_summary([False, True, False, True, True], relevant=10)["AP@k"] == pytest.approx(1.6 / 5)
    none = query.query_summary(None, relevant=None)
    assert none["hits"] is None and none["P@k"] is None
    miss = query.query_summary([False, False])
    assert miss["first_hit"] is None and miss["AP@k"] == 0.0 and miss["R@1"] == 0.0


def test_retrieve_excludes_the_query_and_marks_results() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)).astype(np.float32) * 5
    labels = np.repeat(np.arange(3), 10)
    x = centres[labels] + rng.normal(scale=0.1, size=(30, 8)).astype(np.float32)
    index = RetrievalIndex.build(x)
    r = query.retrieve(index, labels, x[4], 5, query_label=0, exclude=4)
    assert r.k == 5 and 4 not in r.indices.tolist()
    assert np.all(np.diff(r.distances) >= 0)
    assert r.correct is not None and r.correct.all()
    assert r.relevant == 9  # the 10 of its class, less itself
    assert r.summary()["R@1"] == 1.0 and r.summary()["AP@k"] == pytest.approx(1.0)
    # no exclusion: the query itself comes first at distance 0 ... up to faiss's rounding, when
    # it takes |q|^2 + |g|^2 - 2 q.g (d + 2 = 10 terms): squared error <= 10·2^-24·(2|x|)^2
    r2 = query.retrieve(index, labels, x[4], 3)
    zero_tol = float(np.sqrt(10 * 2.0**-24) * 2 * np.linalg.norm(x[4]))
    assert r2.indices[0] == 4 and r2.distances[0] == pytest.approx(0.0, abs=zero_tol)
    assert r2.correct is None and r2.summary()["hits"] is None
    # a wrong label: every result wrong
    r3 = query.retrieve(index, labels, x[4], 3, query_label=2)
    assert r3.correct is not None and not r3.correct.any() and r3.relevant == 10
    with pytest.raises(ValueError, match="labels"):
        query.retrieve(index, labels[:5], x[0], 3)


def test_embed_images_matches_the_gallery_embeddings(digits_run: Path) -> None:
    """A gallery image embedded through ``prepare`` (the query path) lands on its cached
    gallery embedding (the batch path): the same preprocessing."""
    from das_core.models.embed import embed_dataset
    from das_core.store.checkpoint import load_checkpoint
    from das_core.training.loop import load_splits_for

    ckpt = load_checkpoint(digits_run)
    model = ckpt.build_model("cpu")
    test = load_splits_for(ckpt.config).test
    gallery, _ = embed_dataset(model, test, batch_size=64)
    picks = [0, 7, len(test) - 1]
    q = query.embed_images(model, [test.load_image(i) for i in picks])
    assert q.shape == (3, ckpt.config.embedding_dim) and q.dtype == np.float32
    # The claim is the preprocessing: the query path's inputs are the gallery path's, bit for bit.
    # The gallery runs the BatchNorm-folded copy (inference_model) in batches of 64, the query
    # path the plain model on 3 images: different float32 kernels (they differ by ~1e-7 here, by
    # how much elsewhere depends on the machine); that the fold computes the same function is
    # checked in float64 (tests/test_embed.py). So: same inputs, and each path's model on them.
    import torch

    from das_core.data.base import uint8_batch
    from das_core.models.embed import inference_model

    prep = model.preprocessing
    x_query = torch.cat([prep.prepare(test.load_image(i)) for i in picks])
    x_gallery = prep.eval_batch(uint8_batch(test, picks))
    torch.testing.assert_close(x_query, x_gallery, atol=0, rtol=0)
    with torch.no_grad():
        np.testing.assert_array_equal(q, model.eval()(x_query).numpy())
    # and the gallery's rows are the folded model's on those inputs, in its own batches of 64
    # (oneDNN picks its algorithm per batch shape: only the same batch is bit-identical)
    net = inference_model(model)
    first, last = np.arange(0, 64), np.arange(64 * ((len(test) - 1) // 64), len(test))
    with torch.no_grad():
        for rows in (first, last):
            x = prep.eval_batch(uint8_batch(test, rows)).contiguous(memory_format=torch.channels_last)
            np.testing.assert_array_equal(gallery[rows], net(x).numpy())
    # an RGB image of another size is prepared too (converted and resized as in training)
    from PIL import Image

    rgb = Image.new("RGB", (57, 31), (200, 10, 10))
    assert query.embed_images(model, [rgb]).shape == (1, ckpt.config.embedding_dim)
    assert query.embed_images(model, []).shape == (0, ckpt.config.embedding_dim)


def test_sample_names() -> None:
    names = ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot", "T-shirt/top"]
    assert query.slug("T-shirt/top") == "t-shirt-top"
    assert query.parse_sample_name("ankle-boot-test20419.png", names) == (4, "test", 20419)
    assert query.parse_sample_name("bag-val12.jpg", names) == (3, "val", 12)
    assert query.parse_sample_name("t-shirt-top.webp", names) == (5, None, None)
    assert query.parse_sample_name("shirt-2.png", names) == (1, None, None)
    assert query.parse_sample_name("dog-test3.png", names) == (None, "test", 3)
    assert query.parse_sample_name("holiday.png", names) == (None, None, None)


def test_sample_queries_lists_images_only(tmp_path: Path) -> None:
    (tmp_path / "bag-test3.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "sandal.JPG").write_bytes(b"x")
    got = query.sample_queries(tmp_path, ["Sandal", "Bag"])
    assert [(s.name, s.label, s.split, s.index) for s in got] == [("bag-test3.png", 1, "test", 3), ("sandal.JPG", 0, None, None)]
    assert query.sample_queries(tmp_path / "missing", ["Bag"]) == []
    # the shipped samples name the Fashion-MNIST test classes
    shipped = query.sample_queries(Path(__file__).resolve().parent.parent / "assets" / "queries",
                                     ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])
    assert shipped and all(s.label is not None and s.split == "test" for s in shipped)


# -- the training form ----------------------------------------------------------------------------


def test_config_fields_cover_every_option_with_its_rule() -> None:
    specs = {s.name: s for s in train_form.config_fields()}
    assert list(specs) == list(TrainConfig.field_names())
    assert sum(len(v) for v in train_form.fields_by_group().values()) == len(specs)
    assert specs["dataset"].kind == "choice" and specs["dataset"].choices is not None
    assert specs["das"].kind == "bool" and specs["pretrained"].kind == "bool"
    r_s = specs["das_r_s"]
    assert (r_s.kind, r_s.min_value, r_s.max_value) == ("float", 0.0, 1.0) and "< 1" in r_s.allowed
    assert r_s.step == pytest.approx(0.001)  # float64 constant, maybe computed (10^-3): an ulp at most
    bs = specs["batch_size"]
    assert (bs.kind, bs.min_value, bs.max_value, bs.step) == ("int", 2, 65536, 1)
    assert specs["margin"].optional and specs["margin"].kind == "float" and specs["margin"].default is None
    assert specs["steps_per_epoch"].optional and specs["steps_per_epoch"].kind == "int"
    assert specs["data_root"].optional and specs["data_root"].kind == "str"
    assert specs["lr"].step == pytest.approx(1e-4)
    for s in specs.values():  # every default fits its widget's bounds
        if s.kind in ("int", "float") and s.default is not None:
            assert s.min_value is None or s.default >= s.min_value, s.name
            assert s.max_value is None or s.default <= s.max_value, s.name


@pytest.mark.parametrize("name", list(PRESETS))
def test_form_values_of_every_preset_build_its_config(name: str) -> None:
    values = train_form.form_values(name)
    assert set(values) == set(TrainConfig.field_names())
    assert train_form.config_from_form(values) == PRESETS[name].config()


def test_config_from_form_refuses_with_the_rule() -> None:
    values = train_form.form_values("cpu-quick")
    with pytest.raises(ConfigError) as err:
        train_form.config_from_form({**values, "das_r_s": 1.5})
    shown = train_form.describe_config_error(err.value)
    assert shown["field"] == "das_r_s" and shown["value"] == "1.5" and "< 1" in shown["allowed"]
    with pytest.raises(ConfigError, match="multiple of samples_per_class"):
        train_form.config_from_form({**values, "batch_size": 55})
    cfg = train_form.config_from_form({**values, "data_root": "  ", "margin": None, "steps_per_epoch": 3})
    assert cfg.data_root is None and cfg.margin is None and cfg.steps_per_epoch == 3


def test_cli_command_round_trips_through_the_cli_parser() -> None:
    from das_core.cli import build_parser

    cfg = PRESETS["cpu-demo"].config(das_r_s=0.05, pretrained=False, data_root="/data/my folder", steps_per_epoch=7)
    cmd = train_form.cli_command(cfg)
    assert cmd.startswith("python -m das_core train ") and "--no-pretrained" in cmd and "--out" not in cmd
    args = vars(build_parser().parse_args(shlex.split(cmd)[3:]))
    parsed = TrainConfig.from_mapping({k: v for k, v in args.items() if k in TrainConfig.field_names()})
    assert parsed == cfg


def test_milestones_are_a_text_field_and_a_flag() -> None:
    from das_core.cli import build_parser

    spec = {s.name: s for s in train_form.config_fields()}["lr_milestones"]
    assert spec.kind == "ints" and not spec.optional and "200,250" in spec.allowed
    name = next(n for n in PRESETS if n.startswith("paper-"))
    values = train_form.form_values(name)
    assert values["lr_milestones"] == "200,250" and train_form.form_values()["lr_milestones"] == ""
    cfg = train_form.config_from_form({**values, "lr_milestones": "100, 150"})
    assert cfg.lr_milestones == (100, 150)
    cmd = train_form.cli_command(cfg)
    assert "--lr-milestones 100,150" in cmd
    args = vars(build_parser().parse_args(shlex.split(cmd)[3:]))
    assert TrainConfig.from_mapping({k: v for k, v in args.items() if k in TrainConfig.field_names()}) == cfg
    with pytest.raises(ConfigError, match="strictly increasing"):
        train_form.config_from_form({**values, "lr_milestones": "150,100"})


def test_progress_summary() -> None:
    p = runs_view.progress_summary({"state": "training", "epoch": 2, "epochs": 4, "step": 5, "steps": 10,
                                  "loss": 0.25, "eta": 125.0})
    assert p["fraction"] == pytest.approx((10 + 5) / 40)  # one float64 division each side
    assert "epoch 2/4" in p["text"] and "step 5/10" in p["text"] and "ETA 2 min 05 s" in p["text"]
    assert runs_view.progress_summary({})["fraction"] == 0.0 and runs_view.progress_summary({})["text"] == "starting…"
    assert "evaluating" in runs_view.progress_summary({"state": "evaluating", "epoch": 1, "epochs": 1})["text"]
    assert runs_view.format_seconds(42) == "42 s" and runs_view.format_seconds(7260) == "2 h 01 min"


# -- runs, curves, benchmarks ---------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_runs_table_lists_runs_and_demos(digits_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(digits_run, root / "digits")
    # a run still training: metrics of epoch 1 only, no checkpoint, a job.json saying so
    partial = root / "partial"
    partial.mkdir()
    _write_jsonl(partial / "metrics.jsonl", [{"epoch": 1, "train_loss": 0.5, "test": {"R@1": 0.5, "NMI": 0.1}}])
    (partial / "config.yaml").write_text("data:\n  dataset: digits\nrun:\n  seed: 9\noptim:\n  epochs: 3\n")
    (partial / "job.json").write_text(json.dumps({"state": "running"}))
    (root / "empty").mkdir()  # neither checkpoint nor metrics: not listed
    # a demo: a checkpoint file with its metrics file beside it
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    demo = demo_dir / "toy-das.safetensors"
    shutil.copyfile(digits_run / "best.safetensors", demo)
    shutil.copyfile(digits_run / "metrics.jsonl", demo_dir / "toy-das.metrics.jsonl")

    rows = runs_view.runs_table(root, demos=[demo, demo_dir / "absent.safetensors"])
    by = {r["name"]: r for r in rows}
    assert list(by)[0] == "toy-das" and set(by) == {"toy-das", "digits", "partial"}
    summary = json.loads((digits_run / "summary.json").read_text())
    d = by["digits"]
    assert d["kind"] == "run" and d["dataset"] == "digits" and d["DAS"] is True and d["state"] == "done"
    assert d["loss"] == "triplet" and d["seed"] == 3 and d["epochs"] == 2 == d["planned"]
    for m in runs_view.METRICS:  # the same float64 numbers read back from JSON (exact round trip)
        assert d[m] == pytest.approx(summary["last"]["test"][m])
        assert d[f"sel. {m}"] == pytest.approx(summary["selected"]["test"][m])
    assert d["test epoch"] == 2 and d["selected epoch"] == summary["selected_epoch"]
    assert d["checkpoint"].endswith("best.safetensors") and d["metrics"].endswith("metrics.jsonl")
    p = by["partial"]
    assert p["state"] == "running" and p["epochs"] == 1 and p["planned"] == 3 and p["seed"] == 9
    assert p["R@1"] == 0.5 and p["MAP@R"] is None and p["selected epoch"] is None and p["checkpoint"] is None
    t = by["toy-das"]
    assert t["kind"] == "demo" and t["DAS"] is True and t["R@1"] == pytest.approx(d["R@1"])
    assert t["selected epoch"] == summary["selected_epoch"]  # the checkpoint's own epoch
    assert t["metrics"].endswith("toy-das.metrics.jsonl")
    assert runs_view.runs_table(tmp_path / "nothing") == []
    # one run's row alone (the Train page's finished jobs)
    assert runs_view.run_row(root / "digits") == d and runs_view.run_row(partial) == p
    assert runs_view.run_row(root / "empty") is None


def test_runs_table_lists_sweep_trials_with_their_swept_values(digits_run: Path, tmp_path: Path) -> None:
    from app_helpers import make_sweep
    from das_core.explorer import timeline as tl

    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(digits_run, root / "digits")
    sweep = make_sweep(root, digits_run)
    damaged = root / "broken-sweep"  # a sweep.json no longer readable: its trials are listed, without params
    shutil.copytree(sweep / "trial-0000", damaged / "trial-0000")
    (damaged / "sweep.json").write_text("{not json")

    rows = runs_view.runs_table(root)
    names = [r["name"] for r in rows]
    assert names[0] == "digits"  # run folders first, then the trials by sweep (newest first) and number
    assert set(names) == {"digits", "rs-sweep/trial-0000", "rs-sweep/trial-0001", "broken-sweep/trial-0000"}
    assert names.index("rs-sweep/trial-0000") + 1 == names.index("rs-sweep/trial-0001")  # trial-0002: nothing yet
    by = {r["name"]: r for r in rows}
    assert by["digits"]["kind"] == "run" and by["digits"]["params"] is None
    done, running = by["rs-sweep/trial-0000"], by["rs-sweep/trial-0001"]
    assert done["kind"] == running["kind"] == "sweep trial"
    assert done["params"] == "r_s=0.01, r_b=0.05" and running["params"] == "r_s=0.2, r_b=0.05"
    summary = json.loads((digits_run / "summary.json").read_text())
    for m in runs_view.METRICS:  # the same float64 numbers read back from JSON (exact round trip)
        assert done[m] == pytest.approx(summary["last"]["test"][m])
        assert done[f"sel. {m}"] == pytest.approx(summary["selected"]["test"][m])
    assert done["state"] == "done" and done["DAS"] is True and done["epochs"] == 2
    assert done["path"] == str(sweep / "trial-0000") and done["checkpoint"].endswith("best.safetensors")
    assert running["state"] == "partial" and running["epochs"] == 1 and running["R@1"] == 0.5
    assert running["checkpoint"] is None and running["metrics"].endswith("metrics.jsonl")
    # the same reader as a run folder's: only the name, kind and params differ
    alone = runs_view.run_row(sweep / "trial-0000")
    assert alone is not None and {k: v for k, v in alone.items() if v != done[k]} == {
        "name": "trial-0000", "kind": "run", "params": None}
    broken = by["broken-sweep/trial-0000"]
    assert broken["kind"] == "sweep trial" and broken["params"] is None and broken["R@1"] == done["R@1"]
    # the Timeline page plays trials that recorded a timeline (the digits run did; trial-0001 not)
    playable = {r["name"] for r in tl.timeline_runs(rows)}
    assert playable == {"digits", "rs-sweep/trial-0000", "broken-sweep/trial-0000"}


def test_run_curves() -> None:
    recs = [
        {"epoch": 1, "train_loss": 0.9, "test": {"R@1": 0.5}},
        {"epoch": 2, "train_loss": 0.8},  # not evaluated
        {"epoch": 3, "train_loss": 0.7, "test": {"R@1": 0.6}, "val": {"R@1": 0.7}},
        {"epoch": 2, "train_loss": 0.75},  # a resumed epoch: the last record wins
    ]
    c = runs_view.run_curves(recs)
    assert c["epoch"] == [1.0, 2.0, 3.0] and c["train_loss"] == [0.9, 0.75, 0.7]
    assert c["test R@1"][0] == 0.5 and math.isnan(c["test R@1"][1]) and c["test R@1"][2] == 0.6
    assert math.isnan(c["val R@1"][0]) and c["val R@1"][2] == 0.7
    assert runs_view.run_curves([])["epoch"] == []


def test_run_curves_reads_a_run_folder(digits_run: Path) -> None:
    c = runs_view.run_curves(digits_run)
    assert c["epoch"] == [1.0, 2.0] and all(v == v for v in c["val R@1"])
    assert runs_view.run_curves(digits_run / "metrics.jsonl") == c


def test_bench_summary(tmp_path: Path) -> None:
    empty = bench_view.bench_summary(tmp_path)
    assert empty["das"] is None and empty["step"] is None
    assert any("make bench-das" in m for m in empty["missing"]) and len(empty["missing"]) == 2
    das = {
        "settings": {"epochs": 3},
        "summary": [
            {"setting": "triplet / semi-hard", "variant": "baseline", "seeds": 3, "R@1": [70.0, 1.0],
             "MAP@R": [20.0, 0.5], "NMI": [50.0, 0.2], "F1": [30.0, 0.1]},
            {"setting": "triplet / semi-hard", "variant": "+ DAS", "seeds": 3, "R@1": [72.5, 0.5],
             "MAP@R": [19.0, 0.5], "NMI": [50.0, 0.2], "F1": [30.0, 0.1]},
        ],
    }
    (tmp_path / "das_training.json").write_text(json.dumps(das))
    (tmp_path / "das_step_quick.json").write_text(json.dumps(
        {"setting": "small CNN", "rows": [{"loss": "triplet", "miner": "semi-hard", "plain_ms": 100.04, "das_ms": 120.0,
                                            "ratio": 1.2}], "worst_ratio_ours": 1.2, "target": 1.5, "passed": True}))
    got = bench_view.bench_summary(tmp_path)
    rows = got["das"]["rows"]
    assert not got["das"]["quick"] and rows[0]["R@1"] == "70.00 ± 1.00"
    assert rows[1]["R@1"] == "72.50 ± 0.50 (+2.50)" and rows[1]["MAP@R"] == "19.00 ± 0.50 (-1.00)"
    assert got["step"]["quick"] and got["step"]["rows"][0]["plain step (ms)"] == 100.0
    assert got["step"]["extra"]["passed"] is True
    assert len(got["missing"]) == 1 and "quick" in got["missing"][0]
    (tmp_path / "das_step.json").write_text("{not json")  # unreadable: the quick one is still used
    assert bench_view.bench_summary(tmp_path)["step"]["quick"]


# -- two checkpoints ------------------------------------------------------------------------------


def test_comparable() -> None:
    a = TrainConfig(dataset="digits")
    assert compare.comparable(a, a.replace(das=True, seed=5), "test") is None
    assert "different datasets" in str(compare.comparable(a, TrainConfig(dataset="fashion-mnist"), "test"))
    b = a.replace(val_fraction=0.2)
    assert compare.comparable(a, b, "test") is None  # the test classes are the same images
    assert "val_fraction" in str(compare.comparable(a, b, "train"))
    assert "seed" in str(compare.comparable(b, b.replace(seed=1), "train"))
    assert compare.comparable(a, a.replace(seed=1), "train") is None  # no validation carved: seed is moot
    assert compare.comparable(a, a.replace(data_root="/elsewhere"), "test") is not None


def test_map_shift_finds_the_points_that_moved() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 2)).astype(np.float32)
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    b = (a @ rot) * 3.0 + np.array([5.0, -2.0], np.float32)  # the same map, rotated, scaled, moved
    movers = np.array([3, 50, 120])
    b[movers] += np.array([8.0, 8.0], np.float32)
    labels = np.arange(200) % 4
    emb = rng.normal(size=(200, 6)).astype(np.float32)
    shift = compare.map_shift(a, b, labels, ["w", "x", "y", "z"], emb_a=emb, emb_b=emb, k=3, neighbours=5)
    assert set(shift.moved.tolist()) == set(movers.tolist())
    rest = np.setdiff1d(np.arange(200), movers)
    # b is an exact similarity transform of a but for float32 rounding (|b| < 20: 1e-6), and the
    # refit leaves the movers out: the rest lands back within ~1e-6 (0.2 is far below a mover's 11)
    assert np.abs(shift.aligned_b[rest] - a[rest]).max() < 0.2
    assert shift.displacement.shape == (200,) and shift.displacement[movers].min() > shift.displacement[rest].max()
    row = shift.rows[0]
    assert row["rank"] == 1 and row["class"] == ["w", "x", "y", "z"][labels[row["index"]]]
    assert row["own class in 5-NN (A)"] == row["own class in 5-NN (B)"]  # same embeddings
    with pytest.raises(ValueError, match="same points"):
        compare.map_shift(a, b[:10], labels, ["w"])
