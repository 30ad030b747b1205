"""Exports of a saved selection: open_clip_train CSV, spreadsheet-safe CSV, parquet, `.npy` ids.

Every export is written atomically and gets a JSON manifest beside it (`<file>.manifest.json`: selection,
score run and its parameters, model, decisions, the open_clip_train flags, sha256 of the file) plus an
`exports` row. The open_clip CSV is read back the way `open_clip_train.data.CsvDataset` reads it
(`pd.read_csv(path, sep=sep)`, then `str()` of each cell) and must give every caption byte for byte;
a caption pandas would change (e.g. "NA", read as a missing value) is left out and listed with a reason.
Images PIL cannot open as they are (WebDataset members, DICOM, 16-bit greyscale) are written as PNG
files under `<stem>_images/` beside the CSV, through `chips_core.pools.records.load_image`, so CPT sees the
pixels CHIPS scored.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from chips_core.curation import selection as sel
from chips_core.spreadsheet import neutralise
from chips_core.team import audit, roles
from chips_core.team.identity import Actor, current_actor
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, WorkspaceError, atomic_path

FORMATS = ("csv", "safe_csv", "parquet", "ids")
SUFFIX = {"csv": ".csv", "safe_csv": ".csv", "parquet": ".parquet", "ids": ".npy"}
IMG_KEY, CAPTION_KEY, SEPARATOR = "filepath", "title", ","
#: Cell prefixes a spreadsheet may run as a formula (OWASP "CSV injection"), incl. tab and carriage return.
#: PIL modes that open_clip's `convert("RGB")` maps faithfully; anything else is materialised.
_PLAIN_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}

Progress = Callable[[int, int], None]


class ExportError(WorkspaceError):
    """An export problem with a message meant for the user."""


@dataclass
class ExportInfo:
    """What an export wrote, and how to hand it to open_clip_train."""

    export_id: int
    selection_id: int
    format: str
    path: Path
    manifest_path: Path
    n_rows: int
    materialised: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    csv_args: dict[str, str] = field(default_factory=dict)

    def open_clip_flags(self) -> list[str]:
        """`--train-data PATH --csv-separator , --csv-img-key filepath --csv-caption-key title` (CSV only)."""
        if not self.csv_args:
            return []
        return [
            "--train-data",
            str(self.path),
            "--csv-separator",
            self.csv_args["separator"],
            "--csv-img-key",
            self.csv_args["img_key"],
            "--csv-caption-key",
            self.csv_args["caption_key"],
        ]


def default_path(ws: Workspace, info: sel.SelectionInfo, fmt: str) -> Path:
    """ws/exports/<name>-v<version>[-safe].<ext>."""
    tag = "-safe" if fmt == "safe_csv" else ""
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in info.name)
    return ws.root / "exports" / f"{safe_name}-v{info.version}{tag}{SUFFIX[fmt]}"


def export_selection(
    ws: Workspace,
    selection: str | int,
    fmt: str = "csv",
    out: str | os.PathLike | None = None,
    progress: Progress | None = None,
    actor: Actor | None = None,
) -> ExportInfo:
    """Export a saved selection (id, 'name' or 'name@version') as `fmt` to `out` (default ws/exports/...).

    fmt: 'csv' (open_clip_train-ready), 'safe_csv' (for spreadsheets), 'parquet' (every score
    component) or 'ids' (`.npy` of int64 pair ids, best first). `out` may be an existing folder. `actor`
    (default: the local user) must be a lead; the export is written to the audit trail.
    """
    fmt = _check_format(fmt)
    info = sel.get_selection(ws, selection)
    actor = current_actor(actor)
    roles.require(ws, actor, "export", pool_id=info.pool_id, detail=f"export {info.name} v{info.version}")
    path = Path(out) if out is not None else default_path(ws, info, fmt)
    if path.is_dir():
        path = path / default_path(ws, info, fmt).name
    path = path.resolve()
    table = _export_table(ws, info)
    export_id = ws.new_id()
    result = ExportInfo(
        export_id, info.selection_id, fmt, path, path.with_name(path.name + ".manifest.json"), 0
    )
    if fmt == "csv":
        table = _materialise(table, path.parent / f"{path.stem}_images", result, progress)
    with atomic_path(path) as tmp:
        _write_format(table, fmt, tmp, result)
        manifest = _manifest(ws, info, result, tmp)
        with atomic_path(result.manifest_path) as mtmp:
            mtmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    catalog.insert_export(ws, export_id, info.selection_id, fmt, str(path), json.dumps(manifest, default=str))
    _audit(ws, actor, info, fmt, export_id, str(path), result.n_rows)
    return result


def _audit(
    ws: Workspace, actor: Actor, info: sel.SelectionInfo, fmt: str, export_id: int | None, where: str, n: int
) -> None:
    audit.record(
        ws,
        actor,
        "export",
        fmt,
        pool_id=info.pool_id,
        object_id=export_id,
        score_run_id=info.score_run_id,
        params={"selection_id": info.selection_id, "selection": f"{info.name}@{info.version}",
                "format": fmt, "to": where, "n_rows": n},
    )  # fmt: skip


@dataclass
class ExportBytes:
    """An export in memory (a browser download): the file's bytes and its default name."""

    file_name: str
    data: bytes
    n_rows: int
    rejected: list[dict[str, Any]] = field(default_factory=list)


