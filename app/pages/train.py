"""Train: every option of ``python -m das_core train`` as a form (generated from TrainConfig's
fields and rules), presets for the paper's settings and the CPU demos, validation before
submitting, and the live list of background jobs (one at a time per device, on disk)."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from app import plots, state, sweep_form, widgets
from das_core.explorer import runs_view, train_form
from das_core.models.embed import gpu_name
from das_core.store import jobs
from das_core.training.config import ConfigError
from das_core.training.presets import PRESETS

st.title("Train")
st.caption(
    "Every option of the training CLI, validated before it starts. Jobs run in the background as "
    "`python -m das_core train` processes, one at a time per device; they live on disk, so reloading the "
    "page or restarting the app finds them again, and a finished run appears in every checkpoint picker."
)

FIELDS = train_form.fields_by_group()
SPECS = [s for group in FIELDS.values() for s in group]
GROUP_TITLES = {
    "data": "Data", "model": "Model", "loss": "Loss and miner", "pddm": "PDDM",
    "das": "DAS (Densely-Anchored Sampling)", "optim": "Optimisation", "run": "Run",
}
OPEN_GROUPS = ("data", "model", "loss", "das", "optim")
DEFAULT_PRESET = "cpu-demo"
NO_PRESET = "(defaults)"
# Set by the job queue, never by the form: the run folder.
QUEUE_SET = {"out": "set by the queue: a new run folder under the runs root"}


def _key(name: str) -> str:
    return f"train_f_{name}"


def apply_preset() -> None:
    """Fill every field of the form with the chosen preset's values (over the defaults)."""
    name = st.session_state.get("train_preset", NO_PRESET)
    values = train_form.form_values(None if name == NO_PRESET else name)
    for spec in SPECS:
        v = values[spec.name]
        st.session_state[_key(spec.name)] = "" if (spec.kind == "str" and v is None) else v
    st.session_state.pop("train_submitted", None)


if _key("dataset") not in st.session_state:  # first visit, or back from another page
    saved = st.session_state.get("train_saved")  # (Streamlit drops the widgets' state on leaving a page)
    if saved:
        st.session_state["train_preset"] = saved["preset"]
        for name, v in saved["values"].items():
            st.session_state[_key(name)] = v
    else:
        st.session_state.setdefault("train_preset", DEFAULT_PRESET)
        apply_preset()

# -- where jobs run -------------------------------------------------------------------------------
# where jobs run: what the job queue sees (das_core.store.jobs picks CUDA for "auto" when torch sees a GPU)
gpu = gpu_name()
if gpu is not None:
    where = f"**CUDA** ({gpu})"
else:
    where = f"the **CPU** ({jobs.cpu_job_threads()} thread(s); one core is left for the app)"
st.info(f"Jobs with device `auto` run on {where}, one at a time; the others wait in the queue. "
        f"Runs are written to `{state.runs_root()}`.")

left, right = st.columns([5, 4], gap="large")

# -- the form -------------------------------------------------------------------------------------
with left:
    st.subheader("New training job")
    names = [NO_PRESET, *PRESETS]
    st.selectbox("Preset (fills the form)", names, key="train_preset", on_change=apply_preset,
                 format_func=lambda n: n if n == NO_PRESET else f"{n}: {PRESETS[n].description}",
                 help="The paper's settings (ResNet-50 on CUB / CARS / SOP) and fast CPU demos. Any field "
                      "can be changed afterwards.")
    st.button("Reset the form to this preset", key="train_reset", on_click=apply_preset)

    values: dict[str, Any] = {}
    for group, specs in FIELDS.items():
        if not specs:
            continue
        with st.expander(f"{GROUP_TITLES.get(group, group)} · {len(specs)} options", expanded=group in OPEN_GROUPS):
            cols = st.columns(3)
            for i, spec in enumerate(specs):
                col = cols[i % 3]
                key = _key(spec.name)
                help_text = f"{spec.help}. Allowed: {spec.allowed}." + (" Empty = the default." if spec.optional else "")
                if spec.name in QUEUE_SET:
                    col.text_input(spec.name, key=key, disabled=True, placeholder=QUEUE_SET[spec.name],
                                   help=QUEUE_SET[spec.name])
                    values[spec.name] = None
                elif spec.kind == "choice":
                    assert spec.choices is not None
                    values[spec.name] = col.selectbox(spec.name, spec.choices, key=key, help=help_text)
                elif spec.kind == "bool":
                    values[spec.name] = col.toggle(spec.name, key=key, help=help_text)
                elif spec.kind in ("int", "float"):
                    extra: dict[str, Any] = {"value": None, "placeholder": "default"} if spec.optional else {}
                    values[spec.name] = col.number_input(
                        spec.name, min_value=spec.min_value, max_value=spec.max_value, step=spec.step,
                        format="%d" if spec.kind == "int" else "%g", key=key, help=help_text, **extra,
                    )
                else:
                    hint = "e.g. 200,250" if spec.kind == "ints" else ""  # whole numbers as text
                    values[spec.name] = col.text_input(spec.name, key=key, help=help_text,
                                                       placeholder="default" if spec.optional else hint)

    st.session_state["train_saved"] = {
        "preset": st.session_state["train_preset"],
        "values": {spec.name: st.session_state[_key(spec.name)] for spec in SPECS},
    }
    cfg = None
    try:
        cfg = train_form.config_from_form(values)
    except ConfigError as exc:
        err = train_form.describe_config_error(exc)
        st.error(f"**{err['field']}** = `{err['value']}` is not allowed: {err['allowed']}.", icon="⚠️")

    run_name = st.text_input("Job name (optional)", key="train_name",
                             placeholder="e.g. triplet + DAS, r_s 0.05" if cfg is None else jobs.default_name(cfg))
    if cfg is not None:
        with st.expander("As a command line and a config file"):
            st.code(train_form.cli_command(cfg), language="bash")
            import yaml

            st.code(yaml.safe_dump(cfg.grouped(), sort_keys=False), language="yaml")
    if st.button("Start training", type="primary", key="train_submit", disabled=cfg is None,
                 help="Fix the value shown in red first." if cfg is None else "Queue the job on its device."):
        assert cfg is not None
        with widgets.guard("Submitting the job"):
            job = jobs.submit(cfg, runs_root=state.runs_root(), name=run_name.strip() or None)
        st.session_state["train_submitted"] = (job.id, job.name, job.device)
    if st.session_state.get("train_submitted"):
        jid, jname, jdev = st.session_state["train_submitted"]
        st.success(f"Queued **{jname}** on {jdev} (`{jid}`): see it in the job list.")
    sweep_form.sweep_section(cfg)

