"""CPT in the dashboard: the train form (a background `chips train` job), the runs with their progress,
and their evaluation results."""

from __future__ import annotations

import dataclasses

import pandas as pd
import plotly.express as px
import streamlit as st

from app import auth, context, jobs_view
from chips_core.training import cpt, evaluate
from chips_core.training.cpt import Recipe
from chips_core.workspace import catalog, jobs, store


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
            "Trains the model further on the pairs of a saved selection, so that it gets better at the "
            f"target domain; it starts from the model the pool was featurized with "
            f"(`{' '.join(model_flags[1:]) or '?'}`) and runs in the background. The defaults suit a first "
            "run."
        )
        with st.expander("For ML engineers: the training recipe"):
            st.markdown(
                f"open_clip_train, AdamW (β = {cpt.ADAM_BETAS}, ε = {cpt.ADAM_EPS:g}), cosine learning-rate "
                "schedule, InfoNCE loss with the model's own logit_scale; `chips train` on the command line."
            )
        sel = st.selectbox(
            "Selection", ids, format_func=labels.get, key="train_sel", help="The saved pairs to train on."
        )
        c1, c2, c3, c4 = st.columns(4)
        epochs = c1.number_input(
            "Epochs", 1, 100, d["epochs"], key="train_epochs",
            help="How many times training goes through all the selected pairs.",
        )  # fmt: skip
        lr = c2.number_input(
            "Learning rate", 1e-8, 1e-2, d["lr"], format="%.1e", key="train_lr",
            help="How big each training step is: too large can make the model forget what it knew.",
        )  # fmt: skip
        batch = c3.number_input(
            "Batch size", 2, 4096, d["batch_size"], key="train_batch",
            help="Pairs learned from together in one step; larger needs more memory.",
        )  # fmt: skip
        devices = ["cpu", "cuda"]
        device = c4.selectbox(
            "Device", devices, index=devices.index(d["device"]), key="train_device",
            help="cuda: the graphics card (much faster, when the server has one); cpu: the processor.",
        )  # fmt: skip
        refused = auth.refusal(ws, "train")
        if st.form_submit_button(
            "Train",
            type="primary",
            disabled=bool(refused),
            help=refused or "Start training (a background job).",
        ):
            argv = ["train", str(ws.root), "--selection", str(sel), *model_flags, "--epochs", str(epochs)]
            argv += ["--lr", repr(float(lr)), "--batch-size", str(batch), "--device", device]
            job_id = jobs_view.launch(
                ws,
                "train",
                argv,
                required={"Selection": "" if sel is None else str(sel), "Model": " ".join(model_flags)},
            )
            if job_id is not None:  # the runs panel follows the job and selects the run it makes
                st.session_state["cpt_follow_job"] = job_id


ACTIVE = ("preparing", cpt.ACTIVE)
REFRESH_S = 2


def _followed_job_active(ws: store.Workspace) -> bool:
    """Whether the train or evaluate job this session launched is still queued or running."""
    job_id = st.session_state.get("cpt_follow_job")
    if job_id is None:
        return False
    try:
        return jobs.job_status(ws, int(job_id)).active
    except jobs.JobError:
        return False


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _progress_text(p: cpt.RunProgress) -> str:
    """step/total · epoch · loss · ETA of a run, as shown in the table and above its bar."""
    if p.loss is None:
        return "starting…" if p.status in ACTIVE else "no step logged"
    text = f"step {p.done}/{p.total or '?'} · epoch {p.epoch:.2f}/{p.epochs} · loss {p.loss:.4f}"
    return text + (f" · ETA {_eta(p.eta_s)}" if p.status in ACTIVE else "")


def cpt_runs(ws: store.Workspace, ctx: context.ScoringContext) -> None:
    """CPT runs with live progress (step/total, loss, ETA), the loss curve and the evaluation before vs
    after; the panel refreshes itself every REFRESH_S while a run or this session's job is active."""
    live = _followed_job_active(ws) or any(catalog.cpt_runs_overview(ws)["status"].isin(ACTIVE))
    st.session_state["cpt_live"] = live

    @st.fragment(run_every=REFRESH_S if live else None)
    def _panel() -> None:
        runs = catalog.cpt_runs_overview(ws)
        now_live = _followed_job_active(ws) or any(runs["status"].isin(ACTIVE))
        if now_live != st.session_state.get("cpt_live"):  # start or stop the timer: rerun the page
            st.session_state["cpt_live"] = now_live
            st.rerun()
        _render(ws, ctx, runs)

    _panel()


