"""The `chips` command end to end.

Real subprocesses (`python -m chips_core.cli`) on a small pool of real images with awkward captions, a tiny
random-init open_clip model, exit codes and one-line errors.
"""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from open_clip_train.data import CsvDataset
from PIL import Image

from chips_core import cli
from chips_core.curation import selection as sel
from chips_core.workspace.store import Workspace
from tests.fixtures_build import write_manifest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CAPTIONS = [
    'retina, "quoted", with commas',
    "two\nlines of text",
    "=cmd|' /C calc'!A0",
    "unicode µm 肺 café",
    "+plus sign first",
    "  padded caption  ",
]
PREP = ["--k-max", "32", "--batch-size", "8", "--device", "cpu"]


def chips(*args, ok=True, timeout=300):
    """Run the real command line in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("CHIPS_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "chips_core.cli", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if ok:
        assert proc.returncode == 0, f"chips {' '.join(map(str, args))} failed: {proc.stderr}"
    return proc


def manifest(folder: Path, n: int, seed: int) -> Path:
    return write_manifest(folder, n, seed, CAPTIONS)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """init → ingest pool + eval → featurize both → score (which prepares): all through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    ws = root / "ws"
    chips("init", ws)
    out = chips(
        "ingest", ws, "pool", manifest(root / "pool", 24, seed=1), "--label-col", "label", "--workers", 0
    )
    assert "24 pairs, 0 rejected" in out.stdout
    chips("ingest", ws, "target", manifest(root / "eval", 10, seed=2), "--eval", "--workers", 0)
    for name in ("pool", "target"):
        assert (
            "featurized"
            in chips("featurize", ws, name, "--model", "chips-tiny-vit", "--device", "cpu").stdout
        )
    scores = root / "scores.parquet"
    out = chips("score", ws, "pool", "--eval", "target", "--ratio", "0.25", "--out", scores, *PREP)
    assert "score run" in out.stdout and "lam_star" in out.stdout
    return Workspace(ws), scores, root


@pytest.mark.slow
def test_score_out_has_every_component(scored):
    ws, scores, _ = scored
    df = pd.read_parquet(scores)
    for col in ("pair_id", "filepath", "caption", "alignment", "learnability", "relevance", "score", "rank"):
        assert col in df.columns
    assert len(df) == 24 and sorted(df["rank"]) == list(range(1, 25))
    assert (np.diff(df.sort_values("rank")["score"].to_numpy()) <= 0).all()
    with ws.connect(read_only=True) as con:
        pairs = dict(con.execute("SELECT pair_id, caption FROM pairs").fetchall())
    assert all(pairs[p] == c for p, c in zip(df["pair_id"], df["caption"], strict=True))


@pytest.mark.slow
def test_baseline_reuses_the_cache_and_writes_csv(scored):
    ws, _, root = scored
    with ws.connect(read_only=True) as con:
        n_caches = con.execute("SELECT count(*) FROM scoring_caches").fetchone()[0]
    out = root / "clip.csv"
    chips("score", ws.root, "pool", "--eval", "target", "--method", "clipscore", "--out", out, *PREP)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM scoring_caches").fetchone()[0] == n_caches
        assert con.execute("SELECT method FROM score_runs ORDER BY score_run_id").fetchall()[-1] == (
            "clipscore",
        )
    df = pd.read_csv(out)
    assert len(df) == 24 and "score" in df.columns


