"""The Ray engine on a real local Ray cluster that these tests start and stop themselves.

The Ray path must give the same shards, pair ids, features (within fp16 rounding), rejects, scoring cache
and ranking as the local path, on a CSV manifest pool and a WebDataset pool; a driver killed mid-run
resumes, and a run whose encoder worker process is killed mid-run completes, without losing or duplicating
a row. If Ray cannot start here, the tests fail (never skip).

The suite is self-contained: the cluster is `chips_core.engines.ray_featurize.local_ray` (the private
local Ray of `--engine ray` without `--address`): token authentication with a random token in the
environment of this process and its children only (nothing is read from the home folder, so it runs
with HOME pointing at an empty folder), listening on 127.0.0.1 only.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chips_core.features.featurize import FeatureStore, featurize
from chips_core.features.models import load_model
from chips_core.pools.ingest import ingest
from chips_core.scoring.cache import ScoringCache
from chips_core.scoring.params import PrepareConfig, RankParams
from chips_core.scoring.prepare import prepare
from chips_core.scoring.ranking import rank
from chips_core.workspace.store import Workspace
from tests.fixtures_build import make_csv_pool, make_wds_pool
from tests.net_probe import LOOPBACK, descendants, listening

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The environment of the drivers these tests start (the token comes from the session's environment): an
# explicit address never turns token authentication on by itself, and Ray reads RAY_AUTH_MODE and
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (0: dial "127.0.0.1:PORT" as given) when it is imported.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

MODEL = "chips-tiny-vit"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster (2 CPUs, 127.0.0.1 only, its own token), connected in-process: the library's
    own `local_ray`; drivers started by the tests inherit RAY_AUTH_TOKEN while it runs."""
    from chips_core.engines.ray_featurize import local_ray

    with local_ray(num_cpus=2, object_store_memory=300_000_000) as address:
        yield address


@pytest.fixture(scope="module")
def pools_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    return {"csv": make_csv_pool(root, n=24), "wds": make_wds_pool(root, n=20, shards=2), "root": root}


def _workspace(path: Path, src: dict) -> Workspace:
    ws = Workspace.init(path)
    ingest(ws, "csv", str(src["csv"]))
    ingest(ws, "wds", str(src["wds"]))
    return ws


@pytest.fixture(scope="module")
def featurized(cluster, pools_src, tmp_path_factory):
    """Both pools featurized locally and through Ray in two workspaces; one image gone before featurize."""
    from chips_core.engines.ray_featurize import featurize_ray

    base = tmp_path_factory.mktemp("ws")
    ws_local, ws_ray = _workspace(base / "local", pools_src), _workspace(base / "ray", pools_src)
    with ws_local.connect(read_only=True) as con:
        gone = con.execute(
            "SELECT filepath FROM pairs JOIN pools USING (pool_id) WHERE name = 'csv' "
            "ORDER BY row_index LIMIT 1 OFFSET 5"
        ).fetchone()[0]
    os.unlink(gone)  # ingested fine, missing at featurize time: both engines must reject it the same way
    runs = {}
    for name in ("csv", "wds"):
        local = featurize(ws_local, name, MODEL, device="cpu", batch_size=8, shard_size=8)
        remote = featurize_ray(ws_ray, name, MODEL, batch_size=8, shard_size=8)
        runs[name] = (local, remote)
    return ws_local, ws_ray, runs, gone


def _q(ws: Workspace, sql: str, args: list) -> list:
    with ws.connect(read_only=True) as con:
        return con.execute(sql, args).fetchall()


def test_cluster_is_up(cluster):
    import ray

    assert ray.is_initialized()
    assert ray.cluster_resources().get("CPU") == 2
    assert all(n["Alive"] for n in ray.nodes())


def test_cluster_listens_on_loopback_only(cluster):
    """Every listening socket of the test cluster's processes (GCS, raylet, workers, agents) and of this
    driver is bound to 127.0.0.1: nothing else on the network can reach the suite's Ray."""
    port = int(cluster.rsplit(":", 1)[1])
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    ray_procs = {p for p in pids if _in_cluster(p, port)}
    sockets = listening(ray_procs | descendants(os.getpid()))
    assert (("127.0.0.1", port) in sockets) or (("::ffff:127.0.0.1", port) in sockets), sockets
    assert len(sockets) >= 3, f"expected the GCS, raylet and worker servers, found {sockets}"
    wide = {k: v for k, v in sockets.items() if k[0] not in LOOPBACK}
    assert not wide, f"listening beyond loopback: {wide}"


