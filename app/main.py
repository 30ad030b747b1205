"""CHIPS Studio dashboard entry point: `streamlit run app/main.py` (no arguments opens the bundled demo).

The sidebar chooses the workspace (env CHIPS_WORKSPACE, or a path typed here) and the pool / eval set; the
pages live in app/views/ and only call chips_core and render. The view's state lives in the URL
(app/url_state.py). With an identity provider configured everyone signs in first (app/auth.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout: use this checkout's chips_core and app packages
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app.warmup import WarmImports  # noqa: E402


@st.cache_resource(show_spinner=False)
def warm_imports() -> WarmImports:
    """The server's background import of torch and scipy.linalg (app/warmup.py), one per server."""
    return WarmImports()


from app import auth, context, url_state  # noqa: E402

st.set_page_config(page_title="CHIPS Studio", page_icon=":material/neurology:", layout="wide")
auth.require_sign_in()  # with an identity provider in .streamlit/secrets.toml: nothing until signed in
url_state.seed()  # a reload or a shared link: the view in the URL (before the defaults fill the rest)
context.keep_widget_state()

VIEWS = _ROOT / "app" / "views"
pages = [
    st.Page(VIEWS / "workspace.py", title="Workspace", icon=":material/folder_open:", url_path="workspace"),
    st.Page(VIEWS / "scores.py", title="Scores", icon=":material/tune:", url_path="scores", default=True),
    st.Page(VIEWS / "map.py", title="Map", icon=":material/scatter_plot:", url_path="map"),
    st.Page(VIEWS / "browse.py", title="Browse", icon=":material/photo_library:", url_path="browse"),
    st.Page(VIEWS / "export.py", title="Export and train", icon=":material/download:", url_path="export"),
    st.Page(VIEWS / "activity.py", title="Activity", icon=":material/history:", url_path="activity"),
]

with st.sidebar:
    st.markdown("### CHIPS Studio")
    if context.workspace_choice_allowed():  # with sign-in, the server's CHIPS_WORKSPACE is the workspace
        st.text_input(
            "Workspace folder",
            key="ws_path",
            placeholder="empty = bundled demo",
            help="A folder made by `chips init` (or on the Workspace page); env CHIPS_WORKSPACE sets the "
            "default",
        )
# outside the sidebar: while the demo is first built, its progress shows in the main area
path, is_demo = context.workspace_path()
with st.sidebar:
    if is_demo:
        st.info(
            "**Demo workspace**: a few hundred bundled medical-looking images with planted caption mistakes "
            "and a tiny CLIP trained by this project. To curate your own data, type a workspace folder above "
            "(or start with `CHIPS_WORKSPACE=/path streamlit run app/main.py`), then add your pool, eval set "
            "and model on the Workspace page.",
            icon=":material/info:",
        )
    else:
        st.caption(f"Workspace: `{path}`")
    ws = context.store.Workspace(path)
    if ws.db_path.exists():
        pool_names = context.pools(ws, "pool")["name"].tolist()
        eval_names = context.pools(ws, "eval")["name"].tolist()
        for label, key, names in (("Pool", "pool_name", pool_names), ("Eval set", "eval_name", eval_names)):
            if st.session_state.get(key) not in names:  # another workspace was opened
                st.session_state.pop(key, None)
            if names:
                st.selectbox(label, names, key=key)
    auth.sidebar(ws)

url_state.write()  # the widgets' values as the browser sent them (a page's st.stop drops later writes)
warm = warm_imports()
warm.run_started()
try:
    st.navigation(pages).run()
finally:
    try:  # values the page itself set (a default k, a closed detail view, ...)
        url_state.write()
    finally:
        warm.run_ended()  # the import starts once no run is active: after the first page is drawn