@pytest.mark.slow
def test_tracin_with_one_checkpoint_is_dot_and_exact_runs(scored):
    ws, _, _ = scored
    with ws.connect(read_only=True) as con:
        cache_id = con.execute("SELECT max(cache_id) FROM scoring_caches").fetchone()[0]
    chips("score", ws.root, "pool", "--eval", "target", "--method", "dot", *PREP)
    chips(
        "score",
        ws.root,
        "pool",
        "--eval",
        "target",
        "--method",
        "tracin",
        "--tracin-cache",
        f"{cache_id}:2",
        *PREP,
    )
    chips("score", ws.root, "pool", "--eval", "target", "--exact", "--k", "16", *PREP)
    with ws.connect(read_only=True) as con:
        runs = con.execute("SELECT score_run_id, method FROM score_runs ORDER BY score_run_id").fetchall()[
            -3:
        ]
    assert [m for _, m in runs] == ["dot", "tracin", "chips-exact"]
    dot, tracin, exact = (sel.load_score_run(ws, r).set_index("pair_id").sort_index() for r, _ in runs)
    np.testing.assert_allclose(tracin["alignment"], 2 * dot["alignment"], rtol=1e-6)
    assert np.isfinite(exact["score"]).all() and len(exact) == 24
    assert sel.score_run_info(ws, runs[2][0])["params"]["info"]["exact"] is True


@pytest.mark.slow
def test_decisions_persist_and_selection_applies_them(scored):
    ws, scores, _ = scored
    with ws.connect(read_only=True) as con:
        run = con.execute("SELECT max(score_run_id) FROM score_runs").fetchone()[0]
    ranking = sel.load_score_run(ws, run)
    top, bottom = int(ranking["pair_id"].iloc[0]), int(ranking["pair_id"].iloc[-1])
    chips("decide", ws.root, "pool", top, "exclude", "--note", "wrong modality")
    chips("decide", ws.root, "pool", bottom, "include")
    out = chips("select", ws.root, "pool", "--ratio", "0.25", "--name", "cur")
    assert "1 included, 1 excluded" in out.stdout
    members = sel.selection_members(ws, "cur")
    assert len(members) == 6 and top not in set(members["pair_id"]) and bottom in set(members["pair_id"])
    chips("decide", ws.root, "pool", top, "clear")
    chips("select", ws.root, "pool", "--ratio", "0.25", "--name", "cur")
    diff = chips("diff", ws.root, "cur@1", "cur@2", "--list").stdout
    assert f"only in second: {top}" in diff
    status = chips("status", ws.root).stdout
    assert "selections: 2" in status and "cur" in status


@pytest.mark.slow
def test_export_csv_is_open_clip_ready_and_byte_exact(scored):
    ws, _, root = scored
    chips("select", ws.root, "pool", "--ratio", "1", "--name", "everything")
    target = root / "export" / "train.csv"
    out = chips("export", ws.root, "everything", "--format", "csv", "--out", target).stdout
    assert "--csv-separator , --csv-img-key filepath --csv-caption-key title" in out
    ds = CsvDataset(str(target), transforms=lambda im: np.asarray(im.convert("RGB")), img_key="filepath",
                    caption_key="title", sep=",", tokenizer=lambda texts: texts)  # fmt: skip
    with ws.connect(read_only=True) as con:
        want = dict(con.execute("SELECT filepath, caption FROM pairs p JOIN pools USING (pool_id) "
                                "WHERE pools.name = 'pool'").fetchall())  # fmt: skip
    assert len(ds) == 24
    for i in range(len(ds)):
        image, caption = ds[i]
        assert caption.encode("utf-8") == want[ds.images[i]].encode("utf-8")
        assert image.shape[2] == 3
    assert set(CAPTIONS) <= {ds[i][1] for i in range(len(ds))}
    assert (root / "export" / "train.csv.manifest.json").exists()


@pytest.mark.slow
def test_export_safe_csv_and_ids(scored):
    ws, _, root = scored
    chips("select", ws.root, "pool", "--ratio", "1", "--name", "all-safe")
    safe = root / "clinic.csv"
    chips("export", ws.root, "all-safe", "--format", "safe-csv", "--out", safe)
    rows = list(csv.DictReader(io.StringIO(safe.read_bytes().decode("utf-8-sig"), newline="")))
    cells = {r["caption"] for r in rows}
    assert "'=cmd|' /C calc'!A0" in cells and "'+plus sign first" in cells
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)
    ids = root / "ids.npy"
    chips("export", ws.root, "all-safe", "--format", "ids", "--out", ids)
    assert sorted(np.load(ids)) == sorted(int(r["pair_id"]) for r in rows)


