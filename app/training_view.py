"""CPT in the dashboard: the train form (a background `chips train` job), the runs with their progress,
and their evaluation results."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from app import context, jobs_view
from chips_core.training import cpt
from chips_core.training.cpt import Recipe
from chips_core.workspace import catalog, store


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
            jobs_view.launch(
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
            jobs_view.launch(
                ws, "evaluate", ["evaluate", str(ws.root), ctx.eval_name, "--run", str(run_id)], required={}
            )
            st.rerun()

    _progress()


def _eval_results(ws: store.Workspace, run_id: Any) -> pd.DataFrame:
    """Evaluation metrics of a CPT run, one column per metric."""
    df = catalog.eval_results_of_run(ws, run_id)
    return df.pivot_table(index="eval_set", columns="metric", values="value").reset_index() if len(df) else df
