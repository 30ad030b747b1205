"""Issue 10 on the Scores page: what α changes (pairs entering and leaving the selection), the plain-words
notice when α is inert (tr Φ_pos ≪ tr Φ_neg), and the image–caption guard's count. Each number shown is
checked against one computed here from the library's rankings or the cache's stored columns (numpy)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from chips_core.scoring.cache import ScoringCache
from chips_core.scoring.params import RankParams
from chips_core.scoring.ranking import ALPHA_INERT_RATIO, rank
from chips_core.workspace import store
from tests.app.workspace_build import build_tiny_workspace

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture(scope="module")
def inert_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny workspace prepared with batches of all 48 pairs: the untrained model's matching probabilities
    P_ii ≈ 1/48, so tr Φ_pos / tr Φ_neg ≈ 0.02 (α inert); the shared tiny workspace's batches of 16 give
    ≈ 0.07."""
    return build_tiny_workspace(tmp_path_factory.mktemp("inert"), batch_size=48).root


def _scores_page() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    _ok(at)
    assert at.title[0].value == "Scores"
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _only_cache(ws_root: Path) -> ScoringCache:
    with store.Workspace(ws_root).connect(read_only=True) as con:
        row = con.execute("SELECT dir FROM scoring_caches WHERE status = 'done'").fetchone()
    return ScoringCache.load(row[0])


def _captions(at: AppTest, needle: str) -> list[str]:
    return [c.value for c in at.caption if needle in c.value]


def _selected_ids(cache: ScoringCache, **params: object) -> set[int]:
    """The pair ids the library selects with `params`; λ = lam_factor × the default λ at the same α, as the
    Scores page sets it."""
    factor = float(params.pop("lam_factor", 1.0))
    p = RankParams(**params)
    if factor != 1.0:
        p = p.replace(lam=rank(cache, p, stability=False).info["lam_base"] * factor)
    frame = rank(cache, p, stability=False).frame
    return set(frame.loc[frame["selected"], "pair_id"].astype(int))


def _curvature_ratio(cache: ScoringCache, k: int) -> float:
    """tr Φ_pos / tr Φ_neg at sketch prefix k, from the stored matrices."""
    return float(np.trace(cache.phi_pos[:k, :k]) / np.trace(cache.phi_neg[:k, :k]))


def test_scores_page_counts_the_pairs_alpha_swaps(tiny_workspace: Path) -> None:
    """'α swaps N of the M selected pairs' (α = 0 → 1) and 'Compared with α = 0.7: E enter, L leave' are the
    set differences of the library's selections at those α."""
    cache = _only_cache(tiny_workspace)
    at = _scores_page()
    # a setting where α moves several pairs (the untrained tiny model's defaults move one at most)
    setting = {"agreement": 0.0, "clipscore_weight": 0.0, "ratio": 0.5, "lam_factor": 0.01, "k": 16}
    at.slider(key="agreement").set_value(setting["agreement"]).run()
    at.slider(key="clipscore_weight").set_value(setting["clipscore_weight"]).run()
    at.slider(key="ratio").set_value(setting["ratio"]).run()
    at.select_slider(key="lam_factor").set_value(setting["lam_factor"]).run()
    at.select_slider(key="k").set_value(setting["k"]).run()
    _ok(at)
    default_alpha = RankParams().alpha
    sel = {a: _selected_ids(cache, alpha=a, **setting) for a in (0.0, default_alpha, 1.0)}
    swapped = len(sel[1.0] - sel[0.0])
    assert swapped == len(sel[0.0] - sel[1.0]) > 0
    assert not _captions(at, "Compared with α")  # α at its default: nothing to compare with
    [whole] = _captions(at, "α swaps")
    assert whole.endswith(f"α swaps {swapped} of the {len(sel[default_alpha])} selected pairs.")

    for alpha in (1.0, 0.0):
        at.slider(key="alpha").set_value(alpha).run()
        _ok(at)
        entering, leaving = len(sel[alpha] - sel[default_alpha]), len(sel[default_alpha] - sel[alpha])
        assert entering > 0 and entering != swapped  # the two captions compare different rankings
        [compared] = _captions(at, "Compared with α")
        assert compared == (
            f"Compared with α = {default_alpha:g}: {entering} pairs enter the selection and {leaving} "
            "leave it."
        )
        assert _captions(at, "α swaps") == [whole]  # α's whole range does not depend on the slider


def test_scores_page_says_how_many_pairs_the_guard_held_out(tiny_workspace: Path) -> None:
    """The guard's caption gives the number of pairs below median − mads·1.4826·MAD of the stored CLIPScore
    column and that threshold; it is absent when nothing is held out or the guard is off."""
    clipscore = _only_cache(tiny_workspace).column("clipscore").astype(np.float64)
    med = np.median(clipscore)
    sigma = 1.4826 * np.median(np.abs(clipscore - med))

    at = _scores_page()
    assert at.session_state["guard_on"] and at.session_state["guard_mads"] == 2.5
    assert not (clipscore < med - 2.5 * sigma).any()  # this pool has no outlier at the default threshold
    assert not _captions(at, "Guard:")
    for mads in (1.0, 1.5):
        at.slider(key="guard_mads").set_value(mads).run()
        _ok(at)
        threshold = med - mads * sigma
        n_held = int((clipscore < threshold).sum())
        assert 0 < n_held < len(clipscore)
        shown = f"Guard: {n_held} pairs held out (CLIPScore below {threshold:.3f})."
        assert _captions(at, "Guard:") == [shown]

    at.toggle(key="guard_on").set_value(False).run()
    _ok(at)
    assert not _captions(at, "Guard:")
    at.toggle(key="guard_on").set_value(True).run()
    assert len(_captions(at, "Guard:")) == 1


def _inert_notice(at: AppTest) -> list[str]:
    return [i.value for i in at.info if "α has little to work with" in i.value]


def test_scores_page_says_alpha_is_inert_only_when_it_is(
    tiny_workspace: Path, inert_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notice appears exactly when tr Φ_pos / tr Φ_neg at the page's k (from the stored matrices) is
    below ALPHA_INERT_RATIO, and states that ratio."""
    at = _scores_page()  # batches of 16: the ratio is above the threshold at every k offered
    for k in (8, 32, 64):
        at.select_slider(key="k").set_value(k).run()
        _ok(at)
        assert _curvature_ratio(_only_cache(tiny_workspace), k) > ALPHA_INERT_RATIO
        assert not _inert_notice(at)
        assert _captions(at, "α swaps")  # the α captions are there, only the notice is not

    inert = tmp_path / "inert"
    shutil.copytree(inert_template, inert)
    monkeypatch.setenv("CHIPS_WORKSPACE", str(inert))
    at = _scores_page()
    for k in (8, 32, 64):
        at.select_slider(key="k").set_value(k).run()
        _ok(at)
        ratio = _curvature_ratio(_only_cache(inert), k)
        assert ratio < ALPHA_INERT_RATIO
        [notice] = _inert_notice(at)
        shown = re.search(r"matching pairs is ([0-9.]+)% of that of the non-matching ones", notice)
        assert shown and shown.group(1) == f"{100 * ratio:.1f}"
