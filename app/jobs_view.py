"""Background jobs in the dashboard: launch `chips ...` subprocesses, show progress, CPT runs and results.

Long work never runs in the script thread: `chips_core.workspace.jobs.launch` starts a detached process
that writes
its progress to the workspace `jobs` table, so a reload (or a closed tab) loses nothing; these panels only
read that table (short-lived connections) and refresh themselves while something runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

import pandas as pd
import plotly.express as px
import streamlit as st

from app import context
from chips_core.training import cpt
from chips_core.training.cpt import Recipe
from chips_core.workspace import catalog, jobs, store


def launch(ws: store.Workspace, kind: str, argv: list[str], required: dict[str, str]) -> int | None:
    """Start a background job after checking the form's required fields; says what happened."""
    missing = [label for label, value in required.items() if not str(value).strip()]
    if missing:
        st.error(f"Fill in: {', '.join(missing)}.")
        return None
    try:
        job_id = jobs.launch(ws, kind, argv)
    except (store.WorkspaceError, OSError) as exc:
        st.error(str(exc))
        return None
    # shown by the jobs panel, which may rerun the page once to start refreshing itself
    st.session_state["job_flash"] = f"Started {kind} as background job {job_id}; its progress shows below."
    return job_id


def _render_jobs(ws: store.Workspace, listed: list[jobs.JobInfo]) -> None:
    """Draw the job list, a cancel button per active job, and the log of a chosen job."""
    if not listed:
        st.caption("No jobs yet.")
        return
    df = pd.DataFrame([dataclasses.asdict(j) for j in listed])
    cols = ["job_id", "kind", "status", "progress", "message", "started_at", "finished_at"]
    st.dataframe(
        df[cols],
        hide_index=True,
        key="jobs_table",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)},
    )
    for job in listed:
        if job.active and st.button(f"Cancel job {job.job_id} ({job.kind})", key=f"cancel-{job.job_id}"):
            jobs.cancel(ws, job.job_id)
            st.rerun()
    with st.expander("Log of a job"):
        job_id = st.selectbox("Job", [j.job_id for j in listed], key="log_job")
        st.code(jobs.read_log(ws, int(job_id))[-5000:] or "(empty)", language=None)


def jobs_panel(ws: store.Workspace) -> None:
    """The job list, refreshed every 2 s by a fragment while a job is active (the page does not rerun)."""

    @st.fragment(run_every=2 if st.session_state.get("jobs_active", False) else None)
    def _panel() -> None:
        listed = jobs.list_jobs(ws)
        active = any(j.active for j in listed)
        if active != st.session_state.get("jobs_active", False):  # start/stop the timer: rerun the page
            st.session_state["jobs_active"] = active
            st.rerun()
        if "job_flash" in st.session_state:
            st.success(st.session_state.pop("job_flash"))
        _render_jobs(ws, listed)

    _panel()


def background_step(ws: store.Workspace, kind: str, argv: list[str], what: str) -> NoReturn:
    """Follow the background job `chips <argv>` whose result the page needs, starting it when none runs;
    stops the page (the caller draws the result once it exists).

    One job for every session: a reload or a second tab finds the running job (`jobs.launch_once`) and shows
    its progress. A failed or cancelled last run is shown with its log and a button to run it again.
    """
    last = jobs.latest(ws, argv)
    if last is not None and last.status in ("failed", "cancelled"):
        st.error(f"{what}: job {last.job_id} {last.status}: {last.message or 'no message'}")
        with st.expander(f"Log of job {last.job_id}"):
            st.code(jobs.read_log(ws, last.job_id)[-5000:] or "(empty)", language=None)
        if st.button("Run it again", key=f"rerun-{kind}", type="primary"):
            jobs.launch_once(ws, kind, argv)
            st.rerun()
        st.stop()
    job_id = last.job_id if last is not None and last.active else jobs.launch_once(ws, kind, argv)
    job_progress(ws, job_id, what)
    st.stop()


def job_progress(ws: store.Workspace, job_id: int, what: str) -> None:
    """One job's progress bar and row (cancel button, log), refreshed every 2 s by a fragment; the whole
    page reruns when the job ends."""

    @st.fragment(run_every=2)
    def _panel() -> None:
        info = jobs.job_status(ws, job_id)
        if not info.active:
            st.rerun()
        fraction = min(max(float(info.progress or 0.0), 0.0), 1.0)
        st.progress(fraction, text=f"{what}: {info.message or info.status}")
        st.caption(
            f"Background job {job_id}: `chips {' '.join(info.args)}`. It keeps running when this tab is "
            "closed or reloaded; another tab shows the same job."
        )
        _render_jobs(ws, [info])

    _panel()


