"""Background jobs: `chips ...` commands run as detached subprocesses that report into the `jobs` table.

`launch` starts `python -m chips_core.cli --job-id N --job-ws WS <argv>` in its own session (so it has its
own process group and outlives the dashboard that launched it), with stdout/stderr in ws/logs/job-N.log.
The child marks itself running, reports progress through `JobReporter` (throttled, short-lived
connections) and its end state: done, failed (with the one-line reason) or cancelled. A job whose
process is gone while its row still says queued/running is reported as failed by `job_status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chips_core
from chips_core.team import audit, roles
from chips_core.team.identity import Actor, current_actor
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, WorkspaceError

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
# Jobs launched by this process, by (workspace root, job id): polled (reaped) on status checks.
_children: dict[tuple[str, int], subprocess.Popen] = {}


class JobError(WorkspaceError):
    """A job problem with a message meant for the user."""


class JobCancelled(BaseException):
    """Raised inside a job process when it receives SIGTERM (BaseException: not caught as an error)."""


@dataclass(frozen=True)
class JobInfo:
    """One row of `jobs`."""

    job_id: int
    kind: str
    args: list[str]
    status: str
    pid: int | None
    progress: float | None
    message: str | None
    log_path: str | None
    started_at: Any
    updated_at: Any
    finished_at: Any

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ACTIVE


# the action (chips_core.team.roles) each `chips` command run as a job needs, by its command name (argv[0]):
# every command that writes the workspace; `demo` builds the bundled demo outside any team workspace
COMMAND_ACTIONS = {"train": "train", "evaluate": "train", "ingest": "manage", "featurize": "manage",
                   "prepare": "manage", "score": "manage", "map": "manage", "rm": "manage",
                   "experiment": "train"}  # fmt: skip


def job_action(argv: list[str]) -> str | None:
    """The action (chips_core.team.roles) starting or cancelling `chips <argv>` needs; None: anyone."""
    return COMMAND_ACTIONS.get(str(argv[0])) if argv else None


def launch(ws: Workspace, kind: str, argv: list[str], actor: Actor | None = None) -> int:
    """Start `chips <argv>` in the background for workspace `ws`; returns the job id at once.

    kind is a short label for people ('featurize', 'prepare', 'train', ...). The child is its own session
    leader: signals to the launching process group do not reach it and it keeps running when the
    launcher exits. `actor` (default: the local user) must hold the role the command needs (`job_action`,
    by the command, not the label); the job runs as that user, so what it records names them.
    """
    ws.check()
    argv = [str(a) for a in argv]
    if not argv:
        raise JobError("a job needs a chips command to run")
    actor = current_actor(actor)
    action = job_action(argv)
    if action is not None:
        roles.require(ws, actor, action, detail=f"start a {kind} job: chips {' '.join(argv)}")
    job_id = ws.new_id()
    log_path = ws.root / "logs" / f"job-{job_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    catalog.insert_job(ws, job_id, kind, json.dumps(argv), str(log_path))
    env = {**os.environ, **actor.to_env()}
    package_root = str(Path(chips_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "chips_core.cli", "--job-id", str(job_id), "--job-ws", str(ws.root), *argv]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _children[(str(ws.root), job_id)] = proc
    catalog.set_job_pid(ws, job_id, proc.pid)
    return job_id


def latest(ws: Workspace, argv: list[str]) -> JobInfo | None:
    """The newest job that runs `chips <argv>` in `ws` (a dead one reported as failed), or None."""
    argv = [str(a) for a in argv]
    return next((j for j in list_jobs(ws) if j.args == argv), None)


def launch_once(ws: Workspace, kind: str, argv: list[str], actor: Actor | None = None) -> int:
    """The id of the active job running `chips <argv>` in `ws`, else of one started now.

    The check and the launch hold a lock (ws/logs/launch.lock), so two dashboard sessions that ask for the
    same step at once start one job and both follow it.
    """
    ws.check()
    lock_path = ws.root / "logs" / "launch.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            argv = [str(a) for a in argv]
            running = [j.job_id for j in list_jobs(ws, active_only=True) if j.args == argv]
            return running[0] if running else launch(ws, kind, argv, actor)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _row(ws: Workspace, job_id: int) -> JobInfo:
    r = catalog.job_row(ws, job_id)
    if r is None:
        raise JobError(f"no job {job_id} in workspace {ws.root}")
    return JobInfo(int(r[0]), r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10])


def _alive(ws: Workspace, pid: int, job_id: int) -> bool:
    """Whether `pid` is still this job's process (not gone, not a zombie, not a reused pid)."""
    child = _children.get((str(ws.root), job_id))
    if child is not None and child.poll() is not None:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        mine = (b"--job-id", str(job_id).encode(), b"--job-ws", str(ws.root).encode())
        return any(tuple(cmdline[i : i + 4]) == mine for i in range(len(cmdline)))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: str | None, n: int = 1) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()]
    return " | ".join([ln for ln in lines if ln][-n:])


