"""Featurization end to end on a real workspace: shards, rejects, FeatureStore, SIGKILL and resume."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from chips_core.features import featurize as features
from chips_core.features.featurize import FeatureStore, FeaturizeError, featurize
from chips_core.features.models import load_model
from chips_core.pools.records import load_image
from chips_core.workspace.store import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # a deadlocked DataLoader worker fails

N = 45
MODEL = "chips-tiny-vit"
ROOT = Path(__file__).resolve().parents[2]


def _make_pool(root, name="digits", n=N, status="ready", jpeg_every=3):
    """A workspace with one pool of n sklearn digits (PNG and JPEG files), rows inserted as ingest does."""
    ws = Workspace.init(root / "ws")
    img_dir = root / "img"
    img_dir.mkdir(exist_ok=True)
    digits = load_digits()
    rows = []
    for i in range(n):
        arr = (digits.images[i] * 255 / 16).astype(np.uint8)
        im = Image.fromarray(arr).resize((40 + i % 7, 32), Image.NEAREST).convert("RGB")
        path = img_dir / (f"d{i:03d}.jpg" if i % jpeg_every == 0 else f"d{i:03d}.png")
        im.save(path)
        caption = f"a handwritten digit {digits.target[i]} number {i}"
        pid = int.from_bytes(hashlib.blake2b(f"{path}|{caption}".encode(), digest_size=8).digest(), "little",
                             signed=True)  # fmt: skip
        rows.append((pid, n - i, str(path), caption))  # row_index reversed: store order is row_index order
    with ws.connect() as con:
        pool_id = ws.next_id(con)
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, status) "
            "VALUES (?, ?, 'pool', ?, 'csv', ?)",
            [pool_id, name, str(img_dir), status],
        )
        con.executemany(
            "INSERT INTO pairs (pool_id, pair_id, row_index, filepath, caption) VALUES (?, ?, ?, ?, ?)",
            [[pool_id, *r] for r in rows],
        )
    ordered = sorted(rows, key=lambda r: r[1])
    return ws, [r[0] for r in ordered], {r[0]: (r[2], r[3]) for r in rows}


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def _reference(loaded, refs_caps):
    """h, t of pairs computed directly through the model (no workspace), rounded to fp16."""
    images = torch.stack([loaded.preprocess(load_image(r)) for r, _ in refs_caps])
    h, t = loaded.encode(images, loaded.tokenizer([c for _, c in refs_caps]))
    return h.half().numpy(), t.half().numpy()


def test_featurize_writes_shards_and_reads_back(tmp_path, loaded):
    ws, order, by_id = _make_pool(tmp_path)
    reports = []
    run_id = featurize(
        ws, "digits", loaded, device="cpu", batch_size=8, shard_size=16, progress=reports.append
    )
    store = FeatureStore(ws, run_id)
    assert len(store) == N and store.pair_ids().tolist() == order
    assert (store.d_v, store.d_t) == (loaded.d_v, loaded.d_t)
    idx = np.array([44, 3, 17, 3, 0])
    h, t = store.rows(idx)
    assert h.dtype == np.float16 and h.shape == (5, loaded.d_v)
    ref_h, ref_t = _reference(loaded, [by_id[order[i]] for i in idx])
    np.testing.assert_allclose(h.astype(np.float32), ref_h.astype(np.float32), rtol=0, atol=2e-3)
    np.testing.assert_allclose(t.astype(np.float32), ref_t.astype(np.float32), rtol=0, atol=2e-3)
    assert [a.shape for a in store.rows(np.zeros(0, np.int64))] == [(0, loaded.d_v), (0, loaded.d_t)]
    with pytest.raises(IndexError, match="out of range"):
        store.rows(np.array([N]))
    shards = list(store.iter_shards())
    assert [len(s[0]) for s in shards] == [16, 16, 13]
    assert np.concatenate([s[0] for s in shards]).tolist() == order
    np.testing.assert_array_equal(np.concatenate([s[1] for s in shards])[idx], h)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT status, n_pairs, d_v FROM feature_runs").fetchall() == [
            ("done", N, loaded.d_v)
        ]
        assert con.execute("SELECT first_row FROM feature_shards ORDER BY shard_index").fetchall() == [
            (0,), (16,), (32,)]  # fmt: skip
        model_row = con.execute("SELECT name, pretrained FROM models").fetchall()
    assert model_row == [(MODEL, "random-init:seed=0")]
    assert reports[0].done == 0 and reports[-1].done == N == reports[-1].total and reports[-1].eta_s == 0
    assert reports[-1].shards_done == reports[-1].n_shards == 3 and reports[-1].pairs_per_s > 0
    # a finished run is returned as is, nothing recomputed
    again = []
    assert featurize(ws, "digits", loaded, device="cpu", shard_size=16, progress=again.append) == run_id
    assert [r.done for r in again] == [N]


def test_unloadable_images_are_rejected_and_skipped(tmp_path, loaded):
    ws, order, by_id = _make_pool(tmp_path)
    gone, broken = order[5], order[20]
    (tmp_path / "img" / by_id[gone][0].rsplit("/", 1)[1]).unlink()
    with open(by_id[broken][0], "wb") as f:
        f.write(b"not an image at all")
    run_id = featurize(ws, "digits", loaded, device="cpu", batch_size=8, shard_size=16)
    store = FeatureStore(ws, run_id)
    assert store.pair_ids().tolist() == [p for p in order if p not in (gone, broken)]
    with ws.connect(read_only=True) as con:
        rejects = dict(con.execute("SELECT source_ref, reason FROM rejects").fetchall())
        assert con.execute("SELECT n_pairs FROM feature_runs").fetchone()[0] == N - 2
    assert rejects == {by_id[gone][0]: "missing_file", by_id[broken][0]: "corrupt_image"}
    h, _ = store.rows(np.arange(len(store)))
    assert np.isfinite(h.astype(np.float32)).all()


def test_one_writer_per_run(tmp_path, loaded):
    ws, _, _ = _make_pool(tmp_path, n=3)
    info = features.open_run(ws, "digits", loaded, shard_size=2)
    assert features.open_run(ws, "digits", loaded).run_id == info.run_id  # same (pool, model): same run
    (info.dir / ".shard-00000-h.npy.tmp.npy").write_bytes(b"partial")
    with features.run_lock(info):
        assert not list(info.dir.glob(".*"))  # a dead writer's temporaries are cleared
        with (
            pytest.raises(FeaturizeError, match="being written by another process"),
            features.run_lock(info, wait_s=0),
        ):
            pass
    with features.run_lock(info, wait_s=0):  # released
        pass


def test_features_beyond_fp16_are_an_error_not_inf(tmp_path):
    ws, _, _ = _make_pool(tmp_path, n=3)
    huge = load_model(MODEL)
    with torch.no_grad():
        huge.model.visual.ln_post.weight.mul_(1e6)
    with pytest.raises(FeaturizeError, match="non-finite features .* for pair ids"):
        featurize(ws, "digits", huge, device="cpu")
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM feature_shards").fetchone() == (0,)


def test_bad_pool_names_and_states(tmp_path, loaded):
    ws, _, _ = _make_pool(tmp_path, status="ingesting", n=3)
    with pytest.raises(FeaturizeError, match="no pool named 'nope'.*digits"):
        featurize(ws, "nope", loaded, device="cpu")
    with pytest.raises(FeaturizeError, match="pool 'digits' is not ready"):
        featurize(ws, "digits", loaded, device="cpu")
    with pytest.raises(FeaturizeError, match="no feature run 999"):
        FeatureStore(ws, 999)


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from chips_core.features import featurize as features
    from chips_core.workspace.store import Workspace

    saves = {"n": 0}
    real_save = np.save

    def save(*args, **kwargs):  # SIGKILL after the h and t files of the 3rd shard, before its ids file
        real_save(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 3 * 2 + 2:
            os.kill(os.getpid(), signal.SIGKILL)

    features.np.save = save
    features.featurize(Workspace(sys.argv[1]), "digits", "chips-tiny-vit", device="cpu", batch_size=8,
                       shard_size=8)
    """
)


