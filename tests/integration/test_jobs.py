"""Background jobs as real detached `chips` subprocesses.

Progress and end state in the workspace, one-line failures, cancellation of the process group, crashed
jobs reported as failed, and jobs that outlive the process that launched them.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chips_core.workspace import jobs
from chips_core.workspace.store import Workspace
from tests.fixtures_build import make_csv_pool

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_job_runs_to_done_with_progress_and_log(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    manifest = make_csv_pool(tmp_path, n=12)
    job = jobs.launch(ws, "ingest", ["ingest", str(ws.root), "pool", str(manifest), "--workers", "0"])
    info = jobs.wait(ws, job, timeout_s=120)
    assert info.status == "done", jobs.read_log(ws, job)
    assert info.progress == 1.0 and info.finished_at is not None
    assert info.args[:3] == ["ingest", str(ws.root), "pool"]
    assert "12 pairs, 0 rejected" in jobs.read_log(ws, job)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM pairs").fetchone()[0] == 12


def test_failed_job_records_one_line_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIPS_DEBUG", raising=False)
    ws = Workspace.init(tmp_path / "ws")
    job = jobs.launch(ws, "ingest", ["ingest", str(ws.root), "pool", str(tmp_path / "missing.csv")])
    info = jobs.wait(ws, job, timeout_s=120)
    assert info.status == "failed"
    assert "missing.csv" in info.message and "\n" not in info.message
    assert "Traceback" not in jobs.read_log(ws, job)
    assert [j.job_id for j in jobs.list_jobs(ws)] == [job]
    assert jobs.list_jobs(ws, active_only=True) == []


def blocked_job(ws, tmp_path):
    """A job that genuinely blocks: ingest from a named pipe nobody writes to."""
    fifo = tmp_path / "stream.csv"
    os.mkfifo(fifo)
    job = jobs.launch(ws, "ingest", ["ingest", str(ws.root), "stream", str(fifo), "--format", "csv"])
    wait_for(lambda: jobs.job_status(ws, job).status == "running")
    return job


def test_cancel_terminates_the_process_group(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    job = blocked_job(ws, tmp_path)
    pid = jobs.job_status(ws, job).pid
    info = jobs.cancel(ws, job, grace_s=10)
    assert info.status == "cancelled" and info.finished_at is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert jobs.cancel(ws, job).status == "cancelled"  # idempotent


def test_crashed_job_is_reported_failed(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    job = blocked_job(ws, tmp_path)
    pid = jobs.job_status(ws, job).pid
    os.killpg(pid, signal.SIGKILL)  # no chance to report anything
    info = wait_for(lambda: (i := jobs.job_status(ws, job)).status != "running" and i)
    assert info.status == "failed"
    assert f"process {pid} ended without reporting" in info.message


def test_job_outlives_its_launcher(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    manifest = make_csv_pool(tmp_path, n=12)
    script = textwrap.dedent(
        f"""
        from chips_core.workspace import jobs
        from chips_core.workspace.store import Workspace
        print(jobs.launch(Workspace({str(ws.root)!r}), "ingest",
                          ["ingest", {str(ws.root)!r}, "pool", {str(manifest)!r}, "--workers", "0"]))
        """
    )
    launcher = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    job = int(launcher.stdout.strip())  # the launcher has exited by now
    info = jobs.wait(ws, job, timeout_s=120)
    assert info.status == "done", jobs.read_log(ws, job)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM pairs").fetchone()[0] == 12


def test_progress_bar_feeds_the_job_row(tmp_path, monkeypatch):
    """Inside a job, the CLI's progress callbacks write throttled progress into the job's row.

    (Read with SQL: job_status would rightly call this pytest process "not the job's process".)
    """

    def row(ws):
        with ws.connect(read_only=True) as con:
            return con.execute("SELECT status, progress, message, pid FROM jobs WHERE job_id = 7").fetchone()

    from chips_core.workspace import progress

    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        con.execute("INSERT INTO jobs (job_id, kind, args, status) VALUES (7, 'test', '[]', 'queued')")
    reporter = jobs.JobReporter(ws, 7, min_interval_s=0.0)
    old = signal.getsignal(signal.SIGTERM)
    try:
        reporter.start()
        monkeypatch.setattr(progress, "_job_reporter", reporter)
        with progress.progress_bar("featurize pool") as bar:
            bar(5, 20)
            assert row(ws)[1] == 0.25
            bar({"done": 15, "total": 20, "loss": 0.5})
        assert row(ws) == ("running", 0.75, "featurize pool: 15/20", os.getpid())
        reporter.finish("done", "done")
        assert row(ws)[0] == "done"
    finally:
        signal.signal(signal.SIGTERM, old)


def test_launch_once_starts_one_job_for_concurrent_callers(tmp_path):
    """Two dashboard sessions asking for the same step at once follow one job; once it ended, a new one."""
    from concurrent.futures import ThreadPoolExecutor

    ws = Workspace.init(tmp_path / "ws")
    fifo = tmp_path / "stream.csv"
    os.mkfifo(fifo)
    argv = ["ingest", str(ws.root), "stream", str(fifo), "--format", "csv"]
    assert jobs.latest(ws, argv) is None
    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(lambda _: jobs.launch_once(ws, "ingest", argv), range(6)))
    assert len(ids) == 1 and [j.job_id for j in jobs.list_jobs(ws)] == list(ids)
    [job] = ids
    assert jobs.latest(ws, argv).job_id == job and jobs.latest(ws, [*argv, "--replace"]) is None
    jobs.cancel(ws, job)
    again = jobs.launch_once(ws, "ingest", argv)
    assert again != job and jobs.latest(ws, argv).job_id == again
    jobs.cancel(ws, again)


def test_progress_stages_name_the_step_in_the_job_row(tmp_path, monkeypatch):
    from chips_core.workspace import progress

    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        con.execute("INSERT INTO jobs (job_id, kind, args, status) VALUES (8, 'demo', '[]', 'queued')")
    reporter = jobs.JobReporter(ws, 8, min_interval_s=60.0)  # throttled: only a new stage gets through
    old = signal.getsignal(signal.SIGTERM)
    try:
        reporter.start()
        monkeypatch.setattr(progress, "_job_reporter", reporter)
        with progress.progress_bar("demo", unit="step") as bar:
            bar(0, 8, stage="ingesting")
            bar(3, 8, stage="featurizing")
            with ws.connect(read_only=True) as con:
                row = con.execute("SELECT progress, message FROM jobs WHERE job_id = 8").fetchone()
        assert row == (3 / 8, "demo: featurizing (3/8)")
    finally:
        signal.signal(signal.SIGTERM, old)
