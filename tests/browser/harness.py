"""A real `streamlit run app/main.py` on a free 127.0.0.1 port plus Debian's headless Chromium (Playwright).

Shared by the browser tests and bench/bench_dashboard.py. Never downloads a browser: it drives
/usr/bin/chromium (installed by scripts/test.sh).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(
    name: str, cmd: list[str], probe: str, log_path: Path, timeout_s: float, **popen: object
) -> Iterator[None]:
    """Run `cmd` in its own process group (output to `log_path`) until `probe` answers HTTP 200; stop the
    group afterwards (SIGTERM, then SIGKILL). A clear error names `name` when it exits or never answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(OSError), urllib.request.urlopen(probe, timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer on {probe} in {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def streamlit_server(
    workspace: str | os.PathLike,
    log_path: Path,
    timeout_s: float = 120.0,
    secrets: Path | None = None,
    root: Path = ROOT,
) -> Iterator[str]:
    """Run the dashboard on `workspace`; yields its URL; stops the server (its process group) afterwards.

    `secrets`: the secrets.toml it reads (an [auth] section turns sign-in on); without one it reads none, so
    a developer's own .streamlit/secrets.toml never changes what a test sees (single-user mode). `root`: the
    checkout whose app and chips_core run (this one unless a benchmark compares another)."""
    port = free_port()
    env = {**os.environ, "CHIPS_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "streamlit", "run", str(root / "app" / "main.py"), f"--server.port={port}"]
    cmd += ["--server.headless", "true", "--server.fileWatcherType", "none"]
    cmd += ["--secrets.files", str(secrets or log_path.with_name("no-secrets.toml"))]
    url = f"http://127.0.0.1:{port}"
    with served("streamlit", cmd, f"{url}/_stcore/health", log_path, timeout_s, cwd=root, env=env):
        yield url


@contextlib.contextmanager
def chromium_browser() -> Iterator[object]:
    """A Playwright browser: headless Debian Chromium (each `new_context()` is a separate cookie jar)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def chromium_page(width: int = 1500, height: int = 1000) -> Iterator[object]:
    """A Playwright page in headless Debian Chromium."""
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(60_000)
        yield page


def wait_idle(page: object, timeout_ms: int = 120_000) -> None:
    """Wait until the Streamlit script has finished its run (the status widget reports no running script)."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_function(
        "() => !document.querySelector(\"[data-testid='stStatusWidget']\")"
        " || !document.querySelector(\"[data-testid='stStatusWidget']\").innerText.includes('Running')",
        timeout=timeout_ms,
    )