def _model_flags(ws: store.Workspace, run_id: int) -> list[str]:
    """`--model NAME [--pretrained TAG_OR_CHECKPOINT]` of the model a feature run was made with."""
    spec = catalog.run_model_spec(ws, run_id)
    if spec is None:
        return []
    flags = ["--model", spec.name]
    if spec.random_init:  # unpretrained weights: open_clip_train starts from its own init
        return flags
    # a local checkpoint file (a local-dir bundle holds one), else the tag
    _, pretrained, _ = spec.load_args()
    return [*flags, "--pretrained", pretrained] if pretrained else flags


def train_form(
    ws: store.Workspace, ctx: context.ScoringContext, ids: list[int], labels: dict[int, str]
) -> None:
    """Launch CPT of the pool's model on a saved selection (open_clip_train in a background job)."""
    model_flags = _model_flags(ws, ctx.pool_run_id)
    d = {f.name: f.default for f in dataclasses.fields(Recipe)}  # the form's defaults are the recipe's
    with st.form("train_form"):
        st.caption(
            f"Continual pre-training with open_clip_train (AdamW β={cpt.ADAM_BETAS}, ε={cpt.ADAM_EPS:g}, "
            "cosine schedule), "
            f"starting from the model the pool was featurized with (`{' '.join(model_flags[1:]) or '?'}`)."
        )
        sel = st.selectbox("Selection", ids, format_func=labels.get, key="train_sel")
        c1, c2, c3, c4 = st.columns(4)
        epochs = c1.number_input("Epochs", 1, 100, d["epochs"], key="train_epochs")
        lr = c2.number_input("Learning rate", 1e-8, 1e-2, d["lr"], format="%.1e", key="train_lr")
        batch = c3.number_input("Batch size", 2, 4096, d["batch_size"], key="train_batch")
        devices = ["cpu", "cuda"]
        device = c4.selectbox("Device", devices, index=devices.index(d["device"]), key="train_device")
        if st.form_submit_button("Train", type="primary"):
            argv = ["train", str(ws.root), "--selection", str(sel), *model_flags, "--epochs", str(epochs)]
            argv += ["--lr", repr(float(lr)), "--batch-size", str(batch), "--device", device]
            launch(
                ws,
                "train",
                argv,
                required={"Selection": "" if sel is None else str(sel), "Model": " ".join(model_flags)},
            )


def cpt_runs(ws: store.Workspace, ctx: context.ScoringContext) -> None:
    """CPT runs with their loss curve and evaluation results (refreshing while one trains)."""
    runs = catalog.cpt_runs_overview(ws)
    if runs.empty:
        st.caption("No training run yet.")
        return
    st.dataframe(runs, hide_index=True, key="cpt_table")
    run_id = int(st.selectbox("Run", runs["cpt_run_id"].tolist(), key="cpt_run"))
    row = runs.loc[runs["cpt_run_id"] == run_id].iloc[0]

    @st.fragment(run_every=3 if row["status"] == "running" else None)
    def _progress() -> None:
        prog = catalog.cpt_progress(ws, run_id)
        if prog.empty:
            st.caption("No progress logged yet.")
        else:
            fig = px.line(prog, x="step", y="loss", title=f"training loss, run {run_id}", height=300)
            st.plotly_chart(fig, key=f"loss-{run_id}")
        results = _eval_results(ws, run_id)
        if not results.empty:
            st.dataframe(results, hide_index=True, key=f"eval-{run_id}")
        elif row["status"] == "finished" and st.button(
            f"Evaluate run {run_id} on {ctx.eval_name}", key="cpt_eval"
        ):
            launch(
                ws, "evaluate", ["evaluate", str(ws.root), ctx.eval_name, "--run", str(run_id)], required={}
            )
            st.rerun()

    _progress()


def _eval_results(ws: store.Workspace, run_id: Any) -> pd.DataFrame:
    """Evaluation metrics of a CPT run, one column per metric."""
    df = catalog.eval_results_of_run(ws, run_id)
    return df.pivot_table(index="eval_set", columns="metric", values="value").reset_index() if len(df) else df
