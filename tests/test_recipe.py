"""The authors' recipe options (issue 10): each checked against a hand-written formula, the
authors' behaviour (bench/reference_das.py's loop port) or torch's own implementation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from das_core.data.sampler import MPerClassBatchSampler
from das_core.training.config import ConfigError, TrainConfig
from das_core.training.das import DenselyAnchoredSampling
from das_core.training.loop import best_test_epoch, lr_factor
from das_core.training.losses import build_criterion
from das_core.training.presets import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference_das import ReferenceDAS

# ---------------------------------------------------------------------------- triplet forms


def _all_triplets(labels: torch.Tensor) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [
        (a, p, q)
        for a in range(n)
        for p in range(n)
        for q in range(n)
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]
    ]


@pytest.mark.parametrize("form", ["plain", "squared"])
def test_triplet_forms_match_hand_written_formulas(form: str) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    cfg = TrainConfig(loss="triplet", miner="none", triplet_form=form, margin=0.2)
    got = build_criterion(cfg, 4)(emb, labels)
    terms = []
    for a, p, q in _all_triplets(labels):
        d_ap, d_an = (emb[a] - emb[p]).norm(), (emb[a] - emb[q]).norm()
        if form == "squared":  # the authors' loss/triplet.py: squared distances, mean over all
            terms.append(torch.relu(d_ap**2 - d_an**2 + 0.2))
        else:  # PML's default: plain distances, mean over the non-zero terms
            terms.append(torch.relu(d_ap - d_an + 0.2))
    t = torch.stack(terms)
    want = t.mean() if form == "squared" else t[t > 0].mean()
    assert (t == 0).any() and (t > 0).any()  # both reductions are exercised: they differ here
    # float64, a few hundred terms of O(1): rounding differences of order 1e-15, far below 1e-10
    assert float(got) == pytest.approx(float(want), abs=1e-10)


# ---------------------------------------------------------------------------- batch sampler


def test_sampler_with_replacement_class_and_image_counts() -> None:
    n_classes, per_class, draws = 100, 30, 56
    labels = np.repeat(np.arange(n_classes), per_class)
    s = MPerClassBatchSampler(labels, 2 * draws, 2, num_batches=2000, seed=5, replacement=True)
    distinct, four, same_image, groups = [], 0, 0, 0
    for batch in s:
        assert len(batch) == 2 * draws
        y = labels[batch]
        counts = np.bincount(y, minlength=n_classes)
        distinct.append(int((counts > 0).sum()))
        four += int((counts >= 4).any())
        for i in range(0, len(batch), 2):  # each draw: 2 images of one class, with replacement
            assert y[i] == y[i + 1]
            groups += 1
            same_image += int(batch[i] == batch[i + 1])
    # Expected distinct classes of 56 uniform draws from 100: 100 (1 - 0.99^56) = 43.0; the
    # per-batch count has sd < 3, so the mean of 2000 batches is within 5 standard errors (0.33).
    expected = n_classes * (1 - (1 - 1 / n_classes) ** draws)
    assert abs(np.mean(distinct) - expected) < 5 * 3 / math.sqrt(2000)
    assert four > 1500  # P(some class drawn twice in 56 of 100) > 0.999
    # the same image twice: p = 1/30 per draw; 112,000 draws, sd of the rate 0.00054 -> 5 sd
    assert abs(same_image / groups - 1 / per_class) < 5 * math.sqrt((1 / 30) * (29 / 30) / groups)


def test_sampler_distinct_default_unchanged() -> None:
    labels = np.repeat(np.arange(100), 30)
    for batch in MPerClassBatchSampler(labels, 112, 2, num_batches=50, seed=5):
        counts = np.bincount(labels[batch])
        assert int((counts > 0).sum()) == 56 and counts.max() == 2
        assert len(set(batch)) == 112


def test_replacement_sampler_may_ask_more_draws_than_classes() -> None:
    labels = np.repeat(np.arange(3), 5)
    batches = list(MPerClassBatchSampler(labels, 12, 2, num_batches=3, replacement=True))
    assert all(len(b) == 12 for b in batches)
    with pytest.raises(Exception, match="needs 6 classes"):
        MPerClassBatchSampler(labels, 12, 2, num_batches=3)


# ---------------------------------------------------------------------------- lr schedule


def test_multistep_lr_per_epoch_matches_torch_multisteplr() -> None:
    cfg = TrainConfig(lr_schedule="multistep", lr_milestones=(200, 250), lr_factor=0.3, epochs=300, lr=1e-5)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[200, 250], gamma=0.3)
    for epoch in range(1, 301):  # the authors step once after each epoch (scripts/standard.py)
        # float64 products of <= 3 factors, in another order than torch's (lr *= gamma): ~1e-16
        assert 1e-5 * lr_factor(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    assert lr_factor(cfg, 200) == 1.0 and lr_factor(cfg, 201) == pytest.approx(0.3)  # float64: ulps
    assert lr_factor(cfg, 251) == pytest.approx(0.09) and lr_factor(cfg, 300) == pytest.approx(0.09)


def test_cosine_and_constant_lr_per_epoch() -> None:
    cfg = TrainConfig(lr_schedule="cosine", epochs=20, lr=1e-3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for epoch in range(1, 21):
        # torch's recursive cosine update accumulates float64 rounding over <= 20 steps: < 1e-14
        assert 1e-3 * lr_factor(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    assert all(lr_factor(TrainConfig(), e) == 1.0 for e in range(1, 10))


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"lr_schedule": "multistep"}, "lr_milestones"),
        ({"lr_milestones": "200,x"}, "lr_milestones"),
        ({"lr_milestones": "250,200"}, "lr_milestones"),
        ({"lr_milestones": "0"}, "lr_milestones"),
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"das_gamma_low": 0.5}, "das_gamma_high"),
        ({"das_gamma_high": 2.0}, "das_gamma_low"),
        ({"das_gamma_low": 2.0, "das_gamma_high": 0.5}, "das_gamma_high"),
        ({"triplet_form": "cubed"}, "triplet_form"),
        ({"class_sampling": "sometimes"}, "class_sampling"),
        ({"das_bank_overflow": "drop"}, "das_bank_overflow"),
        ({"embedding_l2": -1.0}, "embedding_l2"),
    ],
)
def test_recipe_options_are_validated(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_mapping(values)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("200,250", (200, 250)),  # the CLI flag, and every config stored before the field was a tuple
        (" 200 , 250 ", (200, 250)),
        ([200, 250], (200, 250)),  # YAML and JSON lists
        ((200, 250), (200, 250)),
        (200, (200,)),  # YAML `lr_milestones: 200`
        ("", ()),
        ([], ()),
    ],
)
def test_lr_milestones_accepts_the_forms_users_and_old_files_use(given: object, want: tuple[int, ...]) -> None:
    cfg = TrainConfig.from_mapping({"lr_milestones": given})
    assert cfg.lr_milestones == want and isinstance(cfg.lr_milestones, tuple)


@pytest.mark.parametrize(
    ("given", "allowed"),
    [
        ([200.5], "whole numbers"),
        (True, "whole numbers"),
        (["200"], "whole numbers"),
        (None, "whole numbers"),
        ("200;250", "comma-separated"),
        ([250, 200], "strictly increasing"),
        ([200, 200], "strictly increasing"),
        ([0, 10], ">= 1"),
    ],
)
def test_lr_milestones_refuses_with_the_rule(given: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_mapping({"lr_milestones": given})
    assert info.value.field == "lr_milestones" and allowed in info.value.allowed


def test_lr_milestones_tuple_field_round_trips_through_json_yaml_and_the_flag(tmp_path: Path) -> None:
    from das_core.cli import build_parser
    from das_core.training.config import dump_config, load_config_file

    cfg = TrainConfig(lr_schedule="multistep", lr_milestones=(3, 7), epochs=10)
    cfg.validate()
    assert cfg.to_dict()["lr_milestones"] == [3, 7] and cfg.grouped()["optim"]["lr_milestones"] == [3, 7]
    assert TrainConfig.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg
    dump_config(cfg, tmp_path / "config.yaml")
    assert TrainConfig.from_mapping(load_config_file(tmp_path / "config.yaml")) == cfg
    args = vars(build_parser().parse_args(["train", "--lr-milestones", "3,7"]))
    assert TrainConfig.from_mapping({"lr_schedule": "multistep", "epochs": 10, "lr_milestones": args["lr_milestones"]}) == cfg
    # built directly (no from_mapping), the field is checked by validate(): a string there is refused
    with pytest.raises(ConfigError, match="tuple of whole numbers"):
        TrainConfig(lr_milestones="3,7").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strictly increasing"):
        TrainConfig(lr_milestones=(7, 3)).validate()


def test_resume_reads_a_run_folder_with_the_old_string_milestones(tmp_path: Path) -> None:
    """A run folder written before lr_milestones became a tuple holds `lr_milestones: 200,250`
    (or `''`) in its config.yaml; --resume still reads it."""
    from das_core.training.loop import resolve_resume_config

    for text, want in (("200,250", (200, 250)), ("''", ())):
        run = tmp_path / f"run{len(want)}"
        run.mkdir()
        schedule = "multistep" if want else "constant"
        (run / "config.yaml").write_text(
            f"data:\n  dataset: digits\noptim:\n  epochs: 300\n  lr_schedule: {schedule}\n  lr_milestones: {text}\n"
        )
        cfg = resolve_resume_config(run, {"epochs": 301})
        assert (cfg.lr_milestones, cfg.lr_schedule, cfg.epochs) == (want, schedule, 301)


def test_lr_per_epoch_in_a_training_run(tmp_path: Path) -> None:
    from das_core.store.io import read_jsonl
    from das_core.training.loop import train

    cfg = TrainConfig(
        dataset="digits", backbone="small-cnn", embedding_dim=16, batch_size=20, samples_per_class=4,
        epochs=3, steps_per_epoch=2, lr=1e-3, lr_schedule="multistep", lr_milestones=(1, 2), lr_factor=0.5,
        eval_every=3, device="cpu", out=str(tmp_path / "run"),
    )
    train(cfg, show_progress=False)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4], rel=1e-12)  # float64 products by 0.5 are exact


def test_lr_schedule_survives_resume(tmp_path: Path) -> None:
    """Stopped after epoch 2 (lr already halved) and resumed, the run continues the schedule
    from the base lr (kept in the optimiser state), not from the multiplied one."""
    from das_core.store.io import read_jsonl
    from das_core.training.loop import resolve_resume_config, train

    cfg = TrainConfig(
        dataset="digits", backbone="small-cnn", embedding_dim=16, batch_size=20, samples_per_class=4,
        epochs=2, steps_per_epoch=2, lr=1e-3, lr_schedule="multistep", lr_milestones=(1, 2), lr_factor=0.5,
        device="cpu", out=str(tmp_path / "run"),
    )
    train(cfg, show_progress=False)
    train(resolve_resume_config(tmp_path / "run", {"epochs": 3}), resume=True, show_progress=False)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4], rel=1e-12)


# ---------------------------------------------------------------------------- bank overflow


@pytest.mark.parametrize("path", ["compact", "fixed"])
def test_authors_overflow_matches_the_authors_ring_buffer(path: str) -> None:
    """A class bringing more than Z pairs (3 images: 6 pairs; 4 images: 12 > Z = 4) overwrites
    the bank with the last Z and keeps its pointer, exactly as the loop port of the authors'
    MemoryBank; FIFO gives the same rows in another layout, so later pushes differ."""
    c, d, z = 4, 6, 4
    g = torch.Generator().manual_seed(1)
    das = DenselyAnchoredSampling(c, d, bank_size=z, bank_overflow="authors")
    das._bank_path = path  # type: ignore[assignment]
    fifo = DenselyAnchoredSampling(c, d, bank_size=z)
    fifo._bank_path = path  # type: ignore[assignment]
    ref = ReferenceDAS(c, d, bank_size=z, bank_overflow="authors")
    batches = [
        [0, 0, 1, 1, 2, 2],  # 2 pairs each: pointers move to 2
        [0, 0, 0, 1, 1, 3, 3, 3, 3],  # class 0: 6 > 4 pairs, class 3: 12 > 4 (empty bank)
        [0, 0, 1, 1, 1, 3, 3],  # wrap-arounds after the overflow
        [0, 0, 0, 0, 2, 2],
    ]
    differs = False
    for labels_list in batches:
        labels = torch.tensor(labels_list)
        x = torch.randn(len(labels), d, generator=g)
        das.update(x, labels)
        fifo.update(x, labels)
        ref.update(x, labels)
        assert torch.equal(das.bank, ref.ring)
        assert das.bank_ptr.tolist() == ref.ring_ptr
        assert das.bank_filled.tolist() == ref.filled
        differs |= not torch.equal(das.bank, fifo.bank)
    assert differs


def test_authors_overflow_without_overflow_is_fifo() -> None:
    g = torch.Generator().manual_seed(2)
    a = DenselyAnchoredSampling(3, 5, bank_size=10, bank_overflow="authors")
    b = DenselyAnchoredSampling(3, 5, bank_size=10)
    for _ in range(6):
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        x = torch.randn(6, 5, generator=g)
        a.update(x, labels)
        b.update(x, labels)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ---------------------------------------------------------------------------- asymmetric gamma


def test_asymmetric_gamma_range() -> None:
    das = DenselyAnchoredSampling(
        2, 16, topk=4, num_produce=50, use_mts=False, normalize=False, gamma_range=(0.5, 2.0)
    )
    g = torch.Generator().manual_seed(3)
    x = torch.rand(200, 16, generator=g) + 0.5  # positive: the ratio is gamma itself
    labels = torch.arange(200) % 2
    das.update(x, labels)
    out = das.produce(x, labels, generator=g).view(50, 200, 16)
    ratio = out / x.unsqueeze(0)
    mask = das.mask[labels].unsqueeze(0).expand_as(ratio)
    # unmasked dims untouched: multiplied by exactly 1
    assert torch.equal(out[~mask], x.unsqueeze(0).expand_as(out)[~mask])
    gam = ratio[mask]
    # x·γ/x in float32 is γ to within a few ulps (1e-6 relative): bounds checked to 1e-5
    assert gam.min() >= 0.5 - 1e-5 and gam.max() < 2.0 + 1e-5
    # 40,000 draws: the extremes come within 0.01 of both ends (miss probability ~ e^-260)
    assert gam.min() < 0.51 and gam.max() > 1.99
    # U[0.5, 2) has mean 1.25, sd 0.433: the mean of 40,000 is within 5 SE (0.011)
    assert abs(float(gam.mean()) - 1.25) < 5 * 0.433 / math.sqrt(gam.numel())
    ref = ReferenceDAS(2, 16, topk=4, num_produce=1, use_mts=False, normalize=False, gamma_range=(0.5, 2.0))
    ref.update(x, labels)
    rg = (ref.produce(x, labels, generator=g) / x)[das.mask[labels]]
    assert rg.min() >= 0.5 - 1e-5 and rg.max() < 2.0 + 1e-5 and rg.max() > 1.9


def test_gamma_range_from_config_and_r_s_shorthand() -> None:
    from das_core.training.losses import build_das

    sym = build_das(TrainConfig(das=True, das_r_s=0.2), 3)
    asym = build_das(TrainConfig(das=True, das_gamma_low=0.5, das_gamma_high=2.0), 3)
    assert sym is not None and asym is not None
    assert sym._gamma_bounds(sym.r_s) == (0.8, 1.2) and sym.gamma_range is None
    assert asym._gamma_bounds(asym.r_s) == (0.5, 2.0)
    assert TrainConfig(das_r_s=0.3).gamma_range() == (0.7, 1.3)


# ---------------------------------------------------------------------------- BatchNorm freezing


@pytest.mark.parametrize("freeze_affine", [True, False])
def test_frozen_batchnorm_statistics_fixed_affine_as_configured(freeze_affine: bool) -> None:
    from das_core.models import build_model

    torch.manual_seed(0)
    cfg = TrainConfig(backbone="resnet50", pretrained=False, freeze_bn=True, freeze_bn_affine=freeze_affine,
                      embedding_dim=8, image_size=64)
    model = build_model(cfg).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]  # type: ignore[union-attr]
    affine = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in bns]
    assert all(m.weight.requires_grad is (not freeze_affine) for m in bns)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(4, 3, 64, 64)
    loss = model(x).pow(2).sum() + model.embed.weight.sum()
    loss.backward()
    opt.step()
    for m, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)  # type: ignore[arg-type]
    changed = any(not torch.equal(m.weight, w) or not torch.equal(m.bias, b) for m, (w, b) in zip(bns, affine, strict=True))
    assert changed is (not freeze_affine)


# ---------------------------------------------------------------------------- unnormalised + L2


def test_unnormalised_embeddings_and_l2_penalty() -> None:
    from das_core.models import build_model

    torch.manual_seed(0)
    model = build_model(TrainConfig(dataset="digits", embedding_dim=16, normalize_embeddings=False))
    x = torch.rand(6, 1, 28, 28)
    raw = model.train()(x)
    norms = raw.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))
    # float32 L2 normalisation divides by a norm off by <= (d/2 + 1)·2^-24 (d = 16: 5e-7);
    # measured in float64 (not with a second float32 norm) the rows are within 6e-7 of unit
    unit = model.eval()(x).detach().double().norm(dim=1)
    assert torch.allclose(unit, torch.ones_like(unit), atol=1e-6)

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)) * 3
    base = TrainConfig(loss="lifted", miner="none", normalize_embeddings=False, embedding_l2=0.0)
    plain = build_criterion(base, 3)(emb, labels)
    pen = build_criterion(base.replace(embedding_l2=0.005), 3)(emb, labels)
    # same loss, plus 0.005 * mean norm: float32 sums of O(10): 1e-5 absolute is ~100 ulps
    assert float(pen - plain) == pytest.approx(0.005 * float(emb.norm(dim=1).mean()), abs=1e-5)


def test_l2_penalty_covers_the_das_enlarged_batch() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(loss="lifted", miner="none", das=True, das_normalize=False, normalize_embeddings=False,
                      embedding_l2=0.5, embedding_dim=8, das_topk=2)
    crit = build_criterion(cfg, 3)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.manual_seed(1)
    total = crit(emb, labels)
    assert crit.das is not None
    crit.das.reset_state()
    torch.manual_seed(1)
    all_emb, all_labels = crit.das(emb, labels)
    want = crit._score(all_emb, all_labels)[0] + 0.5 * all_emb.norm(dim=1).mean()
    # the criterion's own expression on bit-identical inputs (same seed): equal, rel 1e-6 = 16 ulps
    assert float(total) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------------- presets, summary


def test_presets_json_is_every_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    from das_core.cli import main

    assert main(["presets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == list(PRESETS)
    for name, preset in PRESETS.items():
        assert doc[name] == preset.config().to_dict()
    for name in (n for n in PRESETS if n.startswith("paper-")):
        c = doc[name]
        assert (c["epochs"], c["lr_schedule"], c["lr_milestones"], c["lr_factor"]) == (300, "multistep", [200, 250], 0.3)
        assert c["class_sampling"] == "replacement" and c["das_bank_overflow"] == "authors"
        assert c["freeze_bn"] and not c["freeze_bn_affine"] and c["ms_beta"] == 40.0
    assert doc["paper-cub-triplet"]["triplet_form"] == "squared"
    assert (doc["paper-cub-ms512"]["batch_size"], doc["paper-cub-ms512"]["weight_decay"]) == (180, 8e-4)
    sop = doc["paper-sop-ms512"]
    assert (sop["das_topk"], sop["das_gamma_low"], sop["das_gamma_high"], sop["das_detach"]) == (8, 0.5, 2.0, False)
    assert doc["paper-cub-margin"]["loss_lr"] == 5e-4
    lifted = doc["paper-cub-lifted"]
    assert not lifted["normalize_embeddings"] and not lifted["das_normalize"] and lifted["embedding_l2"] == 0.005
    # the non-paper defaults stay as they were
    d = TrainConfig()
    assert (d.lr_schedule, d.class_sampling, d.das_bank_overflow, d.triplet_form) == (
        "constant", "distinct", "fifo", "plain")
    assert d.freeze_bn_affine and d.normalize_embeddings and d.embedding_l2 == 0.0


def test_best_test_epoch_is_labelled_and_separate_from_selection() -> None:
    hist = [
        {"epoch": 1, "val": {"R@1": 0.5}, "test": {"R@1": 0.40}},
        {"epoch": 2, "val": {"R@1": 0.7}, "test": {"R@1": 0.45}},
        {"epoch": 3, "val": {"R@1": 0.6}, "test": {"R@1": 0.50}},
        {"epoch": 4, "val": {"R@1": 0.6}, "test": {"R@1": 0.50}},
    ]
    best = best_test_epoch(hist, "R@1")
    assert best is not None
    assert (best["epoch"], best["value"]) == (3, 0.50)
    assert "TEST SET" in best["note"] and "not a model selection" in best["note"]
    assert best_test_epoch([{"epoch": 1, "train_loss": 1.0}], "R@1") is None


def test_summary_records_best_test_epoch(digits_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from das_core.cli import main

    summary = json.loads((digits_run / "summary.json").read_text())
    best = summary["best_test_epoch"]
    tests = {r["epoch"]: r["test"]["R@1"] for r in map(json.loads, (digits_run / "metrics.jsonl").read_text().splitlines())}
    assert best["value"] == max(tests.values()) and tests[best["epoch"]] == best["value"]
    assert summary["selected_epoch"] is not None  # validation selection unchanged
    assert main(["info", str(digits_run / "last.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["best_test_epoch"]["epoch"] == best["epoch"]


def test_recipe_options_from_flags_and_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from das_core.cli import main
    from das_core.training.config import load_config_file

    args = ["train", "--preset", "cpu-quick", "--dry-run", "--lr-schedule", "multistep", "--lr-milestones", "10,20",
            "--lr-factor", "0.5", "--das-gamma-low", "0.5", "--das-gamma-high", "2", "--das-bank-overflow", "authors",
            "--class-sampling", "replacement", "--triplet-form", "squared", "--no-freeze-bn-affine",
            "--no-normalize-embeddings", "--embedding-l2", "0.005"]
    assert main(args) == 0
    flat = {k: v for group in json.loads(capsys.readouterr().out).values() for k, v in group.items()}
    assert (flat["lr_milestones"], flat["lr_factor"], flat["das_gamma_low"], flat["das_gamma_high"]) == ([10, 20], 0.5, 0.5, 2.0)
    assert (flat["das_bank_overflow"], flat["class_sampling"], flat["triplet_form"]) == ("authors", "replacement", "squared")
    assert not flat["freeze_bn_affine"] and not flat["normalize_embeddings"] and flat["embedding_l2"] == 0.005
    f = tmp_path / "recipe.yaml"
    f.write_text("optim:\n  lr_schedule: multistep\n  lr_milestones: [200, 250]\n"
                 "das:\n  gamma_low: 0.5\n  gamma_high: 2.0\n  bank_overflow: authors\n")
    cfg = TrainConfig.from_mapping(load_config_file(f))
    assert (cfg.lr_milestones, cfg.gamma_range(), cfg.das_bank_overflow) == ((200, 250), (0.5, 2.0), "authors")
    assert main(["train", "--dry-run", "--das-gamma-low", "0.5"]) == 2
    assert "das_gamma_high" in capsys.readouterr().err


def test_npair_scores_raw_dot_products_when_unnormalised() -> None:
    emb = torch.randn(8, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    raw = build_criterion(TrainConfig(loss="npair", miner="none", normalize_embeddings=False), 4)
    unit = build_criterion(TrainConfig(loss="npair", miner="none"), 4)
    # normalised: scale-invariant (the same loss for 2x the embeddings, to rounding ~1e-15)
    assert float(unit(2 * emb, labels)) == pytest.approx(float(unit(emb, labels)), abs=1e-12)
    # raw dot products: scaling the embeddings changes the loss
    assert abs(float(raw(2 * emb, labels)) - float(raw(emb, labels))) > 1e-3
