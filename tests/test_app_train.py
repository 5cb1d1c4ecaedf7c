"""The Train page through AppTest: the form generated from TrainConfig, presets, validation
messages, and a submitted job appearing in the live job list (its worker stopped afterwards)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from das_core.explorer import train_form
from das_core.store import jobs
from das_core.training.config import TrainConfig
from das_core.training.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent
PAGE = "app/pages/train.py"


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's own runs root; every job left in it is cancelled and its worker stopped."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DAS_RUNS_DIR", str(root))
    yield root
    for job in jobs.list_jobs(root):
        if job.active:
            jobs.cancel(job.id, root, grace=2.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(j.active for j in jobs.list_jobs(root)):
        time.sleep(0.2)  # polled: the jobs' files say when they have stopped
    for dev in jobs.DEVICES:
        pid = jobs.worker_pid(root, dev)
        if pid is not None:  # the worker exits by itself once its queue is empty; make sure
            os.killpg(pid, signal.SIGTERM)
    assert not any(j.active for j in jobs.list_jobs(root))


def page(**state: Any) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    return at.switch_page(PAGE)


def form_config(at: AppTest) -> TrainConfig:
    return train_form.config_from_form({f.name: at.session_state[f"train_f_{f.name}"] for f in train_form.config_fields()})


def test_form_has_every_option_and_presets_fill_it(runs_root: Path) -> None:
    at = page().run()
    assert not at.exception and not at.error
    for name in TrainConfig.field_names():  # one widget per option of the CLI
        assert f"train_f_{name}" in at.session_state, name
    assert len(at.expander) >= 7
    assert form_config(at) == PRESETS["cpu-demo"].config()
    assert not at.button(key="train_submit").disabled
    assert any("CPU" in i.value or "CUDA" in i.value for i in at.info)  # where jobs run
    at.selectbox(key="train_preset").set_value("paper-cub-ms512").run()
    assert not at.exception and not at.error
    assert form_config(at) == PRESETS["paper-cub-ms512"].config()
    assert at.session_state["train_f_backbone"] == "resnet50" and at.session_state["train_f_das_topk"] == 8
    assert at.text_input(key="train_f_lr_milestones").value == "200,250"  # a tuple field, shown as text
    assert any("--lr-milestones 200,250" in c.value for c in at.code)
    assert any("lr_milestones:\n  - 200\n  - 250" in c.value for c in at.code)  # the YAML the page shows
    assert any("--dataset cub200" in c.value for c in at.code)


def test_invalid_values_show_the_config_error(runs_root: Path) -> None:
    at = page().run()
    # r_s must lie in the open interval (0, 1): the widget's max is 1, and 1 itself is refused
    at.number_input(key="train_f_das_r_s").set_value(1.0).run()
    assert not at.exception
    assert len(at.error) == 1 and "das_r_s" in at.error[0].value and "< 1" in at.error[0].value
    assert at.button(key="train_submit").disabled
    # a cross-field rule: the batch is classes x samples per class
    at.number_input(key="train_f_das_r_s").set_value(0.05)
    at.number_input(key="train_f_batch_size").set_value(90)
    at.run()
    assert len(at.error) == 1 and "batch_size" in at.error[0].value and "multiple of samples_per_class" in at.error[0].value
    at.number_input(key="train_f_batch_size").set_value(80).run()
    assert not at.error and not at.button(key="train_submit").disabled
    assert form_config(at).das_r_s == 0.05
    # the form survives a visit to another page
    at.switch_page("app/pages/compare.py").run()
    at.switch_page(PAGE).run()
    assert not at.exception
    assert at.number_input(key="train_f_das_r_s").value == 0.05 and at.number_input(key="train_f_batch_size").value == 80


def test_submitted_job_appears_in_the_job_list(runs_root: Path) -> None:
    at = page(train_preset="cpu-quick").run()
    assert form_config(at) == PRESETS["cpu-quick"].config()
    at.number_input(key="train_f_epochs").set_value(1)
    at.number_input(key="train_f_steps_per_epoch").set_value(2)
    at.selectbox(key="train_f_device").set_value("cpu")
    at.text_input(key="train_name").input("tiny digits job")
    at.run()
    assert not at.error
    at.button(key="train_submit").click().run()
    assert not at.exception and not at.error
    (job,) = jobs.list_jobs(runs_root)
    assert job.name == "tiny digits job" and job.device == "cpu" and job.state in ("queued", "running", "done")
    assert job.config["epochs"] == 1 and job.config["steps_per_epoch"] == 2 and job.config["dataset"] == "digits"
    assert any("Queued **tiny digits job**" in s.value for s in at.success)
    at.run()  # the job list (a fragment refreshed every 2 s) shows it
    text = " ".join(m.value for m in at.markdown)
    assert job.id in text and "tiny digits job" in text
    cancel_key = f"train_cancel_{job.id}"
    if cancel_key in [b.key for b in at.button]:  # still queued or running: cancel it from the page
        at.button(key=cancel_key).click().run()
        assert not at.exception and not at.error
        now = jobs.get_job(job.id, runs_root)
        assert now.state == "cancelled" or now.cancel_requested or now.state in ("done", "failed")
