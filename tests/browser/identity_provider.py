"""A real OpenID Connect provider on 127.0.0.1 for the sign-in tests, and the secrets file that points the
dashboard at it.

The provider is oauth2-mock-server (npm), installed by scripts/test.sh outside the clone; its authorize step
is a small form where a test types the subject, e-mail and name it signs in as (tests/browser/oidc/).
When Node or the package is missing the tests that need it fail with the command that installs it: they
never skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.browser.harness import ROOT, free_port, served

OIDC_SRC = ROOT / "tests" / "browser" / "oidc"
CLIENT_ID = "chips-studio-test"


def install_dir() -> Path:
    """Where scripts/test.sh installs the pinned provider (env CHIPS_OIDC_DIR, else the same key it uses)."""
    if os.environ.get("CHIPS_OIDC_DIR"):
        return Path(os.environ["CHIPS_OIDC_DIR"])
    lock = (OIDC_SRC / "package.json").read_bytes() + (OIDC_SRC / "package-lock.json").read_bytes()
    base = Path(os.environ.get("CHIPS_VENV_HOME") or Path.home() / ".cache" / "chips-studio")
    return base / f"oidc-{hashlib.sha256(lock).hexdigest()[:16]}"


def _require_installed() -> tuple[str, Path]:
    """The node executable and the install folder; a clear failure when either is missing."""
    node = shutil.which("node")
    folder = install_dir()
    if node is None or not (folder / ".complete").exists():
        what = "node is not on PATH" if node is None else f"oauth2-mock-server is not installed in {folder}"
        raise RuntimeError(f"The test OpenID Connect provider cannot start: {what}. Run scripts/test.sh.")
    return node, folder


@contextlib.contextmanager
def oidc_provider(log_path: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Start the provider on a free port; yields its issuer URL; stops it (its process group) afterwards."""
    node, folder = _require_installed()
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    cmd = [node, str(OIDC_SRC / "provider.mjs"), str(port), str(folder)]
    probe = f"{issuer}/.well-known/openid-configuration"
    with served("the OIDC provider", cmd, probe, log_path, timeout_s):
        yield issuer


def write_secrets(path: Path, issuer: str) -> Path:
    """A secrets.toml whose [auth] section points the dashboard at the provider `issuer` (Streamlit fills in
    its own port for `{port}`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[auth]\n"
        'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        f'cookie_secret = "{secrets.token_hex(32)}"\n'
        f'client_id = "{CLIENT_ID}"\n'
        'client_secret = "not-checked-by-the-test-provider"\n'
        f'server_metadata_url = "{issuer}/.well-known/openid-configuration"\n',
        encoding="utf-8",
    )
    return path
