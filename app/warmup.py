"""The dashboard server's background import of what a re-ranking needs (torch, scipy.linalg).

A server's first page reads its ranking stored with the scoring cache and needs neither, so the import starts
only when no script run is active (after the first page is drawn), and a slider step a moment later finds
them loaded. Every run that starts while the thread exists waits for it, so that no page imports torch or
scipy while the thread is inside them (two threads importing one package's modules at once can see it half
initialised); a run already going when the thread would start keeps it from starting until it ends.
"""

from __future__ import annotations

import importlib
import threading

#: what a re-ranking imports that takes seconds
WARM_IMPORTS = ("torch", "scipy.linalg")


class WarmImports:
    """One per server: counts active script runs and starts the import thread when none is active."""

    def __init__(self, modules: tuple[str, ...] = WARM_IMPORTS) -> None:
        self.modules = modules
        self._lock = threading.Lock()
        self._active = 0
        self._thread: threading.Thread | None = None

    def run_started(self) -> None:
        """A script run begins: wait for the import thread if it has been started."""
        with self._lock:
            self._active += 1
            thread = self._thread
        if thread is not None:
            thread.join()

    def run_ended(self) -> None:
        """A script run has ended: start the import thread once no run is active."""
        with self._lock:
            self._active -= 1
            if self._thread is None and self._active == 0:
                self._thread = threading.Thread(target=self._import_all, name="warm-imports", daemon=True)
                self._thread.start()

    @property
    def started(self) -> bool:
        with self._lock:
            return self._thread is not None

    def _import_all(self) -> None:
        for module in self.modules:
            importlib.import_module(module)
