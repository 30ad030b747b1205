"""Checking records in parallel: `check_record` over chunks in a process pool that survives dying workers."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from chips_core.pools.records import Checked, Record, check_record


def mp_context() -> multiprocessing.context.BaseContext:
    """'fork' where available: workers start fast and never re-import the caller's __main__ (a Streamlit
    script, stdin); they only decode images and leave with os._exit, so inherited DuckDB handles stay
    untouched."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class Checker:
    """`check_record` over chunks in a process pool that survives dying workers (OOM killer, a decoder
    crash): a broken chunk is resubmitted to a fresh pool once, then checked one record per process, and
    a record that still kills its process is rejected as 'worker_crash'. workers=0 checks in-process."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers
        self.generation = 0
        self.executor = self._new()

    def _new(self) -> ProcessPoolExecutor | None:
        return ProcessPoolExecutor(self.n_workers, mp_context=mp_context()) if self.n_workers else None

    def submit(self, chunk: list[Record]) -> tuple[int, Iterator[Checked]]:
        """Start checking a chunk; returns (pool generation, lazy results) for `collect`."""
        if self.executor is None:
            return self.generation, map(check_record, chunk)
        size = max(1, len(chunk) // (4 * self.n_workers))
        try:
            return self.generation, self.executor.map(check_record, chunk, chunksize=size)
        except BrokenProcessPool:  # a worker died after the previous chunk finished
            self._restart()
            return self.generation, self.executor.map(check_record, chunk, chunksize=size)

    def collect(self, chunk: list[Record], submitted: tuple[int, Iterator[Checked]]) -> list[Checked]:
        """The chunk's results in record order, rechecking it if its pool broke meanwhile."""
        generation, results = submitted
        for attempt in range(2):
            try:
                return list(results)
            except BrokenProcessPool:
                if generation == self.generation:
                    self._restart()
                if attempt == 0:
                    generation, results = self.submit(chunk)
        return [self._isolated(rec) for rec in chunk]

    def _restart(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._new()
        self.generation += 1

    @staticmethod
    def _isolated(rec: Record) -> Checked:
        with ProcessPoolExecutor(1, mp_context=mp_context()) as one:
            try:
                return one.submit(check_record, rec).result()
            except BrokenProcessPool:
                detail = (
                    f"{rec.source_ref}: the checking process died on this record (crash or out of memory)"
                )
                return Checked(
                    rec.index,
                    rec.source_ref,
                    rec.image_ref,
                    rec.caption,
                    rec.label,
                    reason="worker_crash",
                    detail=detail,
                )

    def close(self) -> None:
        """Stop the worker processes."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
