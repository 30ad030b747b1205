"""Retrieval and zero-shot metric code on hand-built matrices with known answers; eval-set loading."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from chips_core.training import evaluate as ev
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.unit


def test_recall_identity_is_perfect():
    sim = np.eye(4) + 0.1
    r = ev.recall_at_k(sim, np.eye(4, dtype=bool), (1, 5))
    assert r == {1: 1.0, 5: 1.0}


def test_recall_known_ranks():
    # query 0: truth (col 0) is beaten by cols 1 and 2 -> rank 2; query 1: truth best -> rank 0;
    # query 2: truth beaten by all three others -> rank 3
    sim = np.array(
        [
            [0.5, 0.9, 0.7, 0.1],
            [0.2, 0.8, 0.1, 0.3],
            [0.9, 0.8, 0.1, 0.7],
        ]
    )
    pos = np.zeros((3, 4), dtype=bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = True
    r = ev.recall_at_k(sim, pos, (1, 2, 3, 4))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 4: 1.0}


def test_recall_ties_favour_truth_and_best_positive_counts():
    sim = np.array([[0.5, 0.5, 0.2], [0.1, 0.3, 0.9]])
    pos = np.array([[True, False, False], [True, True, False]])
    # query 0 ties with a negative: rank 0; query 1: best positive 0.3 < 0.9 -> rank 1
    assert ev.recall_at_k(sim, pos, (1, 2)) == {1: 0.5, 2: 1.0}


def test_recall_rejects_query_without_positive():
    with pytest.raises(ValueError, match="positive"):
        ev.recall_at_k(np.eye(2), np.array([[True, False], [False, False]]), (1,))


def test_retrieval_metrics_duplicate_captions_are_one_text():
    # images 0 and 1 share a caption; image 2 has its own. Embeddings in 2-D.
    img = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = ev.retrieval_metrics(img, txt, ["a cat", "a cat", "a dog"], ks=(1,))
    assert m == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    # swap the dog image's embedding to the cat direction: it now retrieves the wrong text,
    # and the dog text's best positive (image 2) loses to images 0 and 1
    img[2] = [1.0, 0.0]
    m = ev.retrieval_metrics(img, txt, ["a cat", "a cat", "a dog"], ks=(1, 3))
    assert m["i2t_R@1"] == pytest.approx(2 / 3)
    assert m["t2i_R@1"] == pytest.approx(1 / 2)  # two unique texts, one hit
    assert m["i2t_R@3"] == 1.0 and m["t2i_R@3"] == 1.0


def test_zero_shot_metrics_known_answers():
    logits = np.array(
        [
            [3.0, 1.0, 0.0],  # pred 0, true 0
            [0.0, 2.0, 1.0],  # pred 1, true 1
            [0.0, 2.0, 1.0],  # pred 1, true 2 (wrong)
            [0.5, 0.1, 0.2],  # pred 0, true 0
        ]
    )
    m = ev.zero_shot_metrics(logits, np.array([0, 1, 2, 0]))
    assert m["zeroshot_top1"] == pytest.approx(0.75)
    assert m["zeroshot_balanced_top1"] == pytest.approx((1 + 1 + 0) / 3)
    assert "zeroshot_top5" not in m


def test_zero_shot_top5_with_many_classes():
    n_cls = 8
    logits = np.tile(np.arange(n_cls, dtype=float)[::-1], (2, 1))  # class 0 highest ... class 7 lowest
    m = ev.zero_shot_metrics(logits, np.array([4, 5]))  # class 4 has rank 4 (hit), class 5 rank 5 (miss)
    assert m["zeroshot_top1"] == 0.0 and m["zeroshot_top5"] == 0.5


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    base = [skimage.data.retina(), skimage.data.cell(), skimage.data.camera()]
    names = []
    for i in range(n):
        im = Image.fromarray(base[i % 3]).convert("RGB").resize((40, 40)).rotate(90 * (i // 3))
        names.append(f"img_{i}.png")
        im.save(folder / names[-1])
    return names


def test_load_eval_pairs_csv_relative_paths_and_labels(tmp_path):
    names = _write_images(tmp_path / "imgs", 3)
    csv = tmp_path / "eval.csv"
    body = "".join(f"imgs/{n},cap {n},L{i}\n" for i, n in enumerate(names))
    csv.write_text("filepath,title,label\n" + body)
    pairs = ev.load_eval_pairs(None, csv)
    assert pairs.refs[0] == str((tmp_path / "imgs" / names[0]).resolve())
    assert pairs.labels == ["L0", "L1", "L2"] and pairs.pool_id == ev.CSV_POOL_ID
    (tmp_path / "bad.csv").write_text("path,title\nx,y\n")
    with pytest.raises(ev.EvalError, match="bad.csv.*'filepath'"):
        ev.load_eval_pairs(None, tmp_path / "bad.csv")


def test_evaluate_stores_rows_and_matches_own_embeddings(tmp_path):
    names = _write_images(tmp_path / "imgs", 6)
    labels = ["retina", "cell", "camera"]
    csv = tmp_path / "eval.csv"
    rows = [f"imgs/{n},a {labels[i % 3]} picture number {i},{labels[i % 3]}\n" for i, n in enumerate(names)]
    csv.write_text("filepath,title,label\n" + "".join(rows))
    ws = Workspace.init(tmp_path / "ws")
    m = ev.evaluate(ws, "chips-tiny-vit", csv, templates=("a {label} picture.",))
    assert m["n_pairs"] == 6 and m["n_classes"] == 3
    # the same numbers from embeddings computed here with the same (seeded) model
    from chips_core.features.models import load_model

    loaded = load_model("chips-tiny-vit")
    img, txt = ev.embed_pairs(loaded, ev.load_eval_pairs(None, csv))
    expect = ev.retrieval_metrics(img, txt, [r.split(",")[1] for r in rows])
    for k, v in expect.items():
        assert m[k] == pytest.approx(v)
    with ws.connect(read_only=True) as con:
        sql = "SELECT metric, value FROM eval_results WHERE eval_pool_id = -1"
        stored = dict(con.execute(sql).fetchall())
    assert stored == pytest.approx(m)
    with pytest.raises(ev.EvalError, match="placeholder"):
        ev.evaluate(None, "chips-tiny-vit", csv, templates=("no label here",))


def _cells():
    import pandas as pd

    rows = []
    for seed, bump in ((0, 0.0), (1, 0.1)):
        rows += [
            {"method": "random", "ratio": 0.5, "seed": seed, "i2t_R@1": 0.2 + bump, "cpt_run_id": 1},
            {"method": "chips", "ratio": 0.5, "seed": seed, "i2t_R@1": 0.4 + bump, "cpt_run_id": 2},
            {"method": "chips", "ratio": 0.25, "seed": seed, "i2t_R@1": 0.3 + bump, "cpt_run_id": 3},
            {"method": "full", "ratio": 1.0, "seed": seed, "i2t_R@1": 0.5 + bump, "cpt_run_id": 4},
        ]
    rows.append({"method": "none", "ratio": 0.0, "seed": 0, "i2t_R@1": 0.1})
    return pd.DataFrame(rows)


def test_experiment_summary_and_markdown():
    from chips_core.training import experiment as ex

    s = ex.summarize(_cells()).set_index(["method", "ratio"])
    assert s.loc[("chips", 0.5), "i2t_R@1_mean"] == pytest.approx(0.45)
    assert s.loc[("chips", 0.5), "i2t_R@1_std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert s.loc[("none", 0.0), "n_seeds"] == 1 and "cpt_run_id_mean" not in s.columns
    md = ex.markdown_table(_cells(), "i2t_R@1", ["random", "chips"])
    assert "| method | r = 25% | r = 50% |" in md
    assert "| random | — | 0.2500 ± 0.0707 (n=2) |" in md
    assert "| chips | 0.3500 ± 0.0707 (n=2) | 0.4500 ± 0.0707 (n=2) |" in md
    assert "Full pool: 0.5500 ± 0.0707 (n=2)" in md and "No CPT (starting model): 0.1000 (n=1)" in md


def test_experiment_reports_written(tmp_path):
    from chips_core.training import experiment as ex

    ex.write_reports(_cells(), tmp_path, "i2t_R@1", ["random", "chips"])
    for name in ("cells.csv", "summary.csv", "summary.md", "plot.html", "plot.png", "plotly.min.js"):
        assert (tmp_path / name).is_file(), name
    html = (tmp_path / "plot.html").read_text()
    assert 'src="plotly.min.js"' in html and '"name":"chips"' in html
    png = np.asarray(Image.open(tmp_path / "plot.png").convert("RGB"))
    colours = {tuple(c) for c in png.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # one line colour per method