@pytest.mark.slow
def test_bad_input_gives_one_line_and_exit_1(scored):
    ws, _, root = scored
    (root / "afile").write_text("x")
    cases = [
        (["status", root / "nowhere"], "not a CHIPS workspace"),
        (["select", ws.root, "nopool", "--ratio", "0.1", "--name", "x"], "no pool named 'nopool'"),
        (["decide", ws.root, "pool", "12345", "exclude"], "not in pool"),
        (["export", ws.root, "nosuch", "--format", "csv"], "no selection 'nosuch'"),
        (["export", ws.root, "everything", "--out", root / "afile" / "x.csv"], "afile"),
        (["ingest", ws.root, "p2", root / "missing.csv"], "missing.csv"),
        (["featurize", ws.root, "pool", "--model", "no-such-model", "--device", "cpu"], "no-such-model"),
        (["score", ws.root, "pool", "--eval", "target", "--out", root / "x.txt"], "parquet or .csv"),
        (["score", ws.root, "pool", "--eval", "nothere", *PREP], "nothere"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chips_core.cli", *map(str, args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        for args, _ in cases
    ]
    for (args, needle), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=300)
        lines = [
            ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING:root:No pretrained")
        ]
        assert proc.returncode == 1, (args, err)
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith(f"chips {args[0]}: "), (
            args,
            err,
        )
    assert not (root / "afile").is_dir()


def test_argparse_errors_and_help(capsys):
    from chips_core.cli.common import COMMANDS

    for name in list(COMMANDS):
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: chips " + name in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["decide", "ws", "pool", "notanumber", "include"])
    assert exc.value.code == 2
    assert "invalid pair id" in capsys.readouterr().err


# flags whose default is not the dataclass's on purpose: device 'auto' (cuda if present), blocks and the
# rank options a preset sets (None: the --preset's value), model (required)
NOT_FROM_DATACLASS = {
    "device",
    "blocks",
    "damping",
    "normalize",
    "guard",
    "agreement",
    "clipscore_weight",
    "model",
}  # the preset's


@pytest.mark.parametrize(
    ("command", "cls", "argv", "renamed"),
    [
        ("prepare", "PrepareConfig", ["ws", "pool", "--eval", "e"], {}),
        ("score", "PrepareConfig", ["ws", "pool", "--eval", "e"], {}),
        ("score", "RankParams", ["ws", "pool", "--eval", "e"], {"seed": "rank_seed"}),
        ("train", "Recipe", ["ws", "--model", "m"], {}),
        ("experiment", "Recipe", ["ws", "p", "--test", "t", "--cache", "1", "--model", "m"], {}),
        ("experiment", "RankParams", ["ws", "p", "--test", "t", "--cache", "1", "--model", "m"], {}),
    ],
)
def test_flag_defaults_are_the_dataclasses(command, cls, argv, renamed):
    """Every flag named after a field of PrepareConfig / RankParams / Recipe defaults to that field's
    default (read from `dataclasses.fields`): a flag default written by hand would differ some day."""
    import argparse
    from dataclasses import MISSING, fields

    from chips_core.cli.common import COMMANDS
    from chips_core.scoring import params
    from chips_core.training import cpt

    dc = getattr(params, cls, None) or getattr(cpt, cls)
    p = argparse.ArgumentParser()
    COMMANDS[command].add_arguments(p)
    args = vars(p.parse_args(argv))
    checked = []
    for f in fields(dc):
        dest = renamed.get(f.name, f.name)
        if f.name in NOT_FROM_DATACLASS or dest not in args or f.default is MISSING:
            continue
        assert args[dest] == f.default, f"--{dest.replace('_', '-')}: {args[dest]!r} != {f.default!r}"
        checked.append(f.name)
    assert len(checked) >= (2 if command == "experiment" and cls == "RankParams" else 5), checked
    if command == "score" and cls == "RankParams":  # and the flags build exactly the default RankParams
        from chips_core.cli.scoring import rank_params

        assert rank_params(argparse.Namespace(**args)) == params.RankParams()
    if cls == "Recipe":
        assert command == "train" or args["methods"] == list(params.EXPERIMENT_METHODS)
        from chips_core.cli.training import _recipe

        assert _recipe(argparse.Namespace(**args)) == cpt.Recipe("m")