def _render(ws: store.Workspace, ctx: context.ScoringContext, runs: pd.DataFrame) -> None:
    if runs.empty:
        st.caption(
            "Waiting for the training job to start…"
            if st.session_state.get("cpt_live")
            else "No training run yet."
        )
        return
    progress = {}
    for i in runs.index:
        run_id = int(runs.at[i, "cpt_run_id"])
        if runs.at[i, "status"] == cpt.ACTIVE:  # a run whose process is gone is recorded failed
            runs.at[i, "status"] = cpt.status(ws, run_id)
        if runs.at[i, "status"] in ACTIVE:
            progress[run_id] = cpt.live_progress(ws, run_id)
    runs.insert(
        4, "progress", [_progress_text(progress[r]) if r in progress else "" for r in runs["cpt_run_id"]]
    )
    st.dataframe(
        runs,
        hide_index=True,
        key="cpt_table",
        column_config={"progress": st.column_config.TextColumn("progress", width="large")},
    )
    newest = int(runs["cpt_run_id"].max())
    if st.session_state.get("cpt_newest") != newest:  # a new run (or the first look): select it
        st.session_state["cpt_newest"] = newest
        st.session_state["cpt_run"] = newest
    run_id = int(
        st.selectbox(
            "Run", runs["cpt_run_id"].tolist(), key="cpt_run", help="The training run to show (newest first)."
        )
    )
    row = runs.loc[runs["cpt_run_id"] == run_id].iloc[0]
    status = row["status"]
    if run_id in progress:
        p = progress[run_id]
        st.progress(p.fraction, text=f"Run {run_id} {status}: {_progress_text(p)}")
    elif status == "cancelled":
        st.warning(f"Run {run_id} was cancelled; its finished epochs are kept (`chips cpt-resume`).")
    elif status == "failed":
        st.error(f"Run {run_id} failed: the log of its training job is in the jobs panel below.")
    prog = catalog.cpt_progress(ws, run_id)
    if prog.empty:
        st.caption("No progress logged yet." if status in ACTIVE else "No step was logged.")
    else:
        fig = px.line(
            prog, x="step", y="loss", height=300,
            title=f"training loss, run {run_id} (lower: the model fits the selected pairs better)",
        )  # fmt: skip
        st.plotly_chart(fig, key=f"loss-{run_id}")
    if status == "finished":
        _evaluation(ws, ctx, run_id)


def _evaluation(ws: store.Workspace, ctx: context.ScoringContext, run_id: int) -> None:
    """Base model vs trained per metric with the change, as a table and a grouped bar chart."""
    cmp = evaluate.compare_run(ws, run_id)
    mine = cmp[cmp["eval_set"] == ctx.eval_name]  # the eval set chosen in the sidebar
    complete = not mine.empty and mine[["base", "trained"]].notna().all().all()
    if not cmp.empty:
        st.markdown(f"**Evaluation of run {run_id}: base model (before) vs trained (after)**")
        st.caption(
            "How well each model finds the right caption for an image of the eval set, and the reverse "
            "(higher is better); the change is after minus before."
        )
        st.dataframe(
            cmp.rename(columns={"change": "change (Δ)"}),
            hide_index=True,
            key=f"eval-{run_id}",
            column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("base", "trained")}
            | {"change (Δ)": st.column_config.NumberColumn(format="%+.3f")},
        )
        long = cmp.melt(id_vars=["eval_set", "metric"], value_vars=["base", "trained"], var_name="model")
        fig = px.bar(
            long, x="metric", y="value", color="model", barmode="group", facet_row="eval_set", height=320,
            title=f"before vs after, run {run_id}",
        )  # fmt: skip
        st.plotly_chart(fig, key=f"eval-chart-{run_id}")
    if complete or _followed_job_active(ws):
        return
    refused = auth.refusal(ws, "train")
    label = f"Evaluate the base model and run {run_id} on {ctx.eval_name}"
    if st.button(label, key="cpt_eval", disabled=bool(refused), help=refused):
        argv = ["evaluate", str(ws.root), ctx.eval_name, "--run", str(run_id), "--with-base"]
        job_id = jobs_view.launch(ws, "evaluate", argv, required={})
        if job_id is not None:
            st.session_state["cpt_follow_job"] = job_id
        st.rerun()
