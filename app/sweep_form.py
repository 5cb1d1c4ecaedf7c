"""The Train page's sweep launcher (an Optuna sweep over the form's config, queued like a
training job) and a sweep job's card body. Rendering only: das_core parses, checks and runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from app import state, widgets
from das_core.explorer.sweep_view import cli_command
from das_core.store import sweeps
from das_core.training.config import ConfigError
from das_core.training.sweep import build_sweep

if TYPE_CHECKING:
    from das_core.store.jobs import Job
    from das_core.training.config import TrainConfig

DEFAULT_SPACE = {
    ("grid", True): "r_s=0.01,0.05,0.2\nr_b=0.01,0.1,0.5",
    ("tpe", True): "r_s=0.001:0.3\nr_b=0.001:1:log",
    # r_s and r_b act only with DAS on: without it, the learning rate as an example
    ("grid", False): "lr=0.0005,0.001,0.002",
    ("tpe", False): "lr=0.0001:0.01:log",
}
SAMPLER_NAMES = {"grid": "grid (every combination of the values)", "tpe": "TPE (Optuna's Bayesian search)"}
METRICS = ("val.R@1", "val.MAP@R", "test.R@1", "test.MAP@R")
SWEEPS_PAGE = "app/pages/sweeps.py"


def sweep_section(cfg: TrainConfig | None) -> None:
    """An expander under the form: search space, sampler, trials, score; *Start sweep* queues it."""
    with st.expander("Sweep over this config: search r_s and r_b (or any option) with Optuna"):
        if cfg is None:
            st.info("Fix the form first: the sweep trains the form's config with the searched options changed.")
            return
        st.caption("Each trial is a run of the form's config (same seed) with the searched options set; the "
                   "study is a SQLite file in the sweep's folder. The result: the *Sweeps* page.")
        sampler = st.radio("Sampler", ("grid", "tpe"), key="sweep_sampler", horizontal=True,
                           format_func=lambda s: SAMPLER_NAMES[s])
        if not cfg.das:
            st.caption("r_s and r_b act only with DAS on: switch on *das* in the form to search them.")
        key = f"sweep_space_{sampler}_{'das' if cfg.das else 'plain'}"
        st.session_state.setdefault(key, DEFAULT_SPACE[sampler, cfg.das])
        space = st.text_area(
            "Search space, one option per line", key=key, height=90,
            help="NAME=LOW:HIGH (a range; add :log for a log scale; TPE only) or NAME=V1,V2,... (values). NAME: "
                 "r_s, r_b, T, K, Z or any option of the form.",
        )
        c1, c2 = st.columns(2)
        trials = c1.number_input("Trials", 1, 1000, 12, key="sweep_trials", disabled=sampler == "grid",
                                 help="TPE: how many trials; the grid tries every combination once.")
        has_val = bool(cfg.val_classes or cfg.val_fraction)
        metrics = [m for m in METRICS if has_val or not m.startswith("val.")]
        metric = c2.selectbox("Score", metrics, key="sweep_metric",
                              help="From each trial's summary.json, the last epoch. Choosing on test.* is for "
                                   "comparison only; set val_fraction or val_classes for a validation split.")
        lines = [line.strip() for line in space.splitlines() if line.strip()]
        try:
            sweep = build_sweep(cfg, lines, sampler=sampler, n_trials=None if sampler == "grid" else int(trials),
                                metric=str(metric))
        except ConfigError as exc:
            st.error(f"**{exc.field}** = `{exc.value}` is not allowed: {exc.allowed}.", icon="⚠️")
            return
        st.caption(f"{sweep.target()} trials of {cfg.epochs} epoch(s) each.")
        st.code(cli_command(sweep, out=f"{state.runs_root()}/sweep1"), language="bash")
        if st.button("Start sweep", key="sweep_submit", type="primary", help="Queue the sweep on its device."):
            with widgets.guard("Submitting the sweep"):
                job = sweeps.submit_sweep(sweep, runs_root=state.runs_root())
            st.session_state["sweep_submitted"] = (job.id, job.name, job.device)
        if st.session_state.get("sweep_submitted"):
            jid, jname, jdev = st.session_state["sweep_submitted"]
            st.success(f"Queued **{jname}** on {jdev} (`{jid}`): see it in the job list and on the Sweeps page.")
            st.page_link(SWEEPS_PAGE, label="Open the Sweeps page", icon="🎯")


def sweep_job_body(job: Job) -> None:
    """A sweep job's progress (trials finished of the target) and best trial so far."""
    progress = sweeps.read_progress(job.run_dir)
    done, target = progress.get("done"), progress.get("target")
    if job.state == "running" and isinstance(done, int) and isinstance(target, int) and target > 0:
        trial = progress.get("trial")
        st.progress(min(1.0, done / target),
                    text=f"{done} of {target} trials finished" + (f" · trial {trial} running" if trial is not None else ""))
    summary = sweeps.read_run_summary(job.run_dir)
    best = summary.get("best")
    if isinstance(best, dict):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.get("params", {}).items())
        st.caption(f"Best: trial {best.get('trial')} · {params} · {summary.get('metric')} {best.get('value', 0.0):.4f}")
    st.page_link(SWEEPS_PAGE, label="See the trials on the Sweeps page", icon="🎯")
