"""Metric definitions against closed forms and hand counts (spheres, boxes, hand-built lesions)."""

import itertools
import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from clips_jax.metrics import COLUMNS, METRIC_KEYS, case_metrics, dice, dmax_mm, surface_metrics
from clips_jax.metrics.lesions import lesion_metrics
from clips_jax.metrics.surface import surface_points, surfel_area_table

SP = (3.0, 2.0, 1.5)  # anisotropic (z, y, x) mm


def ball(shape, centre, radius_mm, sp):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((z - centre[0]) * sp[0]) ** 2 + ((y - centre[1]) * sp[1]) ** 2 + ((x - centre[2]) * sp[2]) ** 2
    ) <= radius_mm**2


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_columns_contract():
    assert COLUMNS[0] == "case" and len(COLUMNS) == 29 and len(set(COLUMNS)) == 29
    assert METRIC_KEYS == COLUMNS[1:]


def test_surfel_table_basic_values():
    t = surfel_area_table((1.0, 1.0, 1.0))
    assert t[0] == 0 and t[255] == 0
    for bit in range(8):  # one corner inside: triangle through three edge midpoints
        assert t[1 << bit] == pytest.approx(math.sqrt(3) / 8)
        assert t[255 - (1 << bit)] == pytest.approx(math.sqrt(3) / 8)
    sz, sy, sx = SP
    ta = surfel_area_table(SP)
    # 4 corners with offset z == 1 (bits 0..3): a flat square perpendicular to z of area sy*sx.
    assert ta[0b00001111] == pytest.approx(sy * sx)
    assert ta[0b00110011] == pytest.approx(sz * sx)  # offsets y == 1
    assert ta[0b01010101] == pytest.approx(sz * sy)  # offsets x == 1
    assert np.allclose(ta, ta[255 - np.arange(256)])  # complement symmetry


def test_box_surface_area_closed_form():
    n = (4, 5, 7)
    m = box((8, 9, 11), (2, 2, 2), (2 + n[0], 2 + n[1], 2 + n[2]))
    surf, areas = surface_points(m, SP)
    s0, s1, s2 = SP
    faces = 2 * (
        (n[1] - 1) * s1 * (n[2] - 1) * s2 + (n[0] - 1) * s0 * (n[2] - 1) * s2 + (n[0] - 1) * s0 * (n[1] - 1) * s1
    )
    edges = 4 * (
        (n[2] - 1) * s2 * math.hypot(s0 / 2, s1 / 2)
        + (n[1] - 1) * s1 * math.hypot(s0 / 2, s2 / 2)
        + (n[0] - 1) * s0 * math.hypot(s1 / 2, s2 / 2)
    )
    corners = 8 * 0.5 * math.sqrt((s1 * s2 / 4) ** 2 + (s0 * s2 / 4) ** 2 + (s0 * s1 / 4) ** 2)
    assert areas[surf].sum() == pytest.approx(faces + edges + corners)


def test_identical_masks():
    m = ball((20, 24, 24), (10, 12, 12), 12.0, SP)
    r = surface_metrics(m, m, SP, 5.0)
    assert r == {"hd_mm": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0, "bji": 1.0}
    assert dice(m, m) == 1.0


