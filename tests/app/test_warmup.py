"""The server's background import (app/warmup.py): it starts only when no script run is active, and a run
that starts while it exists waits for it; concurrent sessions never join an unstarted thread."""

from __future__ import annotations

import sys
import threading

from app.warmup import WarmImports


def test_the_import_waits_for_every_active_run_and_later_runs_wait_for_it():
    warm = WarmImports(modules=("json",))
    warm.run_started()  # session A's first run
    warm.run_started()  # session B's first run, before A's ends
    warm.run_ended()  # A ends: B still runs (and may import torch itself), so nothing starts
    assert not warm.started
    warm.run_ended()  # B ends: now the thread starts
    assert warm.started
    warm.run_started()  # a later run joins the thread: the import is done when the page runs
    assert "json" in sys.modules and not warm._thread.is_alive()
    warm.run_ended()


def test_many_sessions_at_once_never_join_an_unstarted_thread():
    warm = WarmImports(modules=("json",))
    errors: list[BaseException] = []

    def session() -> None:
        try:
            for _ in range(200):
                warm.run_started()
                warm.run_ended()
        except BaseException as e:  # noqa: BLE001 - the test collects any failure of a session
            errors.append(e)

    threads = [threading.Thread(target=session) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and warm.started and warm._active == 0