def test_agreement_flag_follows_the_preset():
    """--agreement is the preset's unless given: the paper preset stays literal (0), an explicit value wins,
    and `experiment` passes it to the chips cells only when given."""
    import argparse

    from chips_core.cli.common import COMMANDS
    from chips_core.cli.scoring import rank_params

    p = argparse.ArgumentParser()
    COMMANDS["score"].add_arguments(p)

    def params(*argv: str):
        return rank_params(p.parse_args(["ws", "pool", "--eval", "e", *argv]))

    assert params().agreement == 0.75 and params("--preset", "paper").agreement == 0.0
    assert params("--preset", "paper", "--agreement", "0.3").agreement == 0.3
    assert params("--agreement", "0").agreement == 0.0
    with pytest.raises(SystemExit):
        params("--agreement", "1.5")
    # --clipscore-weight likewise
    assert params().clipscore_weight == 0.25 and params("--preset", "paper").clipscore_weight == 0.0
    assert params("--preset", "paper", "--clipscore-weight", "0.4").clipscore_weight == 0.4
    assert params("--clipscore-weight", "0").clipscore_weight == 0.0
    with pytest.raises(SystemExit):
        params("--clipscore-weight", "-0.2")


def test_negative_pair_ids_parse():
    args = cli.build_parser().parse_args(["decide", "ws", "pool", "-42", "exclude"])
    assert args.pair_id == -42 and args.action == "exclude"