def test_concentric_spheres_anisotropic():
    shape, c = (40, 56, 72), (20, 28, 36)
    r_true, r_pred = 24.0, 15.0
    t, p = ball(shape, c, r_true, SP), ball(shape, c, r_pred, SP)
    r = case_metrics(p, t, SP, tolerance_mm=5.0)
    vox = max(SP)
    assert abs(r["hd_mm"] - (r_true - r_pred)) <= vox
    assert abs(r["hd95_mm"] - (r_true - r_pred)) <= vox
    assert abs(r["assd_mm"] - (r_true - r_pred)) <= vox
    assert r["nsd"] == pytest.approx(0.0, abs=0.05)  # 9 mm apart >> 5 mm tolerance
    v = lambda rad: 4 / 3 * math.pi * rad**3 / 1000.0  # noqa: E731
    assert r["tmtv_true_ml"] == pytest.approx(v(r_true), rel=0.03)
    assert r["tmtv_pred_ml"] == pytest.approx(v(r_pred), rel=0.05)
    assert r["dice"] == pytest.approx(2 * p.sum() / (p.sum() + t.sum()))  # p inside t
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(p.sum() / t.sum())
    assert r["dmax_mm"] == pytest.approx(2 * r_true, abs=vox)
    # within tolerance: NSD 1 and BJI between 0 and 1
    r2 = surface_metrics(ball(shape, c, 21.0, SP), t, SP, tolerance_mm=5.0)
    assert r2["nsd"] == 1.0 and 0 < r2["bji"] < 1


def test_shifted_box_exact():
    shape = (16, 16, 16)
    t = box(shape, (4, 4, 4), (10, 11, 12))
    for k in (1, 2, 3):
        p = np.roll(t, k, axis=0)
        r = case_metrics(p, t, SP, tolerance_mm=2.0)
        assert r["hd_mm"] == pytest.approx(k * SP[0])
        overlap = (6 - k) * 7 * 8
        assert r["dice"] == pytest.approx(2 * overlap / (2 * 6 * 7 * 8))
        vox_ml = np.prod(SP) / 1000
        assert r["tp_ml"] == pytest.approx(overlap * vox_ml)
        assert r["fp_ml"] == pytest.approx(k * 56 * vox_ml) and r["fn_ml"] == pytest.approx(k * 56 * vox_ml)
        assert 0 < r["nsd"] < 1  # some surface farther than 2 mm (shift >= 3 mm), some on top
    # shifting along x by one voxel (1.5 mm) stays within a 2 mm tolerance everywhere
    assert surface_metrics(np.roll(t, 1, axis=2), t, SP, 2.0)["nsd"] == 1.0


def test_nsd_against_independent_formula():
    rng = np.random.default_rng(0)
    t = ball((24, 24, 24), (12, 12, 12), 14.0, SP)
    p = t ^ (rng.random(t.shape) < 0.02)
    surf_p, a_p = surface_points(p, SP)
    surf_t, a_t = surface_points(t, SP)
    # brute force distances between surface corner points (no EDT)
    cp = np.argwhere(surf_p) * SP
    ct = np.argwhere(surf_t) * SP
    d_pt = np.sqrt(((cp[:, None, :] - ct[None, :, :]) ** 2).sum(-1)).min(1)
    d_tp = np.sqrt(((ct[:, None, :] - cp[None, :, :]) ** 2).sum(-1)).min(1)
    ap, at = a_p[surf_p], a_t[surf_t]
    tau = 3.0
    nsd = (ap[d_pt <= tau].sum() + at[d_tp <= tau].sum()) / (ap.sum() + at.sum())
    assd = ((ap * d_pt).sum() + (at * d_tp).sum()) / (ap.sum() + at.sum())
    r = surface_metrics(p, t, SP, tau)
    assert r["nsd"] == pytest.approx(nsd)
    assert r["assd_mm"] == pytest.approx(assd)
    assert r["hd_mm"] == pytest.approx(max(d_pt.max(), d_tp.max()))