def export_bytes(
    ws: Workspace,
    selection: str | int,
    fmt: str = "csv",
    progress: Progress | None = None,
    actor: Actor | None = None,
) -> ExportBytes:
    """The bytes `export_selection(ws, selection, fmt)` writes to its default path, without writing the
    file, its manifest or an `exports` row (a browser download). Images of the open_clip CSV that must be
    materialised are written where that export puts them (beside the default path), so both name them
    alike. Built in a private temporary folder, so a failure leaves nothing half-written behind. Needs a
    lead, like `export_selection`; the download is written to the audit trail."""
    fmt = _check_format(fmt)
    info = sel.get_selection(ws, selection)
    actor = current_actor(actor)
    roles.require(ws, actor, "export", pool_id=info.pool_id, detail=f"download {info.name} v{info.version}")
    path = default_path(ws, info, fmt).resolve()
    table = _export_table(ws, info)
    result = ExportInfo(0, info.selection_id, fmt, path, path.with_name(path.name + ".manifest.json"), 0)
    if fmt == "csv":
        table = _materialise(table, path.parent / f"{path.stem}_images", result, progress)
    with tempfile.TemporaryDirectory(prefix="chips-export-") as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        _write_format(table, fmt, tmp, result)
        out = ExportBytes(path.name, tmp.read_bytes(), result.n_rows, result.rejected)
    _audit(ws, actor, info, fmt, None, "browser download", result.n_rows)
    return out


def _check_format(fmt: str) -> str:
    fmt = fmt.replace("-", "_")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _write_format(table: pd.DataFrame, fmt: str, tmp: Path, result: ExportInfo) -> None:
    """Write `table` as `fmt` to `tmp` (sets result.n_rows; the open_clip CSV may drop rows)."""
    if fmt == "csv":
        table = _write_open_clip_csv(table, tmp, result)
    elif fmt == "safe_csv":
        _write_safe_csv(table, tmp)
    elif fmt == "parquet":
        table.to_parquet(tmp, index=False)
    else:
        with open(tmp, "wb") as f:
            np.save(f, table["pair_id"].to_numpy(np.int64))
    result.n_rows = len(table)


def _export_table(ws: Workspace, info: sel.SelectionInfo) -> pd.DataFrame:
    """Members with their pair rows, score components and decisions, best rank first."""
    members = sel.selection_members(ws, info.selection_id)
    if members["filepath"].isna().any():
        lost = members.loc[members["filepath"].isna(), "pair_id"].head(3).tolist()
        raise ExportError(f"selection {info.name} v{info.version}: pair(s) {lost} are no longer in the pool")
    if info.score_run_id is not None:
        scores = sel.load_score_run(ws, info.score_run_id).drop(columns=["rank", "selected"], errors="ignore")
        members = members.merge(scores, on="pair_id", how="left")
    decisions = sel.current_decisions(ws, info.pool_id)[["pair_id", "state", "note"]]
    members = members.merge(decisions.rename(columns={"state": "decision"}), on="pair_id", how="left")
    return members.reset_index(drop=True)


