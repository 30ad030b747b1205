"""CHIPS Studio dashboard entry point: `streamlit run app/main.py` (no arguments opens the bundled demo).

The sidebar chooses the workspace (env CHIPS_WORKSPACE, or a path typed here) and the pool / eval set; the
pages live in app/views/ and only call chips_core and render. The view's state lives in the URL
(app/url_state.py). With an identity provider configured everyone signs in first (app/auth.py).
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout: use this checkout's chips_core and app packages
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

# what a re-ranking imports that takes seconds (torch, scipy): loaded in the background after a server's first
# run, which needs none of it when the ranking on screen is stored with its scoring cache
WARM_IMPORTS = ("torch", "scipy.linalg")


def _import_all(modules: tuple[str, ...]) -> None:
    """Import `modules` in order (the warm-up thread's work)."""
    for module in modules:
        importlib.import_module(module)


@st.cache_resource(show_spinner=False)
def _warm_up() -> dict[str, threading.Thread]:
    """The server's warm-up thread, once started (one dict per server)."""
    return {}


def start_warm_imports() -> None:
    """Import WARM_IMPORTS in a background thread, once per server, when a run has ended: the first page is
    drawn without waiting for them, and a slider step a moment later finds them loaded."""
    state = _warm_up()
    if "thread" not in state:
        thread = threading.Thread(target=_import_all, args=(WARM_IMPORTS,), name="warm-imports", daemon=True)
        if state.setdefault("thread", thread) is thread:
            thread.start()


def wait_for_warm_imports() -> None:
    """Wait for the warm-up thread if it has started, so that no page imports torch or scipy while that
    thread is inside them (two threads importing one package's modules at once can see it half
    initialised). A server's first run, which starts no thread, does not wait."""
    thread = _warm_up().get("thread")
    if thread is not None:
        thread.join()


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
wait_for_warm_imports()
try:
    st.navigation(pages).run()
finally:  # values the page itself set (a default k, a closed detail view, ...)
    url_state.write()
    start_warm_imports()  # after the first run's page is drawn