@pytest.mark.parametrize("p_empty,t_empty", list(itertools.product([True, False], repeat=2)))
def test_empty_combinations(p_empty, t_empty):
    shape = (12, 12, 12)
    m = box(shape, (3, 3, 3), (7, 8, 9))
    suv = np.full(shape, 5.0, np.float32)
    p = np.zeros(shape, bool) if p_empty else m
    t = np.zeros(shape, bool) if t_empty else np.roll(m, 1, axis=1)
    r = case_metrics(p, t, SP, suv)
    assert set(r) == set(METRIC_KEYS)
    if p_empty and t_empty:
        for k in ("dice", "hd_mm", "hd95_mm", "assd_mm", "nsd", "bji", "precision", "recall", "suv_max", "dmax_mm"):
            assert math.isnan(r[k]), k
        for k in (
            "tmtv_pred_ml",
            "tmtv_true_ml",
            "fp_ml",
            "fn_ml",
            "tp_ml",
            "fpv_ml",
            "fnv_ml",
            "lesions_true",
            "lesions_pred",
            "a1_tp",
            "a1_fp",
            "a2_tp",
            "tmtv_pred_thr_ml",
        ):
            assert r[k] == 0.0, k
    elif p_empty or t_empty:
        assert r["dice"] == 0.0 and r["nsd"] == 0.0 and r["bji"] == 0.0
        assert all(math.isnan(r[k]) for k in ("hd_mm", "hd95_mm", "assd_mm"))
        vol = m.sum() * np.prod(SP) / 1000
        if t_empty:
            assert math.isnan(r["recall"]) and r["precision"] == 0.0 and math.isnan(r["suv_max"])
            assert r["fpv_ml"] == pytest.approx(vol) and r["fnv_ml"] == 0 and r["a1_fp"] == 1
            assert math.isnan(r["dmax_mm"])
        else:
            assert math.isnan(r["precision"]) and r["recall"] == 0.0 and r["suv_max"] == 5.0
            assert r["fnv_ml"] == pytest.approx(vol) and r["fpv_ml"] == 0 and r["a1_fn"] == 1
    else:
        assert all(np.isfinite(r[k]) for k in METRIC_KEYS)


def test_suv_threshold_columns():
    shape = (10, 10, 10)
    suv = np.zeros(shape, np.float32)
    suv[:, :, 5:] = 4.0  # exactly at threshold counts (>=)
    suv[:, :, :5] = 3.99
    t = box(shape, (2, 2, 2), (6, 6, 8))  # x 2..7: 3 cols below, 3 cols at threshold
    p = box(shape, (2, 2, 0), (6, 6, 10))  # x 0..9: 5 below, 5 at threshold
    r = case_metrics(p, t, SP, suv, suv_threshold=4.0)
    v = np.prod(SP) / 1000
    assert r["tmtv_true_thr_ml"] == pytest.approx(16 * 3 * v)
    assert r["tmtv_pred_thr_ml"] == pytest.approx(16 * 5 * v)
    assert r["fp_thr_ml"] == pytest.approx(16 * 2 * v)
    assert r["fp_ml"] == pytest.approx(16 * 4 * v)
    assert r["suv_max"] == 4.0
    r_none = case_metrics(p, t, SP)
    assert math.isnan(r_none["tmtv_true_thr_ml"]) and math.isnan(r_none["suv_max"])


def _lm(p, t, thr=0.5):
    r = lesion_metrics(p, t, (1.0, 1.0, 1.0), thr)
    return tuple(int(r[k]) for k in ("a1_tp", "a1_fn", "a1_fp", "a2_tp", "a2_fn", "a2_fp"))


def test_lesion_matching_split_merge_miss_fp():
    s = (10, 30, 30)
    # split: one true lesion (2x10x10 = 200 voxels), predicted as a 120-voxel and a 60-voxel piece
    t = box(s, (2, 2, 2), (4, 12, 12))
    p = box(s, (2, 2, 2), (4, 8, 12)) | box(s, (2, 9, 2), (4, 12, 12))
    # IoU(big piece) = 120/200 >= 0.5 -> matched; small piece IoU 60/200 -> FP in approach 2
    assert _lm(p, t) == (1, 0, 0, 1, 0, 1)
    # merge: two true lesions (each 2x4x4 = 32) covered by one prediction of 2x4x10 = 80 voxels
    t = box(s, (2, 2, 2), (4, 6, 6)) | box(s, (2, 2, 8), (4, 6, 12))
    p = box(s, (2, 2, 2), (4, 6, 12))
    assert _lm(p, t) == (2, 0, 0, 0, 2, 1)  # IoU 32/80 < 0.5 each
    assert _lm(p, t, 0.4) == (2, 0, 0, 1, 1, 0)  # at 0.4 exactly one of them is matched (one-to-one)
    # miss + false positive: lesion A found exactly, lesion B missed, one spurious prediction
    a, b = box(s, (1, 1, 1), (3, 4, 4)), box(s, (6, 20, 20), (8, 24, 24))
    fp = box(s, (6, 2, 20), (7, 4, 22))
    assert _lm(a | fp, a | b) == (1, 1, 1, 1, 1, 1)