def test_private_local_ray_binds_loopback_and_needs_no_home_token(tmp_path):
    """`--engine ray` without `--address` starts a private Ray: with HOME an empty folder and token
    authentication on (Ray's default for a new local cluster), it runs tasks, listens on loopback only and
    neither reads nor writes ~/.ray/auth_token."""
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent("""
        import json, os
        from chips_core.engines.ray_featurize import ray_session  # first: imports ray (single-machine)
        import ray
        from tests.net_probe import descendants, listening
        runs = []
        for _ in range(2):  # a second private Ray in the same process (Ray keeps the first token it loads)
            with ray_session(num_cpus=1):
                n = ray.get(ray.remote(lambda x: x + 1).remote(41))
                sockets = listening(descendants(os.getpid()))
                runs.append({"n": n, "sockets": [[a, p] for a, p in sockets],
                             "mode": os.environ.get("RAY_AUTH_MODE")})
        left = sorted(k for k in os.environ if k.startswith("RAY_") and k != "RAY_CLIENT_MODE")
        print(json.dumps({"runs": runs, "left": left}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    for run in out["runs"]:
        assert run["n"] == 42 and run["mode"] == "token"
        assert len(run["sockets"]) >= 3, run
        assert all(a in LOOPBACK for a, _ in run["sockets"]), f"listening beyond loopback: {run['sockets']}"
    # the process's environment is restored (RAY_CLIENT_MODE=0 is set by `import ray` itself)
    assert out["left"] == ["RAY_USAGE_STATS_ENABLED"], out["left"]
    assert not (home / ".ray").exists(), "the private Ray wrote its token into the home folder"


def test_private_local_ray_after_a_plain_import_ray_fails_fast(tmp_path):
    """A process that imported ray before chips_core.engines.ray_featurize, in Ray's default mode, would
    dial the private Ray's 127.0.0.1 address at the machine's own address (and wait there for minutes): it
    gets a clear error at once instead (a machine where Ray dials the loopback anyway has nothing to
    check)."""
    code = textwrap.dedent("""
        import time, ray
        from chips_core.engines.ray_featurize import ray_session
        from chips_core.features.featurize import FeaturizeError
        t0 = time.monotonic()
        if ray.util.get_node_ip_address() in ("127.0.0.1", "::1"):
            print("loopback")
        else:
            try:
                with ray_session(num_cpus=1):
                    print("connected")
            except FeaturizeError as exc:
                print(f"{time.monotonic() - t0:.1f}", exc)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    if last != "loopback":
        took, message = last.split(" ", 1)
        assert float(took) < 5 and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in message, last


@pytest.mark.parametrize(("name", "reader"), [("csv", "ReadFilesParquet"), ("wds", "ReadWebDataset")])
def test_featurize_ray_matches_local(featurized, name, reader, capsys):
    from chips_core.engines.ray_featurize import pool_dataset
    from chips_core.features.featurize import open_run

    ws_local, ws_ray, runs, gone = featurized
    loaded = load_model(MODEL)
    capsys.readouterr()
    pool_dataset(open_run(ws_ray, name, loaded, 8), [0], loaded, name).explain()
    assert reader in capsys.readouterr().out  # WebDataset shards are streamed by Ray's own reader
    local, remote = runs[name]
    shards_sql = "SELECT shard_index, n_rows, first_row FROM feature_shards WHERE run_id = ? ORDER BY 1"
    assert _q(ws_ray, shards_sql, [remote]) == _q(ws_local, shards_sql, [local])
    run_sql = "SELECT status, n_pairs, d_v, d_t FROM feature_runs WHERE run_id = ?"
    assert _q(ws_ray, run_sql, [remote]) == _q(ws_local, run_sql, [local])
    a, b = FeatureStore(ws_local, local), FeatureStore(ws_ray, remote)
    assert len(a) > 0 and a.pair_ids().tolist() == b.pair_ids().tolist()
    rows = np.arange(len(a))
    for x, y in zip(a.rows(rows), b.rows(rows), strict=True):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)
    rejects_sql = "SELECT source_ref, reason FROM rejects ORDER BY 1"
    assert _q(ws_ray, rejects_sql, []) == _q(ws_local, rejects_sql, [])
    if name == "csv":
        assert (gone, "missing_file") in _q(ws_ray, rejects_sql, [])
        assert len(a) == 23


