"""Case table, composite difficulty, stratification, summaries and plots of clips_jax.curricula."""

import numpy as np
import pytest
from scipy.stats import rankdata

from clips_jax.curricula import (
    HARDER_WHEN,
    CaseTable,
    case_table_from_manifest,
    composite_difficulty,
    plot_curriculum,
    summarise_weights,
)
from clips_jax.curricula.core import finalise, ranks_from_scores, stratify
from clips_jax.errors import ConfigError, DataError


def _rows():
    return [
        {"id": "a", "tmtv_ml": 10.0, "n_lesions": 2, "suv_max": 8.0, "has_seg": True},
        {"id": "b", "tmtv_ml": 0.0, "n_lesions": 0, "suv_max": None, "has_seg": True},  # negative
        {"id": "c", "tmtv_ml": 50.0, "n_lesions": 1, "suv_max": 20.0, "has_seg": True},
        {"id": "d", "tmtv_ml": 5.0, "n_lesions": 4, "suv_max": 4.0, "has_seg": True, "centre": "X"},
        {"id": "e", "tmtv_ml": 5.0, "n_lesions": 3, "suv_max": "n/a", "centre": "Y"},
    ]


def test_case_table_from_manifest_orders_by_ids_and_marks_negatives():
    t = case_table_from_manifest(_rows(), ["c", "b", "a", "d", "e"], group_key="centre")
    assert t.n == 5
    np.testing.assert_array_equal(t.has_lesion, [True, False, True, True, True])
    np.testing.assert_array_equal(t.difficulty["tmtv_ml"], [50.0, 0.0, 10.0, 5.0, 5.0])
    assert np.isnan(t.difficulty["suv_max"][1]) and np.isnan(t.difficulty["suv_max"][4])  # None, non-numeric
    assert np.all(np.isnan(t.difficulty["tbr"]))  # missing column -> NaN
    assert "teacher_loss" not in t.difficulty
    np.testing.assert_array_equal(t.groups, [0, 0, 0, 1, 2])  # None, None, None, "X", "Y"
    assert np.isnan(t.difficulty["composite"][1])  # negatives: undefined composite
    assert np.all(np.isfinite(t.difficulty["composite"][[0, 2, 3, 4]]))


def test_case_table_errors_name_the_case():
    with pytest.raises(DataError, match="'zz'"):
        case_table_from_manifest(_rows(), ["a", "zz"])
    with pytest.raises(DataError, match="twice"):
        case_table_from_manifest(_rows(), ["a", "a"])


def test_composite_is_mean_oriented_rank_percentile():
    d = {"tmtv_ml": np.array([10.0, 50.0, 5.0, np.nan]), "n_lesions": np.array([2.0, 1.0, 4.0, 3.0])}
    got = composite_difficulty(d)
    # Hand: tmtv (smaller = harder): oriented -10, -50, -5 -> percentiles 0.5, 0, 1 ; case 3 NaN.
    # n_lesions (more = harder): 2, 1, 4, 3 -> ranks 1, 0, 3, 2 of 3 -> 1/3, 0, 1, 2/3.
    np.testing.assert_allclose(got, [(0.5 + 1 / 3) / 2, 0.0, 1.0, 2 / 3])
    # Ties get the average rank, like scipy.stats.rankdata.
    tie = composite_difficulty({"suv_max": np.array([3.0, 3.0, 1.0])})
    np.testing.assert_allclose(tie, (rankdata([-3.0, -3.0, -1.0]) - 1) / 2)
    with pytest.raises(ConfigError):
        composite_difficulty(d, keys=["bogus"])


def test_ranks_nan_last_ties_by_index_ineligible_sentinel():
    s = np.array([0.3, np.nan, 0.1, 0.3, 0.2])
    r = ranks_from_scores(s, np.array([True, True, True, True, False]))
    np.testing.assert_array_equal(r, [1, 3, 0, 2, 5])


@pytest.mark.parametrize("neg", [[False, True, False, True], [False] * 4, [True] * 4])
def test_stratify_mixes_negatives_at_fraction_q(neg):
    neg = np.array(neg)
    w_pos = np.where(neg, 0.0, np.array([1.0, 0.0, 3.0, 0.0]))
    w = np.asarray(stratify(w_pos, neg, 0.3))
    assert np.all(w >= 0) and np.isclose(w.sum(), 1.0)
    if neg.all():
        np.testing.assert_allclose(w, 0.25)
    elif not neg.any():
        np.testing.assert_allclose(w, w_pos / w_pos.sum())
    else:
        np.testing.assert_allclose(w, [0.7 * 0.25, 0.15, 0.7 * 0.75, 0.15], rtol=1e-6)


def test_finalise_never_returns_zero_or_nan():
    np.testing.assert_allclose(np.asarray(finalise(np.array([0.0, np.nan, -1.0]))), [1 / 3] * 3)
    np.testing.assert_allclose(np.asarray(finalise(np.array([2.0, np.inf, 2.0]))), [0.5, 0.0, 0.5])


def test_summarise_weights_deciles_and_effective_count():
    n = 20
    d = {k: np.full(n, np.nan) for k in HARDER_WHEN if k != "teacher_loss"}
    d["composite"] = np.r_[np.arange(18) / 17.0, np.nan, np.nan]
    table = CaseTable(d, np.r_[np.ones(18, bool), False, False])
    w = np.zeros(n)
    w[[0, 1, 17]] = [0.25, 0.25, 0.5]
    s = summarise_weights(w, table)
    # 18 defined cases -> decile = rank * 10 // 18: ranks 0, 1 -> decile 0; rank 17 -> decile 9.
    assert s["decile_mass"][0] == pytest.approx(0.5) and s["decile_mass"][9] == pytest.approx(0.5)
    assert sum(s["decile_mass"]) == pytest.approx(1.0)
    assert s["n_eff"] == pytest.approx(1 / (2 * 0.25**2 + 0.5**2)) and s["n_support"] == 3
    u = summarise_weights(np.ones(n), table)
    assert u["n_eff"] == pytest.approx(n) and u["undefined_mass"] == pytest.approx(0.1)
    assert u["negative_mass"] == pytest.approx(0.1)
    with pytest.raises(DataError):
        summarise_weights(np.ones(3), table)


def test_plot_curriculum_writes_png(tmp_path):
    rows = [
        {"step": s, "decile_mass": list(np.eye(10)[min(s // 10, 9)]), "n_eff": 5.0 + s, "sigma": 0.9**s}
        for s in range(0, 100, 10)
    ]
    out = tmp_path / "curriculum.png"
    plot_curriculum(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curriculum.png"]  # no temp file left
    with pytest.raises(DataError):
        plot_curriculum([], tmp_path / "empty.png")
