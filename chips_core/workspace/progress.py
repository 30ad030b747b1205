"""Progress reporting for long steps: a tqdm bar that is also a library progress callback and, inside a
background job (chips_core.workspace.jobs), forwards each update to the job's row."""

from __future__ import annotations

import os
import sys
from typing import Any

_job_reporter: Any = None  # a jobs.JobReporter while this process runs as a background job


def set_job_reporter(reporter: Any) -> None:
    """Forward every progress bar's updates to `reporter` (None: stop forwarding)."""
    global _job_reporter
    _job_reporter = reporter


class progress_bar:  # noqa: N801 (used like a function: `with progress_bar("featurize") as cb:`)
    """A tqdm bar usable as a library progress callback, forwarding to the job table when in a job.

    Accepts `cb(done, total)`, `cb(done, total, **extra)`, `cb(dict)` (done/total or step/total_steps) and
    `cb(obj)` with `.done`/`.total`; an extra `stage="text"` names the current step in the job's message.
    Bars show only on a terminal unless CHIPS_PROGRESS=1.
    """

    def __init__(self, desc: str, unit: str = "pair") -> None:
        from tqdm import tqdm

        force = os.environ.get("CHIPS_PROGRESS")
        disable = None if force is None else force in ("0", "")
        self.desc = desc
        self._stage: Any = None
        self.bar = tqdm(
            desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=disable, file=sys.stderr
        )

    def __enter__(self) -> progress_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        done, total, extra = None, None, dict(kwargs)
        if len(args) == 1 and isinstance(args[0], dict):
            extra.update(args[0])
            done = extra.pop("done", extra.get("step"))
            total = extra.pop("total", extra.get("total_steps"))
        elif len(args) == 1 and hasattr(args[0], "done"):
            done, total = args[0].done, getattr(args[0], "total", None)
        elif args:
            done = args[0]
            total = args[1] if len(args) > 1 else None
        if total is not None and self.bar.total != total:
            self.bar.total = total
        if extra:  # before the update, which redraws the bar
            self.bar.set_postfix(
                {k: v for k, v in extra.items() if isinstance(v, int | float | str)}, refresh=False
            )
        if done is not None:
            self.bar.update(max(0, int(done) - self.bar.n))
        if _job_reporter is not None:
            fraction = float(done) / total if done is not None and total else None
            msg = f"{self.desc}: {done}" + (f"/{total}" if total else "")
            stage = extra.get("stage")
            if isinstance(stage, str) and done is not None:  # a step-wise job names its step
                msg = f"{self.desc}: {stage} ({done}" + (f"/{total})" if total else ")")
            new_stage, self._stage = stage != self._stage, stage  # a new step is recorded at once
            _job_reporter.progress(fraction, msg, force=new_stage)
