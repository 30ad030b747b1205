"""Workspace: pick or create a workspace, add a pool and an eval set, featurize and prepare (as jobs)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import auth, context, jobs_view
from chips_core.scoring import params as sp
from chips_core.scoring.params import PrepareConfig
from chips_core.workspace import catalog, store

st.title("Workspace")
path, is_demo = context.workspace_path()


def _use_workspace(new_path: str, create: bool) -> None:
    """Button callback (runs before the rerun, so it may set the sidebar widget): switch, create if asked."""
    try:
        if create:
            store.Workspace.init(new_path)
        else:
            store.Workspace(new_path).check()
    except (store.WorkspaceError, OSError) as exc:
        st.session_state["ws_error"] = str(exc)
        return
    st.session_state["ws_path"] = str(Path(new_path).expanduser().resolve())


with st.container(border=True):
    st.markdown(f"**Current workspace:** `{path}`" + (" (the bundled demo)" if is_demo else ""))
    new_path = st.text_input(
        "Open or create a workspace folder", key="ws_new_path", placeholder="/data/my-workspace"
    )
    c1, c2, _ = st.columns([1, 1, 4])
    c1.button(
        "Open", key="ws_open", on_click=_use_workspace, args=(new_path, False), disabled=not new_path.strip()
    )
    c2.button(
        "Create",
        key="ws_create",
        on_click=_use_workspace,
        args=(new_path, True),
        disabled=not new_path.strip(),
    )
    if st.session_state.get("ws_error"):
        st.error(st.session_state.pop("ws_error"))

ws = context.workspace()
refused = auth.refusal(ws, "manage")  # adding data and workspace jobs need a lead (chips_core checks it)

st.subheader("Pools and eval sets")
all_pools = catalog.pools_overview(ws).rename(columns={"rejects": "rejected"})
all_pools = all_pools[["name", "kind", "format", "status", "source", "pairs", "rejected"]]
if all_pools.empty:
    st.info("No pool yet: add a training pool and a target eval set below.")
else:
    st.dataframe(all_pools, hide_index=True, key="pools_table")
    rejects = catalog.rejects_overview(ws)
    if not rejects.empty:
        with st.expander(f"Rejected inputs by reason ({int(rejects['n'].sum())})"):
            st.dataframe(rejects, hide_index=True)

add, feat, prep = st.tabs(["Add a pool or eval set", "Featurize", "Prepare scoring"])
with add, st.form("ingest_form"):
    st.caption(
        "Any format the `chips ingest` command reads: a CSV/TSV/parquet manifest (open_clip's "
        "`filepath`/`title` columns by default), a folder of images with .txt captions, WebDataset .tar "
        "shards, or DICOM files."
    )
    name = st.text_input("Name", key="ing_name")
    source = st.text_input("Source (file, folder or shard pattern)", key="ing_source")
    kind = st.radio(
        "Kind",
        ["pool", "eval"],
        horizontal=True,
        key="ing_kind",
        format_func={"pool": "training pool", "eval": "target eval set"}.get,
    )
    c1, c2, c3 = st.columns(3)
    image_col = c1.text_input("Image column", "filepath", key="ing_img")
    caption_col = c2.text_input("Caption column", "title", key="ing_cap")
    label_col = c3.text_input("Label column (optional)", "", key="ing_label")
    c4, c5 = st.columns(2)
    encoding = c4.text_input(
        "Text encoding", "auto", key="ing_encoding", help="auto detects it (and reports it); or e.g. latin-1"
    )
    replace = c5.checkbox(
        "Replace a pool of this name",
        key="ing_replace",
        help="Refused while anything depends on the pool (feature runs, caches, selections...).",
    )
    if st.form_submit_button("Ingest", type="primary", disabled=bool(refused), help=refused):
        argv = ["ingest", str(ws.root), name, source, "--image-col", image_col, "--caption-col", caption_col]
        argv += (["--eval"] if kind == "eval" else []) + (
            ["--label-col", label_col] if label_col.strip() else []
        )
        argv += ["--encoding", encoding.strip() or "auto"] + (["--replace"] if replace else [])
        jobs_view.launch(ws, "ingest", argv, required={"Name": name, "Source": source})

pool_names = all_pools["name"].tolist()
models = catalog.models_overview(ws)
with feat, st.form("featurize_form"):
    st.caption("Runs the image and text encoders once per pair and caches the features (resumable).")
    pool = st.selectbox("Pool or eval set", pool_names, key="feat_pool")
    default_model = str(models["name"].iloc[0]) if len(models) else "ViT-B-16"
    model = st.text_input(
        "Model (open_clip name, local checkpoint file, or hf-hub: id)", default_model, key="feat_model"
    )
    pretrained = st.text_input("Pretrained tag or checkpoint (optional)", "", key="feat_pretrained")
    device = st.selectbox("Device", ["auto", "cpu", "cuda"], key="feat_device")
    random_init = st.checkbox(
        "Random weights (testing only)",
        key="feat_random_init",
        help="A model with published weights needs a pretrained tag or checkpoint; tick this to use random "
        "weights on purpose.",
    )
    if st.form_submit_button("Featurize", type="primary", disabled=bool(refused), help=refused):
        argv = ["featurize", str(ws.root), str(pool), "--model", model, "--device", device]
        argv += ["--pretrained", pretrained] if pretrained.strip() else []
        argv += ["--random-init"] if random_init else []
        jobs_view.launch(ws, "featurize", argv, required={"Pool": pool or "", "Model": model})

evals = all_pools.loc[all_pools["kind"] == "eval", "name"].tolist() if len(all_pools) else []
train_pools = all_pools.loc[all_pools["kind"] == "pool", "name"].tolist() if len(all_pools) else []
with prep, st.form("prepare_form"):
    st.caption(
        "Closed-form per-pair gradients, the sketch at k_max, curvature and the target gradient: after this, "
        "every slider on the Scores page runs in milliseconds."
    )
    c1, c2 = st.columns(2)
    p_pool = c1.selectbox("Pool", train_pools, key="prep_pool")
    p_eval = c2.selectbox("Eval set", evals, key="prep_eval")
    c3, c4, c5 = st.columns(3)
    d = PrepareConfig()  # the form's defaults are the library's
    k_options = sorted({256, 512, 1024, 2048, 4096, d.k_max})
    k_max = c3.select_slider("k_max", options=k_options, value=d.k_max, key="prep_kmax")
    sketch = c4.selectbox("Sketch", sp.SKETCHES, index=sp.SKETCHES.index(d.sketch), key="prep_sketch")
    batch = c5.number_input("InfoNCE batch size", 2, 65536, d.batch_size, key="prep_batch")
    blocks = st.multiselect(
        "Parameter blocks scored",
        list(sp.BLOCKS),
        default=list(sp.parse_blocks(d.blocks)),
        key="prep_blocks",
        help="The recommended default leaves the temperature out (docs/SCORING.md); the paper scores all "
        "three.",
    )
    if st.form_submit_button("Prepare", type="primary", disabled=bool(refused), help=refused):
        argv = ["prepare", str(ws.root), str(p_pool), "--eval", str(p_eval), "--k-max", str(k_max)]
        argv += ["--sketch", sketch, "--batch-size", str(batch)]
        argv += ["--blocks", ",".join(blocks or sp.parse_blocks(d.blocks))]
        jobs_view.launch(ws, "prepare", argv, required={"Pool": p_pool or "", "Eval set": p_eval or ""})

st.subheader("Jobs")
st.caption("Jobs run as separate processes: they keep going if this tab is closed or reloaded.")
jobs_view.jobs_panel(ws)