def test_prepare_ray_matches_local_and_ranks_the_same(featurized, tmp_path):
    from chips_core.engines.ray_prepare import prepare_ray

    ws_local, ws_ray, runs, _ = featurized
    params = load_model(MODEL).adapter.endpoint_params()
    cfg = PrepareConfig(k_max=32, batch_size=6, chunk_batches=1, curvature_pairs=12, negatives_per_row=2)
    pool, ev = FeatureStore(ws_local, runs["csv"][0]), FeatureStore(ws_local, runs["wds"][0])
    # Same thread count on both sides: Ray starts a 1-CPU actor with OMP_NUM_THREADS=1 (one torch thread),
    # while this process has one per core, and a float32 matmul's result depends on how its reduction is
    # split over threads (here ~1e-6 in aux, ~1e-5 in Φ̃ between 1 and 2 threads; bitwise equal for the
    # same count). With one thread for the driver's part too (eval pass, reduction), the chunk function
    # computes the same numbers in the actors as in this process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare(pool, ev, params, cfg, tmp_path / "local")
        prepare_ray(pool, ev, params, cfg, tmp_path / "ray", num_workers=2)
    finally:
        torch.set_num_threads(threads)
    a, b = ScoringCache.load(tmp_path / "local"), ScoringCache.load(tmp_path / "ray")
    assert a.meta["n_chunks"] == b.meta["n_chunks"] > 1
    np.testing.assert_array_equal(a.pair_ids, b.pair_ids)
    np.testing.assert_allclose(a.aux, b.aux, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.phi_pos, b.phi_pos, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.phi_neg, b.phi_neg, rtol=1e-6, atol=1e-9)
    for ga, gb, sa, sb in zip(a.G, b.G, a.scales, b.scales, strict=True):
        ua, ub = ga.astype(np.float32) * sa[:, :, None], gb.astype(np.float32) * sb[:, :, None]
        np.testing.assert_allclose(ua, ub, rtol=1e-3, atol=1e-6)
    ra, rb = rank(a, RankParams(ratio=0.3)).frame, rank(b, RankParams(ratio=0.3)).frame
    np.testing.assert_allclose(ra["score"], rb["score"], rtol=1e-5)
    assert ra.sort_values("rank")["pair_id"].tolist() == rb.sort_values("rank")["pair_id"].tolist()
    assert ra["selected"].sum() == rb["selected"].sum() > 0


def _count_shards(ws: Workspace, pool: str) -> int:
    sql = "SELECT count(*) FROM feature_shards JOIN feature_runs USING (run_id) JOIN pools USING (pool_id) "
    try:
        return _q(ws, sql + "WHERE name = ?", [pool])[0][0]
    except Exception:  # noqa: BLE001 - the table is busy or not there yet: not done yet
        return 0


def test_killed_driver_resumes_without_loss_or_duplicates(cluster, featurized, pools_src):
    from chips_core.engines.ray_featurize import featurize_ray

    ws_local, ws_ray, _, _ = featurized
    for ws in (ws_local, ws_ray):  # the CSV pool again (23 readable images) under a new name: a fresh run
        ingest(ws, "again", str(pools_src["csv"]))
    n, n_shards = 23, 6
    code = textwrap.dedent(f"""
        from chips_core.engines.ray_featurize import featurize_ray
        from chips_core.workspace.store import Workspace
        featurize_ray(Workspace({str(ws_ray.root)!r}), "again", {MODEL!r}, address={cluster!r},
                      batch_size=4, shard_size=4)
    """)
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    runs_before = set((ws_ray.root / "features").iterdir())
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while not [
        d for d in (ws_ray.root / "features").iterdir() if d not in runs_before and any(d.glob("shard-*.npy"))
    ]:  # the first shard file: the driver is writing
        assert proc.poll() is None, f"the driver ended early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the Ray driver wrote no shard within 240 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _count_shards(ws_ray, "again")
    assert before < n_shards, f"killed after {before} of {n_shards} shards: not mid-run"
    run_id = featurize_ray(ws_ray, "again", MODEL, batch_size=4, shard_size=4)
    local_id = featurize(ws_local, "again", MODEL, device="cpu", batch_size=4, shard_size=4)
    sql = "SELECT shard_index, n_rows FROM feature_shards WHERE run_id = ? ORDER BY 1"
    shards = _q(ws_ray, sql, [run_id])
    assert [s for s, _ in shards] == list(range(n_shards)) and sum(k for _, k in shards) == n
    a, b = FeatureStore(ws_local, local_id), FeatureStore(ws_ray, run_id)
    ids = b.pair_ids()
    assert len(np.unique(ids)) == len(ids) == n and ids.tolist() == a.pair_ids().tolist()
    for x, y in zip(a.rows(np.arange(n)), b.rows(np.arange(n)), strict=True):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_cli_engine_ray_featurizes_like_the_local_path(cluster, featurized, pools_src):
    """`chips featurize --engine ray --address ...` (the CLI flag) gives the local path's ids and features."""
    ws_local, ws_ray, _, _ = featurized
    for ws in (ws_local, ws_ray):
        ingest(ws, "cli", str(pools_src["csv"]))
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "chips_core.cli", "featurize", str(ws_ray.root), "cli", "--model", MODEL,
            "--batch-size", "8", "--engine", "ray", "--address", cluster]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    remote = FeatureStore(ws_ray, int(re.search(r"feature run (\d+)", done.stdout).group(1)))
    local = FeatureStore(ws_local, featurize(ws_local, "cli", MODEL, device="cpu", batch_size=8))
    assert remote.pair_ids().tolist() == local.pair_ids().tolist()
    n = len(local)
    for x, y in zip(local.rows(np.arange(n)), remote.rows(np.arange(n)), strict=True):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)


