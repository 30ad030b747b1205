"""`chips ingest | rm`: pools and eval sets in and out of a workspace."""

from __future__ import annotations

import argparse

from chips_core.cli.common import (
    open_workspace,
    register,
    say,
)
from chips_core.workspace.progress import progress_bar


def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("name", metavar="NAME", help="name of the pool (or eval set) in the workspace")
    p.add_argument(
        "source", metavar="SOURCE", help="manifest (csv/tsv/parquet), image folder, .tar shards, DICOM"
    )
    p.add_argument("--eval", action="store_true", help="ingest as a target evaluation set instead of a pool")
    p.add_argument(
        "--image-col", default="filepath", help="manifest column with image paths (default filepath)"
    )
    p.add_argument("--caption-col", default="title", help="manifest column with captions (default title)")
    p.add_argument("--label-col", default=None, help="column (or WebDataset json key) with class labels")
    p.add_argument(
        "--format", dest="fmt", default=None, help="csv|tsv|parquet|folder|wds|dicom (default: detect)"
    )
    p.add_argument(
        "--sep", default=None, help="manifest separator (default: from the extension, else sniffed)"
    )
    p.add_argument(
        "--caption-template",
        default=None,
        help='DICOM caption template, e.g. "{Modality} {BodyPartExamined}"',
    )
    p.add_argument("--json-caption-key", default="caption", help="caption key in WebDataset json members")
    p.add_argument(
        "--workers", type=int, default=None, help="image-checking processes (default min(8, CPUs))"
    )
    p.add_argument(
        "--encoding",
        default="auto",
        help="text encoding of csv/tsv manifests and caption files, e.g. utf-8, cp1252, latin-1 "
        "(default auto: detected, reported and recorded with the pool)",
    )
    p.add_argument(
        "--allow-outside",
        action="append",
        default=[],
        metavar="DIR",
        help="also accept image paths that resolve (after symlinks) into DIR; repeatable "
        "(default: only inside the source's folder; others are rejected as outside_root)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing pool of this name ingested from another source or with other options "
        "(a failed pool is replaced without it); refused while feature runs, selections... depend on it "
        "(see `chips rm`)",
    )


def _run_ingest(args: argparse.Namespace) -> int:
    from chips_core.pools.ingest import IngestError, ingest

    ws = open_workspace(args.ws)
    try:
        with progress_bar(f"ingest {args.name}", unit="record") as bar:
            summary = ingest(
                ws,
                args.name,
                args.source,
                kind="eval" if args.eval else "pool",
                image_col=args.image_col,
                caption_col=args.caption_col,
                label_col=args.label_col,
                fmt=args.fmt,
                progress=bar,
                sep=args.sep,
                caption_template=args.caption_template,
                json_caption_key=args.json_caption_key,
                workers=args.workers,
                encoding=args.encoding,
                allow_outside=args.allow_outside,
                replace=args.replace,
            )
    except IngestError as exc:
        if exc.summary is not None:  # what was checked and rejected, then the one-line error
            say(exc.summary.format())
        raise
    say(summary.format())
    return 0


def _add_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("name", metavar="NAME", help="pool or eval set to remove")
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove what depends on it (feature runs, scoring caches, score runs, selections, "
        "exports, decisions); without it such a pool is refused and they are listed",
    )


def _run_rm(args: argparse.Namespace) -> int:
    from chips_core.workspace.remove import remove_pool

    say(remove_pool(open_workspace(args.ws), args.name, force=args.force).format())
    return 0


register("ingest", "read and validate a pool or eval set into the workspace", _add_ingest, _run_ingest)
register("rm", "remove a pool or eval set (and, with --force, what depends on it)", _add_rm, _run_rm)
