"""Background jobs in the dashboard: launch `chips ...` subprocesses and show their progress.

Long work never runs in the script thread: `chips_core.workspace.jobs.launch` starts a detached process that
writes its progress to the workspace `jobs` table, so a reload (or a closed tab) loses nothing; these panels
only read that table (short-lived connections) and refresh themselves while something runs.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn

import pandas as pd
import streamlit as st

from app import auth
from chips_core.team import roles
from chips_core.workspace import jobs, store


def launch(ws: store.Workspace, kind: str, argv: list[str], required: dict[str, str]) -> int | None:
    """Start a background job as the signed-in user after checking the form's required fields; says what
    happened (a role that may not start it is refused by chips_core, and the refusal shown)."""
    missing = [label for label, value in required.items() if not str(value).strip()]
    if missing:
        st.error(f"Fill in: {', '.join(missing)}.")
        return None
    try:
        job_id = jobs.launch(ws, kind, argv, actor=auth.actor())
    except (store.WorkspaceError, OSError, roles.AccessDenied) as exc:
        st.error(str(exc))
        return None
    # shown by the jobs panel, which may rerun the page once to start refreshing itself
    st.session_state["job_flash"] = f"Started {kind} as background job {job_id}; its progress shows below."
    return job_id


KIND_WORDS = {  # what each kind of job does, in plain words (the jobs table's "what it does" column)
    "ingest": "adding pairs to the workspace",
    "featurize": "the model looks at every image and caption",
    "prepare": "working out how useful each pair is, then the map",
    "map": "drawing the map of the pool",
    "train": "training the model on a selection",
    "evaluate": "testing the models on the eval set",
}


def _render_jobs(ws: store.Workspace, listed: list[jobs.JobInfo]) -> None:
    """Draw the job list, a cancel button per active job, and the log of a chosen job."""
    if not listed:
        st.caption("No jobs yet.")
        return
    df = pd.DataFrame([dataclasses.asdict(j) for j in listed])
    df["what it does"] = df["kind"].map(KIND_WORDS).fillna("")
    cols = ["job_id", "kind", "what it does", "status", "progress", "message", "started_at", "finished_at"]
    st.dataframe(
        df[cols],
        hide_index=True,
        key="jobs_table",
        column_config={
            "progress": st.column_config.ProgressColumn(
                "progress", min_value=0.0, max_value=1.0, help="How much of the job is done."
            ),
            "message": st.column_config.TextColumn(
                "message", help="What the job is doing now.", width="large"
            ),
        },
    )
    for job in listed:
        if not job.active:
            continue
        action = jobs.job_action(job.args)
        refused = auth.refusal(ws, action) if action is not None else None
        if st.button(
            f"Cancel job {job.job_id} ({job.kind})",
            key=f"cancel-{job.job_id}",
            disabled=bool(refused),
            help=refused or "Stop this job; what it finished so far is kept, and it can be run again.",
        ):
            try:
                jobs.cancel(ws, job.job_id, actor=auth.actor())
            except roles.AccessDenied as exc:
                st.error(str(exc))
            else:
                st.rerun()
    with st.expander("Log of a job (its full output, for when something went wrong)"):
        job_id = st.selectbox(
            "Job", [j.job_id for j in listed], key="log_job", help="The job whose log to show."
        )
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


def active_job(ws: store.Workspace, kind: str, pool: str) -> int | None:
    """The id of a queued or running `chips <kind> WS <pool> ...` job, or None."""
    listed = jobs.list_jobs(ws, active_only=True)
    return next((j.job_id for j in listed if j.kind == kind and j.args[2:3] == [pool]), None)


def background_step(ws: store.Workspace, kind: str, argv: list[str], what: str) -> NoReturn:
    """Follow the background job `chips <argv>` whose result the page needs, starting it when none runs;
    stops the page (the caller draws the result once it exists).

    One job for every session: a reload or a second tab finds the running job (`jobs.launch_once`) and shows
    its progress. A failed or cancelled last run is shown with its log and a button to run it again.
    """
    last = jobs.latest(ws, argv)
    action = jobs.job_action(argv)
    refused = auth.refusal(ws, action) if action is not None else None
    if refused and (last is None or not last.active):  # a viewer cannot start it: say who can
        st.info(f"{what}: not done yet. {refused}")
        st.stop()
    if last is not None and last.status in ("failed", "cancelled"):
        st.error(f"{what}: job {last.job_id} {last.status}: {last.message or 'no message'}")
        with st.expander(f"Log of job {last.job_id}"):
            st.code(jobs.read_log(ws, last.job_id)[-5000:] or "(empty)", language=None)
        if st.button("Run it again", key=f"rerun-{kind}", type="primary"):
            jobs.launch_once(ws, kind, argv, auth.actor())
            st.rerun()
        st.stop()
    job_id = (
        last.job_id if last is not None and last.active else jobs.launch_once(ws, kind, argv, auth.actor())
    )
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