def _in_cluster(pid: int, port: int) -> bool:
    """Whether process `pid` descends from this module's `ray start --port=<port>` (not another Ray)."""
    while pid > 1:
        try:
            if f"--port={port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
        except (OSError, ValueError, IndexError):
            return False
    return False


def _encoder_workers(port: int) -> dict[int, str]:
    """pid -> process title of the test cluster's encoder actors (Ray Data's MapWorker around _Encoder)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::MapWorker(MapBatches(_Encoder))") and _in_cluster(int(entry.name), port):
            found[int(entry.name)] = title
    return found


def test_killed_encoder_worker_loses_and_duplicates_nothing(cluster, featurized, tmp_path):
    """SIGKILL the encoder actor's worker process while it encodes a batch, after the first shard is written:
    Ray restarts the actor and retries its task, the same run completes, every row is there exactly once."""
    ws_local, ws_ray, _, _ = featurized
    n, size = 96, 4  # 24 shards of 4 rows, encoded in batches of 4: the encoder is busy for a while
    src = make_csv_pool(tmp_path, n=n)
    for ws in (ws_local, ws_ray):
        ingest(ws, "workerkill", str(src))
    port = int(cluster.rsplit(":", 1)[1])
    code = textwrap.dedent(f"""
        import ray.data
        from chips_core.engines.ray_featurize import featurize_ray
        from chips_core.workspace.store import Workspace
        # blocks of ~5 decoded rows: the rows reach the encoder in many tasks (as a large pool's do), so a
        # shard is written while the encoder still has batches to run
        ray.data.DataContext.get_current().target_max_block_size = 256 * 1024
        print(featurize_ray(Workspace({str(ws_ray.root)!r}), "workerkill", {MODEL!r}, address={cluster!r},
                            batch_size={size}, shard_size={size}))
    """)
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    runs_before = set((ws_ray.root / "features").iterdir())
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline, killed, written, after = time.monotonic() + 240, None, 0, set()
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the Ray run did not finish within 240 s"
            workers = _encoder_workers(port)
            if killed is not None:
                after |= set(workers) - {killed}
            else:
                new = [d for d in (ws_ray.root / "features").iterdir() if d not in runs_before]
                written = sum(len(list(d.glob("shard-*-ids.npy"))) for d in new)
                busy = [pid for pid, title in workers.items() if title.endswith(".submit")]
                if written and busy:  # a shard is written and the encoder is inside a batch: kill it there
                    os.kill(busy[0], signal.SIGKILL)
                    killed = busy[0]
            time.sleep(0.005)
        out, err = proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, f"no busy encoder worker seen after the first shard: {err.decode()[-2000:]}"
    assert 0 < written < n // size, f"killed after {written} of {n // size} shards: not mid-run"
    assert proc.returncode == 0, f"the run did not survive the worker kill: {err.decode()[-3000:]}"
    assert after, "no encoder worker process took over from the killed one"
    run_id = int(out.decode().split()[-1])
    local_id = featurize(ws_local, "workerkill", MODEL, device="cpu", batch_size=size, shard_size=size)
    sql = "SELECT shard_index, n_rows FROM feature_shards WHERE run_id = ? ORDER BY 1"
    shards = _q(ws_ray, sql, [run_id])
    assert [s for s, _ in shards] == list(range(n // size)) and sum(k for _, k in shards) == n
    assert _q(ws_ray, "SELECT status FROM feature_runs WHERE run_id = ?", [run_id]) == [("done",)]
    a, b = FeatureStore(ws_local, local_id), FeatureStore(ws_ray, run_id)
    ids = b.pair_ids()
    assert len(np.unique(ids)) == len(ids) == n and ids.tolist() == a.pair_ids().tolist()
    for x, y in zip(a.rows(np.arange(n)), b.rows(np.arange(n)), strict=True):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)
