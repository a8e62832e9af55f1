"""Resampling (world-space, SimpleITK outside rule, 6 mm grid) and the 5 input channels.

Expected values come from closed forms: a world-linear ramp is reproduced exactly by trilinear interpolation
at any point inside the source volume, and is evaluated at the clamped source position in the half-voxel
border band; channel windows are re-derived here with explicit min/max arithmetic.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clips_jax.data.case import Case
from clips_jax.data.channels import CHANNELS, case_channels, make_channels, make_channels_jnp
from clips_jax.data.geometry import Geometry
from clips_jax.data.resample import resample_case, resample_to_grid
from clips_jax.errors import DataError


def ramp(world_xyz):
    """A world-linear function f(X, Y, Z) = 2X + 3Y - Z + 5 (mm -> value)."""
    return 2.0 * world_xyz[..., 0] + 3.0 * world_xyz[..., 1] - world_xyz[..., 2] + 5.0


def sample_ramp(geom: Geometry) -> np.ndarray:
    """f at every voxel centre of `geom`, as a (z, y, x) array."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij")
    idx = np.stack([x, y, z, np.ones_like(x)], axis=-1).astype(np.float64)
    return ramp((idx @ geom.affine_array.T)[..., :3])


def expected_resampled_ramp(src: Geometry, dst: Geometry, cval: float) -> np.ndarray:
    """Point by point: dst centre -> world -> src continuous index; outside [-0.5, n-0.5] -> cval,
    else f at the src index clamped to [0, n-1] (edge clamping of the border band)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in dst.shape], indexing="ij")
    idx = np.stack([x, y, z, np.ones_like(x)], axis=-1).astype(np.float64)
    world = idx @ dst.affine_array.T
    src_idx = world @ np.linalg.inv(src.affine_array).T  # (x, y, z, 1)
    n_xyz = np.array(src.shape[::-1], dtype=np.float64)
    inside = np.all((src_idx[..., :3] >= -0.5 - 1e-9) & (src_idx[..., :3] <= n_xyz - 0.5 + 1e-9), axis=-1)
    clamped = src_idx.copy()
    clamped[..., :3] = np.clip(src_idx[..., :3], 0, n_xyz - 1)
    vals = ramp((clamped @ src.affine_array.T)[..., :3])
    return np.where(inside, vals, cval)


def test_six_mm_grid_of_a_ramp_matches_closed_form():
    src = Geometry.from_spacing((20, 18, 16), (3.0, 2.0, 2.5), origin_xyz_mm=(-10.0, 4.0, 30.0))
    dst = src.resampled(6.0)
    assert dst.shape == (10, 6, 7)  # round(20*3/6), round(18*2/6), round(16*2.5/6)=round(6.67)
    out = resample_to_grid(sample_ramp(src), src, dst, order=1, cval=-1024.0)
    assert out.dtype == np.float32 and out.shape == dst.shape
    np.testing.assert_allclose(out, expected_resampled_ramp(src, dst, -1024.0), atol=1e-3)
    # Here every 6 mm centre lies inside the PET volume: no outside value at all.
    assert not np.any(out == -1024.0)


def test_outside_band_follows_simpleitk_rule():
    src = Geometry.from_spacing((6, 6, 6), (2.0, 2.0, 2.0))
    vol = sample_ramp(src)
    for shift_vox, outside in ((0.4, False), (0.6, True)):
        # dst voxel 0 sits `shift_vox` source voxels before source voxel 0 along x.
        dst = Geometry.from_spacing((6, 6, 6), (2.0, 2.0, 2.0), origin_xyz_mm=(-2.0 * shift_vox, 0.0, 0.0))
        out = resample_to_grid(vol, src, dst, cval=-7.0)
        if outside:
            np.testing.assert_array_equal(out[:, :, 0], -7.0)
        else:
            np.testing.assert_allclose(out[:, :, 0], vol[:, :, 0], atol=1e-4)  # clamped to the edge value
        np.testing.assert_allclose(out[:, :, 1:], expected_resampled_ramp(src, dst, -7.0)[:, :, 1:], atol=1e-4)


def test_oblique_source_grid_general_path():
    theta = np.deg2rad(30.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([2.0, 2.5, 3.0])
    a[:3, 3] = (5.0, -3.0, 1.0)
    src = Geometry((10, 14, 12), a)
    dst = Geometry.from_spacing((12, 16, 16), (2.5, 2.0, 2.0), origin_xyz_mm=(-10.0, -5.0, -2.0))
    out = resample_to_grid(sample_ramp(src), src, dst, order=1, cval=0.0)
    exp = expected_resampled_ramp(src, dst, 0.0)
    np.testing.assert_allclose(out, exp, atol=1e-3)
    assert 0 < np.sum(exp == 0.0) < exp.size  # both inside and outside voxels are exercised


def test_nearest_and_same_grid_and_shape_error():
    src = Geometry.from_spacing((4, 4, 4), (1.0, 1.0, 1.0))
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    dst = Geometry.from_spacing((4, 4, 4), (1.0, 1.0, 1.0), origin_xyz_mm=(1.0, 0.0, 0.0))  # shift by one x
    out = resample_to_grid(lab, src, dst, order=0, cval=0, dtype=np.uint8)
    want = np.zeros_like(lab)
    want[:, :, :3] = lab[:, :, 1:]
    np.testing.assert_array_equal(out, want)
    same = resample_to_grid(lab, src, src, dtype=np.float32)
    np.testing.assert_array_equal(same, lab.astype(np.float32))
    with pytest.raises(DataError, match="does not match"):
        resample_to_grid(lab[:3], src, dst)


def test_resample_case_exact_subsampling_and_binary_label():
    # PET spacing 2 mm on every axis, sizes divisible by 3: the 6 mm centres are PET voxels 0, 3, 6, ...
    geom = Geometry.from_spacing((18, 15, 12), (2.0, 2.0, 2.0), origin_xyz_mm=(7.0, -3.0, 11.0))
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, geom.shape).astype(np.float32)
    suv = rng.uniform(0, 20, geom.shape).astype(np.float32)
    seg = (rng.uniform(size=geom.shape) > 0.7).astype(np.uint8)
    case = Case("c1", ct, suv, seg, geom, {"k": 1})
    low = resample_case(case, 6.0)
    assert low.geometry.shape == (6, 5, 4) and low.geometry.origin_mm == geom.origin_mm
    np.testing.assert_allclose(low.geometry.spacing_mm, (6.0, 6.0, 6.0))
    np.testing.assert_allclose(low.ct, ct[::3, ::3, ::3], atol=1e-3)
    np.testing.assert_allclose(low.suv, suv[::3, ::3, ::3], atol=1e-5)
    assert low.seg.dtype == np.uint8
    np.testing.assert_array_equal(low.seg, seg[::3, ::3, ::3])
    assert low.case_id == "c1" and low.meta["k"] == 1


def test_resample_case_outside_values():
    # Up-sampling 5 mm -> 2 mm: z size round(3*5/2) = round(7.5) = 8, centres at PET z = 0, 0.4, ..., 2.8;
    # 2.8 > n - 0.5 = 2.5 is outside -> CT -1024, SUV 0; everything else is the constant inside value.
    geom = Geometry.from_spacing((3, 3, 3), (5.0, 5.0, 5.0))
    seg = np.ones(geom.shape, np.uint8)
    case = Case("c", np.full(geom.shape, 40.0), np.full(geom.shape, 3.0), seg, geom)
    up = resample_case(case, (2.0, 5.0, 5.0))
    assert up.geometry.shape == (8, 3, 3)
    np.testing.assert_allclose(up.ct[:7], 40.0)
    np.testing.assert_array_equal(up.ct[7], -1024.0)
    np.testing.assert_allclose(up.suv[:7], 3.0)
    np.testing.assert_array_equal(up.suv[7], 0.0)
    np.testing.assert_array_equal(up.seg[:7], 1)
    np.testing.assert_array_equal(up.seg[7], 0)
    # A grid reaching past the PET extent along x: planes 3 and 4 are outside.
    dst = Geometry.from_spacing((3, 3, 5), (5.0, 5.0, 5.0))
    out_ct = resample_to_grid(case.ct, geom, dst, cval=-1024.0)
    np.testing.assert_allclose(out_ct[:, :, :3], 40.0)
    np.testing.assert_array_equal(out_ct[:, :, 3:], -1024.0)


def window(v, lo, hi):
    """Independent re-statement: values below lo -> 0, above hi -> 1, linear in between."""
    v = np.asarray(v, np.float64)
    return np.where(v <= lo, 0.0, np.where(v >= hi, 1.0, (v - lo) / (hi - lo)))


def test_channel_formulas_and_clip_ends():
    hu = np.array([-3000, -1000, -999, -600, -200, -150, -100, 0, 75, 100, 300, 301, 2000], np.float32)
    sv = np.array([-1, 0, 1, 2, 3, 6, 10, 11, 15, 29.9, 30, 45, 0.5], np.float32)
    ch = make_channels(hu.reshape(1, 1, -1), sv.reshape(1, 1, -1))
    assert ch.shape == (1, 1, 13, 5) and ch.dtype == np.float32
    assert CHANNELS == ("ct", "suv", "ct_lung", "ct_soft", "suv_hot")
    exp = {
        "ct": window(hu, -150, 300),
        "suv": window(sv, 0, 30),
        "ct_lung": window(hu, -1000, -200),
        "ct_soft": window(hu, -100, 100),
        "suv_hot": window(sv, 2, 10),
    }
    for c, name in enumerate(CHANNELS):
        np.testing.assert_allclose(ch[0, 0, :, c], exp[name], atol=1e-6, err_msg=name)
    # A few hand values: HU 75 is the middle of the ct window, HU 0 the middle of ct_soft, SUV 6 of suv_hot.
    assert ch[0, 0, 8, 0] == pytest.approx(0.5) and ch[0, 0, 7, 3] == pytest.approx(0.5)
    assert ch[0, 0, 5, 4] == pytest.approx(0.5) and ch[0, 0, 3, 2] == pytest.approx(0.5)  # -600 HU lung mid


def test_jnp_twin_matches_numpy_under_jit_and_batch():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1200, 600, (2, 3, 4, 5)).astype(np.float32)
    suv = rng.uniform(-1, 40, (2, 3, 4, 5)).astype(np.float32)
    got = np.asarray(jax.jit(make_channels_jnp)(ct, suv))
    assert got.shape == (2, 3, 4, 5, 5)
    for b in range(2):
        np.testing.assert_allclose(got[b], make_channels(ct[b], suv[b]), atol=1e-6)


def test_case_channels_and_fp16():
    geom = Geometry.from_spacing((2, 3, 4), (1, 1, 1))
    case = Case("c", np.full(geom.shape, 75.0), np.full(geom.shape, 6.0), None, geom)
    ch = case_channels(case, dtype=np.float16)
    assert ch.dtype == np.float16 and ch.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(ch[..., 0], 0.5)
    np.testing.assert_allclose(ch[..., 4], 0.5)