def test_bulk_decisions_from_a_file(tmp_path):
    """`chips decide WS POOL @ids.txt exclude` records one decision per listed pair; a bad line is refused."""
    import pydicom.data

    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm"):
        (dicom_dir / name).write_bytes(Path(pydicom.data.get_testdata_file(name)).read_bytes())
    ws = Workspace(tmp_path / "ws")
    chips("init", ws.root)
    chips("ingest", ws.root, "dcm", dicom_dir, "--workers", 0)
    with ws.connect(read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT pair_id FROM pairs ORDER BY row_index").fetchall()]
    listing = tmp_path / "bad.txt"
    listing.write_text(f"# flagged by the reader study\n{ids[0]}\n\n{ids[2]}  # blurry\n")
    assert "2 decisions: exclude" in chips("decide", ws.root, "dcm", f"@{listing}", "exclude").stdout
    np.save(tmp_path / "keep.npy", np.array([ids[1]], dtype=np.int64))
    chips("decide", ws.root, "dcm", f"@{tmp_path / 'keep.npy'}", "include", "--note=-fine")
    state = sel.current_decisions(ws, "dcm").set_index("pair_id")["state"].to_dict()
    assert state == {ids[0]: "exclude", ids[1]: "include", ids[2]: "exclude"}
    listing.write_text(f"{ids[0]}\nnot-an-id\n")
    proc = chips("decide", ws.root, "dcm", f"@{listing}", "clear", ok=False)
    assert proc.returncode == 1 and "line 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert len(sel.decision_history(ws, "dcm")) == 3  # nothing half-applied


def test_materialised_images_open_with_pil(tmp_path):
    """A DICOM pool exported as CSV: open_clip_train reads PNGs written beside the CSV."""
    import pydicom.data

    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (dicom_dir / name).write_bytes(Path(pydicom.data.get_testdata_file(name)).read_bytes())
    ws = Workspace(tmp_path / "ws")
    chips("init", ws.root)
    chips("ingest", ws.root, "dcm", dicom_dir, "--workers", 0)
    with ws.connect(read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT pair_id FROM pairs ORDER BY row_index").fetchall()]
    ranking = pd.DataFrame({"pair_id": ids, "score": [1.0, 0.5], "rank": [1, 2]})
    sid = sel.save_selection(ws, "dcm", ranking, ratio=1.0, name="dcm-all", method="manual")
    out = chips("export", ws.root, sid, "--out", tmp_path / "dcm.csv").stdout
    assert "2 images written as PNG" in out
    for path in pd.read_csv(tmp_path / "dcm.csv")["filepath"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0


def test_user_errors_share_one_root_and_anything_else_is_internal(tmp_path, monkeypatch, capsys):
    """Every public error class of chips_core derives from ChipsError, and `main` decides whose fault an error
    is by that root alone: a ChipsError (any subclass, e.g. GalleryError) exits 1 with one line naming the
    command; any other exception is an internal error (exit 2)."""
    import importlib
    import pkgutil

    import chips_core
    from chips_core.cli.common import COMMANDS, Command
    from chips_core.curation.gallery import GalleryError
    from chips_core.errors import ChipsError

    public = []
    for info in pkgutil.walk_packages(chips_core.__path__, "chips_core."):
        if info.name.startswith("chips_core.engines.ray") or info.name.endswith("__main__"):
            continue  # ray_*: imports ray (test_ray.py covers them); __main__ runs the CLI
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            ours = isinstance(obj, type) and obj.__module__ == info.name and not name.startswith("_")
            if ours and issubclass(obj, Exception):
                public.append(obj)
    assert len(public) >= 15
    assert [c.__name__ for c in public if not issubclass(c, ChipsError)] == []

    def boom(exc: BaseException):
        def run(args):
            raise exc

        return Command("boom", "raises", lambda p: None, run)

    monkeypatch.setitem(COMMANDS, "boom", boom(GalleryError("thumbnail folder is read-only")))
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chips boom: thumbnail folder is read-only"]
    monkeypatch.setitem(COMMANDS, "boom", boom(KeyError("oops")))
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err.startswith("chips boom: internal error: KeyError")


@pytest.mark.slow
def test_map_computes_once_then_reads_the_cache(scored):
    from chips_core.curation import maps
    from chips_core.engines.pipeline import feature_runs_for

    ws, _, _ = scored
    pool_run, eval_run = feature_runs_for(ws, "pool", "target")
    out = chips("map", ws.root, "pool", "--n-neighbors", 5)
    assert f"map of feature run {pool_run} (pool): 24 pairs, computed in {maps.map_dir(ws, pool_run)}" in (
        out.stdout
    )
    fmap = maps.load_map(ws, pool_run)
    assert fmap.n_total == 24 and fmap.image_xy.shape == fmap.text_xy.shape == (24, 2) and not fmap.sampled
    meta = json.loads((maps.map_dir(ws, pool_run) / "meta.json").read_text())
    assert meta["n_neighbors"] == 5
    # the same run named by model or id: read from the cache, not computed again
    before = (maps.map_dir(ws, pool_run) / "meta.json").stat().st_mtime_ns
    for how in (["--model", "chips-tiny-vit"], ["--run", pool_run]):
        assert "24 pairs, cached in" in chips("map", ws.root, "pool", *how).stdout
    assert (maps.map_dir(ws, pool_run) / "meta.json").stat().st_mtime_ns == before
    for args, needle in (
        (["pool", "--run", eval_run], f"feature run {eval_run} is not a feature run of pool 'pool'"),
        (["pool", "--run", 987654], "no feature run 987654"),
        (["nopool"], "no pool named 'nopool'"),
        (["pool", "--model", "other-model"], "no finished feature run of model 'other-model'"),
    ):
        proc = chips("map", ws.root, *args, ok=False)
        assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("chips map: ")
    assert chips("map", ws.root, "pool", "--max-points", 2, ok=False).returncode == 2  # argparse