def _needs_materialising(ref: str) -> bool:
    """True when open_clip_train's `Image.open(path)` + convert('RGB') would not see what CHIPS scored."""
    if "::" in ref or ref.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(ref, "rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM":
            return True
        if head.startswith(b"\xff\xd8\xff"):  # JPEG: always 8-bit, PIL opens it as is
            return False
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return head[24] == 16  # bit depth 16: PIL's mode I;16, which convert("RGB") would clip
        with Image.open(ref) as im:
            return im.mode not in _PLAIN_MODES
    except (OSError, UnidentifiedImageError, ValueError):
        return True


def _materialise(
    table: pd.DataFrame, img_dir: Path, result: ExportInfo, progress: Progress | None
) -> pd.DataFrame:
    """Write PNGs for references PIL cannot open directly; returns the table with their new paths."""
    from chips_core.pools.records import load_image

    paths = table["filepath"].tolist()
    todo = [i for i, ref in enumerate(paths) if _needs_materialising(ref)]
    for done, i in enumerate(todo, 1):
        target = img_dir / f"{np.uint64(np.int64(table.at[i, 'pair_id'])):016x}.png"
        if not target.exists():
            try:
                image = load_image(paths[i])
            except WorkspaceError as exc:
                raise ExportError(f"cannot export pair {table.at[i, 'pair_id']}: {exc}") from None
            with atomic_path(target) as tmp:
                image.save(tmp, format="PNG")
        paths[i] = str(target)
        if progress is not None:
            progress(done, len(todo))
    result.materialised = len(todo)
    out = table.copy()
    out["source_ref"] = table["filepath"]
    out["filepath"] = paths
    return out


def _write_csv(df: pd.DataFrame, path: Path, sep: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=sep, quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(df.columns)
        w.writerows(df.itertuples(index=False, name=None))


def _write_open_clip_csv(table: pd.DataFrame, tmp: Path, result: ExportInfo) -> pd.DataFrame:
    """Write filepath,title; verify with CsvDataset's own read; drop (and record) rows pandas would alter."""
    keep = table
    for _ in range(3):
        _write_csv(keep[[IMG_KEY, "caption"]].rename(columns={"caption": CAPTION_KEY}), tmp, SEPARATOR)
        back = pd.read_csv(tmp, sep=SEPARATOR)  # exactly how open_clip_train.data.CsvDataset reads it
        if len(back) != len(keep):
            raise ExportError(f"{tmp}: read back {len(back)} rows, wrote {len(keep)}")
        bad = np.array(
            [
                str(c) != want or str(p) != ref
                for c, want, p, ref in zip(
                    back[CAPTION_KEY], keep["caption"], back[IMG_KEY], keep[IMG_KEY], strict=True
                )
            ],
            dtype=bool,
        )
        if not bad.any():
            result.csv_args = {"separator": SEPARATOR, "img_key": IMG_KEY, "caption_key": CAPTION_KEY}
            return keep
        for (_, row), got in zip(keep[bad].iterrows(), back.loc[bad, CAPTION_KEY], strict=True):
            result.rejected.append(
                {
                    "pair_id": int(row["pair_id"]),
                    "reason": "caption_not_csv_safe",
                    "detail": f"pandas.read_csv reads caption {row['caption']!r} as {str(got)!r}",
                }
            )
        keep = keep[~bad].reset_index(drop=True)
    raise ExportError(f"{tmp}: captions still change when read back with pandas after dropping rows")


def _write_safe_csv(table: pd.DataFrame, tmp: Path) -> None:
    """Clinician-facing CSV: text cells neutralised, numbers plain, UTF-8 with a BOM for spreadsheets."""
    cols = [
        c
        for c in ("rank", "pair_id", "source", "decision", "note", "caption", "label", "filepath")
        if c in table
    ]
    cols += [c for c in ("score", "alignment", "learnability", "relevance", "agreement") if c in table]
    df = table[cols].copy()
    for c in df.columns:
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]):
            df[c] = [
                neutralise(str(v)) if v is not None and not (isinstance(v, float) and np.isnan(v)) else ""
                for v in df[c]
            ]
    df = df.astype(object).where(df.notna(), "")
    with open(tmp, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        w.writerow(df.columns)
        w.writerows(df.itertuples(index=False, name=None))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(ws: Workspace, info: sel.SelectionInfo, result: ExportInfo, written: Path) -> dict[str, Any]:
    """Everything that produced the export: selection, score run, cache, model, decisions, flags."""
    run = sel.score_run_info(ws, info.score_run_id) if info.score_run_id is not None else None
    cache: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    with ws.connect(read_only=True) as con:
        pool = catalog.pool_row(con, info.pool_id)
        if run is not None and run.get("cache_id") is not None and not pd.isna(run["cache_id"]):
            c = catalog.cache_manifest_info(con, int(run["cache_id"]))
            if c is not None:
                cache = {"cache_id": c[0], "config": json.loads(c[1]) if c[1] else None, "dir": c[2]}
                model = {
                    "name": c[3],
                    "pretrained": c[4],
                    "checkpoint": c[5],
                    "checkpoint_sha256": c[6],
                    "feature_run_id": c[7],
                }
    return {
        "export_id": result.export_id,
        "format": result.format,
        "path": str(result.path),
        "sha256": _sha256(written),
        "n_rows": result.n_rows,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "selection": {
            "selection_id": info.selection_id,
            "name": info.name,
            "version": info.version,
            "ratio": info.ratio,
            "n_selected": info.n_selected,
            "params": info.params,
        },
        "pool": {
            "pool_id": info.pool_id,
            "name": pool[0] if pool else None,
            "source": pool[1] if pool else None,
        },
        "score_run": None
        if run is None
        else {"score_run_id": run["score_run_id"], "method": run["method"], "params": run["params"]},
        "scoring_cache": cache,
        "model": model,
        "decisions": info.params.get("decisions"),
        "decisions_applied": sel.applied_decisions(ws, info.selection_id).to_dict("records"),
        "open_clip_train": result.open_clip_flags() or None,
        "materialised_images": result.materialised,
        "rejected": result.rejected,
    }