# -- the jobs -------------------------------------------------------------------------------------
STATE_BADGE = {"queued": ("⏳ queued", "gray"), "running": ("▶ running", "blue"), "done": ("✔ done", "green"),
               "failed": ("✖ failed", "red"), "cancelled": ("■ cancelled", "orange")}


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "?"


def show_job(job: jobs.Job, queue_pos: int | None) -> None:
    with st.container(border=True):
        label, colour = STATE_BADGE.get(job.state, (job.state, "gray"))
        c1, c2 = st.columns([3, 1])
        c1.markdown(f"**{job.name or job.id}**  \n`{job.id}` · {job.device} · submitted {_when(job.created)}")
        c2.badge(label, color=colour)
        if job.state == "queued":
            st.caption(f"Waiting for the {job.device} worker" + (f" (position {queue_pos} in the queue)." if queue_pos else "."))
        if job.kind == "sweep":  # its trials are run folders inside it: the Sweeps page shows them
            sweep_form.sweep_job_body(job)
        elif job.state == "running":
            prog = runs_view.progress_summary(jobs.read_progress(job))
            st.progress(prog["fraction"], text=prog["text"] + (" · cancelling…" if job.cancel_requested else ""))
        if job.state == "failed":
            reason = (job.error or "no reason recorded").split("\n\n", 1)[0]  # the log's tail is just below
            st.error(f"**Failed**: {reason}")
        curves = runs_view.run_curves(job.run_dir)
        if curves["epoch"]:
            ep = curves["epoch"]
            ca, cb = st.columns(2)
            ca.plotly_chart(plots.curves({"train loss": (ep, curves["train_loss"])}, y_title="loss", height=220),
                            key=f"train_loss_{job.id}", width="stretch")
            r1 = {f"{s} R@1": (ep, curves[f"{s} R@1"]) for s in ("test", "val")
                  if any(v == v for v in curves[f"{s} R@1"])}
            if r1:
                fig = plots.curves(r1, y_title="R@1", height=220, percent=True)
                fig.update_layout(legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
                                  margin={"t": 24})
                cb.plotly_chart(fig, key=f"train_r1_{job.id}", width="stretch")
        if job.state == "done":
            r = runs_view.run_row(job.run_dir)
            if r is not None and r["R@1"] is not None:
                st.caption(f"Test (epoch {r['test epoch']}): R@1 {100 * r['R@1']:.2f} % · MAP@R {100 * r['MAP@R']:.2f} % · "
                           f"NMI {100 * r['NMI']:.2f} %. In every checkpoint picker as *run · {job.id}*.")
        if job.active and st.button("Cancel", key=f"train_cancel_{job.id}"):
            with widgets.guard("Cancelling"):
                new_state = jobs.cancel(job.id, state.runs_root())
            st.toast(f"{job.id}: {new_state}")
        with st.expander("Log (last 40 lines)", expanded=job.state == "failed"):
            st.code(jobs.log_tail(job, 40) or "(no output yet)", language="text")


@st.fragment(run_every=2.0)
def jobs_panel() -> None:
    st.subheader("Jobs")
    with widgets.guard("Reading the jobs"):
        all_jobs, damaged = jobs.scan_jobs(state.runs_root())
    for bad in damaged:  # one bad job.json is shown as such; it never hides the other jobs
        st.warning(f"**Damaged job** in `{bad.run_dir}`: {bad.problem}")
    if not all_jobs:
        if not damaged:
            st.info("No job yet: fill the form and press *Start training*.")
        return
    counts = {s: sum(j.state == s for j in all_jobs) for s in jobs.STATES}
    st.caption(" · ".join(f"{n} {s}" for s, n in counts.items() if n) + " · refreshed every 2 s")
    queued = sorted((j for j in all_jobs if j.state == "queued"), key=lambda j: j.created)
    pos = {j.id: i + 1 for i, j in enumerate(queued)}
    limit = 8
    show_all = len(all_jobs) > limit and st.toggle(f"Show all {len(all_jobs)} jobs", key="train_all_jobs")
    for job in all_jobs if show_all else all_jobs[:limit]:
        show_job(job, pos.get(job.id))


with right:
    jobs_panel()
