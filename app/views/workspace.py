"""Workspace: pick or create a workspace, add a pool and an eval set, featurize and prepare (as jobs).

Every control says in plain words what it does for the clinician; the technical settings of prepare sit in a
"For ML engineers" expander."""

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


def _choose_workspace() -> None:
    """Open or create a workspace folder (single-user mode)."""
    new_path = st.text_input(
        "Open or create a workspace folder",
        key="ws_new_path",
        placeholder="/data/my-workspace",
        help="A workspace is one folder that keeps your image–caption collections, their scores and your "
        "decisions together. Open an existing one, or create a new empty one.",
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


with st.container(border=True):
    st.markdown(f"**Current workspace:** `{path}`" + (" (the bundled demo)" if is_demo else ""))
    if context.workspace_choice_allowed():
        _choose_workspace()
    else:
        st.caption(
            "This is the team's shared workspace, set when the server was started (CHIPS_WORKSPACE); "
            "signed-in users cannot open or create other folders on the server."
        )

ws = context.workspace()
refused = auth.refusal(ws, "manage")  # adding data and workspace jobs need a lead (chips_core checks it)

st.subheader("Pools and eval sets")
all_pools = catalog.pools_overview(ws).rename(columns={"rejects": "rejected"})
all_pools = all_pools[["name", "kind", "format", "status", "source", "pairs", "rejected"]]
if all_pools.empty:
    st.info("No pool yet: add a training pool and a target eval set below.")
else:
    st.caption(
        "A **pool** is the collection of image–caption pairs to choose from; an **eval set** is a smaller "
        "collection that shows the kind of images the model should get better at (the target)."
    )
    st.dataframe(all_pools, hide_index=True, key="pools_table")
    rejects = catalog.rejects_overview(ws)
    if not rejects.empty:
        with st.expander(f"Rejected inputs by reason ({int(rejects['n'].sum())})"):
            st.dataframe(rejects, hide_index=True)

st.caption(
    "Three steps, each a background job: **1. add** the pairs, **2. featurize** (the model looks at every "
    "image and caption once), **3. prepare scoring** (works out how useful each pair is, and draws the map)."
)
add, feat, prep = st.tabs(["1. Add a pool or eval set", "2. Featurize", "3. Prepare scoring"])
with add, st.form("ingest_form"):
    st.caption(
        "Reads the images and captions into the workspace and checks each one (unreadable files are listed "
        "as rejected). Accepted: a CSV/TSV/parquet table of image paths and captions, a folder of images "
        "with .txt captions, WebDataset .tar shards, or DICOM files."
    )
    name = st.text_input("Name", key="ing_name", help="A short name to find this collection by later.")
    source = st.text_input(
        "Source (file, folder or shard pattern)",
        key="ing_source",
        help="Where the pairs are: the table file, the image folder, or the shards "
        "(e.g. /data/shard-{000..009}.tar).",
    )
    kind = st.radio(
        "Kind",
        ["pool", "eval"],
        horizontal=True,
        key="ing_kind",
        format_func={"pool": "training pool", "eval": "target eval set"}.get,
        help="Training pool: the pairs to choose from. Target eval set: examples of what the model should "
        "get better at.",
    )
    c1, c2, c3 = st.columns(3)
    image_col = c1.text_input(
        "Image column", "filepath", key="ing_img", help="The table column that holds each image's path."
    )
    caption_col = c2.text_input(
        "Caption column", "title", key="ing_cap", help="The table column that holds each caption."
    )
    label_col = c3.text_input(
        "Label column (optional)",
        "",
        key="ing_label",
        help="A column with a class or finding per pair, if any: Browse can filter on it.",
    )
    c4, c5 = st.columns(2)
    encoding = c4.text_input(
        "Text encoding", "auto", key="ing_encoding", help="auto detects it (and reports it); or e.g. latin-1"
    )
    replace = c5.checkbox(
        "Replace a pool of this name",
        key="ing_replace",
        help="Refused while anything depends on the pool (feature runs, caches, selections...).",
    )
    if st.form_submit_button(
        "Ingest", type="primary", disabled=bool(refused), help=refused or "Add the pairs (a background job)."
    ):
        argv = ["ingest", str(ws.root), name, source, "--image-col", image_col, "--caption-col", caption_col]
        argv += (["--eval"] if kind == "eval" else []) + (
            ["--label-col", label_col] if label_col.strip() else []
        )
        argv += ["--encoding", encoding.strip() or "auto"] + (["--replace"] if replace else [])
        jobs_view.launch(ws, "ingest", argv, required={"Name": name, "Source": source})

pool_names = all_pools["name"].tolist()
models = catalog.models_overview(ws)
with feat, st.form("featurize_form"):
    st.caption(
        "The model looks at every image and caption once and the workspace keeps what it saw, so scoring, "
        "the map and every slider later run without the model. Do it for the pool and for the eval set. It "
        "can take a while on a large pool; stopped, it resumes where it was."
    )
    pool = st.selectbox(
        "Pool or eval set", pool_names, key="feat_pool", help="The collection the model should look at."
    )
    default_model = str(models["name"].iloc[0]) if len(models) else "ViT-B-16"
    model = st.text_input(
        "Model",
        default_model,
        key="feat_model",
        help="The image–text model to curate for: an open_clip model name, a checkpoint file on this "
        "server, or an hf-hub: id. Use the same model for the pool and the eval set.",
    )
    pretrained = st.text_input(
        "Trained weights (optional)",
        "",
        key="feat_pretrained",
        help="Which trained version of the model: its published tag (e.g. openai) or a checkpoint file.",
    )
    device = st.selectbox(
        "Device",
        ["auto", "cpu", "cuda"],
        key="feat_device",
        help="auto: the graphics card (GPU) when this server has one, else the processor.",
    )
    random_init = st.checkbox(
        "Random weights (testing only)",
        key="feat_random_init",
        help="A model with published weights needs its trained weights (above); tick this to use untrained, "
        "random weights on purpose.",
    )
    if st.form_submit_button(
        "Featurize",
        type="primary",
        disabled=bool(refused),
        help=refused or "Run the model over the pairs (a background job).",
    ):
        argv = ["featurize", str(ws.root), str(pool), "--model", model, "--device", device]
        argv += ["--pretrained", pretrained] if pretrained.strip() else []
        argv += ["--random-init"] if random_init else []
        jobs_view.launch(ws, "featurize", argv, required={"Pool": pool or "", "Model": model})

evals = all_pools.loc[all_pools["kind"] == "eval", "name"].tolist() if len(all_pools) else []
train_pools = all_pools.loc[all_pools["kind"] == "pool", "name"].tolist() if len(all_pools) else []
with prep, st.form("prepare_form"):
    st.caption(
        "Works out, once, how much each pool pair is expected to teach the model about the eval set, and "
        "draws the pool's map. After this, every control on the Scores page answers at once and the Map "
        "page opens at once; no model runs there."
    )
    c1, c2 = st.columns(2)
    p_pool = c1.selectbox("Pool", train_pools, key="prep_pool", help="The pairs to rank (featurized first).")
    p_eval = c2.selectbox(
        "Eval set", evals, key="prep_eval", help="The target the ranking favours (featurized first)."
    )
    d = PrepareConfig()  # the form's defaults are the library's
    with st.expander("For ML engineers: how the estimate is computed"):
        st.markdown(
            "Closed-form per-pair gradients of the InfoNCE loss at the projection heads, a JL sketch of "
            "k_max rows, the curvature Φ_pos / Φ_neg and the target gradient (docs/SCORING.md). The "
            "defaults suit most pools."
        )
        c3, c4, c5 = st.columns(3)
        k_options = sorted({256, 512, 1024, 2048, 4096, d.k_max})
        k_max = c3.select_slider(
            "k_max (sketch rows)", options=k_options, value=d.k_max, key="prep_kmax",
            help="The largest k the Scores page can use; larger is closer to exact and uses more disk.",
        )  # fmt: skip
        sketch = c4.selectbox("Sketch", sp.SKETCHES, index=sp.SKETCHES.index(d.sketch), key="prep_sketch")
        batch = c5.number_input("InfoNCE batch size", 2, 65536, d.batch_size, key="prep_batch")
        blocks = st.multiselect(
            "Parameter blocks scored",
            list(sp.BLOCKS),
            default=list(sp.parse_blocks(d.blocks)),
            key="prep_blocks",
            help="The recommended default leaves the temperature (logit_scale) out (docs/SCORING.md); the "
            "paper scores all three.",
        )
    if st.form_submit_button(
        "Prepare",
        type="primary",
        disabled=bool(refused),
        help=refused or "Work out the scores and the map (a background job).",
    ):
        argv = ["prepare", str(ws.root), str(p_pool), "--eval", str(p_eval), "--k-max", str(k_max)]
        argv += ["--sketch", sketch, "--batch-size", str(batch)]
        argv += ["--blocks", ",".join(blocks or sp.parse_blocks(d.blocks))]
        jobs_view.launch(ws, "prepare", argv, required={"Pool": p_pool or "", "Eval set": p_eval or ""})

st.subheader("Jobs")
st.caption(
    "Long steps run in the background on the server: they keep going if this tab is closed or reloaded, "
    "and their progress shows here."
)
jobs_view.jobs_panel(ws)
