"""Export and train: named versioned selections, their differences, exports, and CPT launched as a job."""

from __future__ import annotations

import functools
from pathlib import Path

import streamlit as st

from app import auth, context, jobs_view, training_view, url_state
from chips_core.curation import export, selection
from chips_core.team import roles
from chips_core.team.identity import Actor
from chips_core.workspace.store import Workspace


def _download(ws: Workspace, sel_id: int, fmt: str, user: Actor) -> bytes:
    """The export's bytes for the browser (chips_core.curation.export.export_bytes, audited as `user`)."""
    return export.export_bytes(ws, sel_id, fmt, actor=user).data


ws = context.workspace()
ctx = context.scoring_context(ws)
user = auth.actor()
refused_select = auth.refusal(ws, "select")  # disabled with the reason; chips_core checks again
refused_export = auth.refusal(ws, "export")

st.title("Export and train")

st.subheader("Save the current selection")
result = context.current_rank(ctx)
params = {**context.rank_params(), "k": int(result.info["k"])}  # the sketch dimension the ranking used
st.caption(
    f"Saves the pairs the Scores page selects now: the best-ranked **{params['ratio']:.0%}** of the pool "
    f"(the selection ratio: the share of pairs kept for training, {int(result.info['n_selected']):,} of "
    f"{len(result.frame):,} pairs before your decisions), ranked by {params['method']}, with your decisions "
    "applied: included pairs are always kept, excluded pairs never. Saving under an existing name makes a "
    "new version; the older ones are kept."
)
with st.expander("For ML engineers: the ranking parameters saved with it"):
    st.markdown(
        f"method {params['method']}, ratio {params['ratio']:.2f}, preset {params['preset']}, blocks "
        f"{ctx.blocks}, α {params['alpha']:g}, {params['lam_factor']:g}× the default λ, k {params['k']}, "
        f"β {params['beta']:g}, guard {params['guard']} (scoring cache {ctx.cache_id})."
    )
with st.form("save_selection", border=False):
    name = st.text_input(
        "Selection name",
        value=f"{ctx.pool_name}-{params['method']}",
        key="sel_name",
        help="A name to find this selection by when comparing, exporting or training.",
    )
    if st.form_submit_button(
        "Save selection",
        type="primary",
        disabled=bool(refused_select),
        help=refused_select or "Save the selected pairs as a new version.",
    ):
        try:
            sid = selection.save_selection(
                ws,
                ctx.pool_id,
                result,
                params["ratio"],
                name,
                params={**params, "cache_id": ctx.cache_id, "eval": ctx.eval_name, "blocks": ctx.blocks},
                method=params["method"],
                actor=user,
            )
        except (selection.SelectionError, roles.AccessDenied) as exc:
            st.error(str(exc))
        else:
            info = selection.get_selection(ws, sid)
            st.session_state["export_sel"] = sid  # the new version is what one exports or trains next
            st.session_state["train_sel"] = sid
            st.success(f"Saved {info.name} v{info.version}: {info.n_selected:,} pairs (selection id {sid}).")

saved = selection.list_selections(ws, ctx.pool_id)
if saved.empty:
    url_state.write()  # before st.stop, which drops later writes to the URL
    st.info("No saved selection yet in this pool.")
    st.stop()
labels = {
    int(r.selection_id): f"{r.name} v{r.version} · {r.n_selected:,} pairs · id {r.selection_id}"
    for r in saved.itertuples()
}
st.caption("Saved selections of this pool (n_selected: how many pairs each keeps).")
st.dataframe(saved, hide_index=True, key="selections_table")

st.subheader("Compare two selections")
st.caption("Which pairs two saved selections share, and which only one of them keeps.")
ids = list(labels)
c1, c2 = st.columns(2)
a = c1.selectbox("First", ids, format_func=labels.get, key="diff_a", help="A saved selection.")
b = c2.selectbox(
    "Second", ids, index=min(1, len(ids) - 1), format_func=labels.get, key="diff_b",
    help="Another saved selection (or another version of the same one).",
)  # fmt: skip
diff = selection.diff_selections(ws, a, b)
st.write(diff.summary())
pairs = context.pool_pairs(ctx)
d1, d2 = st.columns(2)
d1.caption("Only in the first")
d1.dataframe(pairs.reindex(diff.only_a)[["caption"]], height=200, key="only_a")
d2.caption("Only in the second")
d2.dataframe(pairs.reindex(diff.only_b)[["caption"]], height=200, key="only_b")

st.subheader("Export")
FORMATS = {
    "csv": "open_clip_train CSV",
    "safe_csv": "spreadsheet-safe CSV (for people)",
    "parquet": "parquet with every score component",
    "ids": "pair ids (.npy, DataComp hand-off)",
}
st.caption("Writes a saved selection as a file: for training (open_clip), for people, or for other tools.")
e1, e2 = st.columns([2, 1])
sel_id = e1.selectbox(
    "Selection", ids, format_func=labels.get, key="export_sel", help="The saved selection to export."
)
fmt = e2.selectbox(
    "Format",
    list(FORMATS),
    format_func=FORMATS.get,
    key="export_fmt",
    help="open_clip_train CSV: what training reads. Spreadsheet-safe CSV: to open in Excel. Parquet: "
    "every score, for analysis. Pair ids: a list for DataComp-style tools.",
)
info = selection.get_selection(ws, sel_id)
default = export.default_path(ws, info, fmt)
st.download_button(
    f"Download {default.name}",
    data=functools.partial(_download, ws, sel_id, fmt, user),  # built on click, by the library's export
    file_name=default.name,
    type="primary",
    icon=":material/download:",
    key="export_dl",
    disabled=bool(refused_export),
    help=refused_export
    or "Saves the export to this computer through the browser (the same bytes as the file below).",
)
out = st.text_input(
    "Also save in the workspace (a file on the server running CHIPS Studio)",
    value=str(default),
    key=f"export_out_{sel_id}_{fmt}",
    help="With its manifest (`.manifest.json`) beside it; open_clip_train on this server reads it there.",
)
st.caption(f"Default: `{default}` (the workspace's exports folder)")
if st.button("Save in the workspace", key="export_go", disabled=bool(refused_export), help=refused_export):
    with st.spinner("Writing the export…"):
        try:
            done = export.export_selection(ws, sel_id, fmt, Path(out), actor=user)
        except (export.ExportError, selection.SelectionError, roles.AccessDenied, OSError) as exc:
            st.error(str(exc))
        else:
            st.success(f"Wrote {done.path} ({done.n_rows:,} rows) and its manifest {done.manifest_path}.")
            if fmt == "csv":
                st.code(" ".join(done.open_clip_flags()), language="bash")

st.subheader("Train the model on a selection (continual pre-training)")
training_view.train_form(ws, ctx, ids, labels)
training_view.cpt_runs(ws, ctx)
st.subheader("Jobs")
st.caption("Training and evaluation run in the background on the server; their progress shows here.")
jobs_view.jobs_panel(ws)