def test_hungarian_beats_greedy():
    # A line of voxels along x. Greedy best-IoU matching in prediction order would give P1 -> T1 and leave
    # P2 unmatched (1 TP); the maximum one-to-one matching is P1 -> T2, P2 -> T1 (2 TP).
    def seg(lo, hi):
        return box((3, 3, 20), (1, 1, lo), (2, 2, hi))

    t1, t2 = seg(0, 10), seg(11, 13)  # 10 and 2 voxels
    p1, p2 = seg(4, 13), seg(0, 3)  # 9 and 3 voxels
    # IoU(P1, T1) = 6/13, IoU(P1, T2) = 2/9, IoU(P2, T1) = 3/10: all >= 0.2
    assert _lm(p1 | p2, t1 | t2, 0.2) == (2, 0, 0, 2, 0, 0)
    assert _lm(p1 | p2, t1 | t2, 0.25) == (2, 0, 0, 1, 1, 1)  # P1-T2 (0.22) no longer a candidate


def test_fpv_fnv_hand_built_18_connectivity():
    s = (8, 8, 8)
    t = np.zeros(s, bool)
    p = np.zeros(s, bool)
    t[1, 1, 1] = t[1, 2, 2] = True  # edge neighbours: one 18-connected lesion of 2 voxels
    t[5, 5, 5] = True  # isolated true lesion, missed -> FNV 1 voxel
    p[1, 1, 1] = True  # touches lesion 1 by one voxel -> no FNV for it
    p[3, 3, 3] = p[4, 4, 4] = True  # corner neighbours: two 6/18-separate FP components
    sp = (2.0, 1.0, 0.5)
    r = lesion_metrics(p, t, sp)
    v = np.prod(sp) / 1000
    assert r["lesions_true"] == 2 and r["lesions_pred"] == 3
    assert r["fnv_ml"] == pytest.approx(1 * v) and r["fpv_ml"] == pytest.approx(2 * v)
    assert (r["a1_tp"], r["a1_fn"], r["a1_fp"]) == (1, 1, 2)


def test_dmax_definitions():
    sp = (3.0, 2.0, 1.5)
    m = np.zeros((10, 10, 10), bool)
    assert math.isnan(dmax_mm(m, sp))
    m[2, 3, 4] = True
    assert dmax_mm(m, sp) == 0.0
    m[7, 1, 9] = True
    assert dmax_mm(m, sp) == pytest.approx(math.sqrt((5 * 3.0) ** 2 + (2 * 2.0) ** 2 + (5 * 1.5) ** 2))
    rng = np.random.default_rng(1)
    r = rng.random((20, 30, 30)) < 0.01
    assert dmax_mm(r, sp) == pytest.approx(pdist(np.argwhere(r) * sp).max())
    # flat, large slab (> 2000 candidate points): degenerate hull path
    flat = np.zeros((3, 80, 80), bool)
    flat[1] = rng.random((80, 80)) < 0.5
    assert dmax_mm(flat, sp) == pytest.approx(pdist(np.argwhere(flat) * sp).max())


def test_dice_matches_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.random((16, 16, 16)) < 0.3, rng.random((16, 16, 16)) < 0.4
    assert dice(a, b) == pytest.approx(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    assert math.isnan(dice(np.zeros(3), np.zeros(3)))