def job_status(ws: Workspace, job_id: int) -> JobInfo:
    """The job's row; a queued/running job whose process has gone is recorded as failed first."""
    info = _row(ws, job_id)
    if info.active and info.pid is not None and not _alive(ws, info.pid, info.job_id):
        time.sleep(0.05)  # the child may have written its final state just before exiting
        info = _row(ws, job_id)
        if info.active:
            tail = _log_tail(info.log_path)
            reason = f"process {info.pid} ended without reporting" + (f": {tail}" if tail else "")
            _finish(ws, job_id, "failed", reason[:500], only_if_active=True)
            info = _row(ws, job_id)
    return info


def list_jobs(ws: Workspace, active_only: bool = False) -> list[JobInfo]:
    """All jobs, newest first (dead ones reported as failed)."""
    ws.check()
    ids = catalog.job_ids(ws)
    jobs = [job_status(ws, i) for i in ids]
    return [j for j in jobs if j.active] if active_only else jobs


def cancel(ws: Workspace, job_id: int, grace_s: float = 10.0, actor: Actor | None = None) -> JobInfo:
    """Stop a job: SIGTERM to its process group, SIGKILL after `grace_s`; its status becomes 'cancelled'.

    `actor` (default: the local user) needs the role that starting the job needs; the cancel is audited."""
    info = job_status(ws, job_id)
    if not info.active:
        return info
    actor = current_actor(actor)
    action = job_action(info.args)
    if action is not None:
        roles.require(ws, actor, action, detail=f"cancel job {job_id} ({info.kind})")
    audit.record(ws, actor, "job", "cancel", object_id=job_id, params={"kind": info.kind, "argv": info.args})
    if info.pid is not None and _alive(ws, info.pid, info.job_id):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(ws, info.pid, info.job_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(ws, info.pid, info.job_id):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info.pid, signal.SIGKILL)
    child = _children.pop((str(ws.root), job_id), None)
    if child is not None:
        child.wait(timeout=grace_s)
    _finish(ws, job_id, "cancelled", "cancelled by the user", only_if_active=True)
    return _row(ws, job_id)


def wait(ws: Workspace, job_id: int, timeout_s: float = 600.0, poll_s: float = 0.2) -> JobInfo:
    """Block until the job reaches a final state (or raise JobError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_status(ws, job_id)
        if not info.active:
            _children.pop((str(ws.root), job_id), None)
            return info
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {info.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def read_log(ws: Workspace, job_id: int, max_bytes: int = 20000) -> str:
    """The end of the job's log file (stdout and stderr of the command)."""
    path = _row(ws, job_id).log_path
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - max_bytes))
        return f.read().decode("utf-8", "replace")


def _finish(ws: Workspace, job_id: int, status: str, message: str | None, only_if_active: bool) -> None:
    catalog.finish_job(ws, job_id, status, message, only_if_active)


class JobReporter:
    """Used inside a job process: marks it running, writes throttled progress, records how it ended."""

    def __init__(self, ws: Workspace, job_id: int, min_interval_s: float = 0.5) -> None:
        self.ws, self.job_id, self.min_interval_s = ws, int(job_id), min_interval_s
        self._last = 0.0

    def start(self) -> None:
        """Mark the job running with this pid; SIGTERM now raises JobCancelled in the main thread."""
        catalog.set_job_running(self.ws, self.job_id, os.getpid())

        def _on_term(signum: int, frame: Any) -> None:
            raise JobCancelled()

        signal.signal(signal.SIGTERM, _on_term)

    def progress(self, fraction: float | None, message: str, force: bool = False) -> None:
        """Record progress (0..1, None when unknown) at most every `min_interval_s`; never fails the job."""
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        try:
            with self.ws.connect(timeout_s=2.0) as con:
                catalog.set_job_progress(con, self.job_id, fraction, message[:500])
        except WorkspaceError:
            pass  # the workspace is busy: the next update will get through

    def finish(self, status: str, message: str | None = None) -> None:
        """Record the final state (done | failed | cancelled)."""
        if status not in FINAL:
            raise JobError(f"unknown final job status {status!r}")
        _finish(self.ws, self.job_id, status, message, only_if_active=True)