def test_sigkilled_run_resumes_without_lost_or_duplicated_rows(tmp_path, loaded):
    ws, order, _ = _make_pool(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, str(ws.root)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    with ws.connect(read_only=True) as con:
        ((run_id, status),) = con.execute("SELECT run_id, status FROM feature_runs").fetchall()
        assert status == "running"
        assert con.execute("SELECT shard_index FROM feature_shards ORDER BY 1").fetchall() == [(0,), (1,)]
    run_dir = ws.root / "features" / str(run_id)
    assert (run_dir / "shard-00002-h.npy").exists() and not (run_dir / "shard-00002-ids.npy").exists()
    with pytest.raises(FeaturizeError, match="not finished"):
        FeatureStore(ws, run_id)
    assert len(FeatureStore(ws, run_id, allow_partial=True)) == 16

    reports = []
    assert (
        featurize(ws, "digits", MODEL, device="cpu", batch_size=8, shard_size=999, progress=reports.append)
        == run_id
    )
    assert reports[0].done == 16 and json.loads((run_dir / "run.json").read_text())["shard_size"] == 8
    store = FeatureStore(ws, run_id)
    assert store.pair_ids().tolist() == order
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]

    # identical to an uninterrupted run (here with DataLoader worker processes)
    ws2, _, _ = _make_pool(tmp_path / "fresh")
    fresh = FeatureStore(ws2, featurize(ws2, "digits", loaded, device="cpu", batch_size=8, shard_size=8,
                                        num_workers=2))  # fmt: skip
    h1, t1 = store.rows(np.arange(N))
    h2, t2 = fresh.rows(np.arange(N))
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(t1, t2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_matches_cpu_preprocessing(tmp_path):
    ws, _, _ = _make_pool(tmp_path, jpeg_every=1)
    gpu = load_model(MODEL, device="cuda")
    r_gpu = featurize(ws, "digits", gpu, device="cuda", gpu_decode=True, shard_size=16)
    ws2, _, _ = _make_pool(tmp_path / "cpu", jpeg_every=1)
    r_cpu = featurize(ws2, "digits", gpu, device="cuda", gpu_decode=False, shard_size=16)
    h1, t1 = FeatureStore(ws, r_gpu).rows(np.arange(N))
    h2, t2 = FeatureStore(ws2, r_cpu).rows(np.arange(N))
    np.testing.assert_allclose(t1.astype(np.float32), t2.astype(np.float32), atol=1e-2)
    cos = (
        (h1 * h2).astype(np.float32).sum(1)
        / np.linalg.norm(h1.astype(np.float32), axis=1)
        / np.linalg.norm(h2.astype(np.float32), axis=1)
    )
    assert cos.min() > 0.99, cos.min()
