"""Tests of the device data path (`clips_jax.data.device`) against the host pipeline (`clips_jax.data.pipeline`)."""

import contextlib
import copy
import importlib.util
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy import stats

from clips_jax.data import augment as aug
from clips_jax.data import device as dv
from clips_jax.data import pipeline as pl
from clips_jax.data.channels import make_channels, make_channels_jnp
from clips_jax.data.phantoms import write_phantoms
from clips_jax.data.prepare import prepare_dataset
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError

PATCH = (24, 16, 16)
HOT_SUV = 2.5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    paths = write_phantoms(root / "data", 5, seed=7, size=(48, 32, 32), spacing_mm=(4.0, 4.0, 4.0))
    (paths[4] / "SEG.nii.gz").unlink()  # one unlabeled study
    prepare_dataset(root / "data", root / "cache", spacing_mm=6.0, log=lambda m: None)
    s = CaseStore(root / "cache")
    for i in range(len(s) - 1):  # a fake stage-A map (linear in HU, 0 where the CT is padding) for 4 of 5 cases
        ct = np.asarray(s.case_arrays(i)["ct"], np.float32)
        np.save(s.case_dir(i) / "stage_a.npy", ((ct + 1024.0) / 4000.0).astype(np.float32))
    return s


@pytest.fixture(scope="module")
def dstore(store):
    return dv.device_store_from(store, hot_suv=HOT_SUV)


_render = jax.jit(dv.sample_batch, static_argnames=("batch_size", "patch_shape", "augment", "return_params"))
_draw = jax.jit(dv.draw_params, static_argnames=("batch_size", "patch_shape", "augment"))
_crop = jax.jit(dv.crop_patch_device, static_argnames=("patch_shape",))


def _host_arrays(store, dstore, pos):
    return store.case_arrays(int(np.asarray(dstore.store_index)[pos]), extra=("stage_a",) if dstore.num_extra else ())


# ---- the store ---------------------------------------------------------------------------------------------


def test_store_layout(store, dstore):
    n = len(store)
    assert dstore.num_cases == n and dstore.num_extra == 0
    assert dstore.max_shape == tuple(np.max([store.geometry(i).shape for i in range(n)], axis=0))
    assert dstore.images.dtype == jnp.float32 and dstore.seg.dtype == jnp.uint8
    np.testing.assert_array_equal(dstore.labeled, store.has_seg)
    np.testing.assert_array_equal(dstore.store_index, np.arange(n))
    for i in range(n):
        a = store.case_arrays(i)
        shp = a["ct"].shape
        np.testing.assert_array_equal(dstore.shape[i], shp)
        np.testing.assert_allclose(dstore.spacing[i], store.geometry(i).spacing_mm)
        np.testing.assert_array_equal(dstore.case_volume(i, 0), a["ct"])
        np.testing.assert_array_equal(dstore.case_volume(i, 1), a["suv"])
        np.testing.assert_array_equal(dstore.case_volume(i, -1), a["seg"])
        les = np.asarray(dstore.lesion_voxels[i, : int(dstore.lesion_count[i])])
        np.testing.assert_array_equal(np.sort(les), np.sort(np.ravel_multi_index(tuple(store.foreground(i).T), shp)))
        hot = np.asarray(dstore.hot_voxels[i, : int(dstore.hot_count[i])])
        exp = pl.hot_negative_voxels(a["suv"], a["seg"], HOT_SUV) if store.has_seg[i] else np.zeros(0)
        np.testing.assert_array_equal(hot, exp)
    # the fill border: everything outside a case is -1024 HU / SUV 0 / label 0
    img = np.asarray(dstore.images)
    inside = np.zeros(img.shape[:4], bool)
    for i in range(n):
        z, y, x = np.asarray(dstore.shape[i])
        inside[i, 1 : 1 + z, 1 : 1 + y, 1 : 1 + x] = True
    assert np.all(img[..., 0][~inside] == pl.PAD_HU) and np.all(img[..., 1][~inside] == 0.0)
    assert np.all(np.asarray(dstore.seg)[~inside] == 0)
    est = dv.device_store_bytes(store)
    assert 0.5 * dstore.nbytes <= est <= 2.0 * dstore.nbytes, (est, dstore.nbytes)


def test_store_options_and_errors(store):
    half = dv.device_store_from(store, [3, 1], dtype=jnp.bfloat16, extra_channels=("stage_a",))
    assert half.images.dtype == jnp.bfloat16 and half.images.shape[-1] == 3 and half.num_extra == 1
    np.testing.assert_array_equal(half.store_index, [3, 1])
    a = store.case_arrays(3, extra=("stage_a",))
    np.testing.assert_allclose(half.case_volume(0, 0).astype(np.float32), a["ct"], rtol=2**-8, atol=1e-3)
    np.testing.assert_allclose(half.case_volume(0, 2).astype(np.float32), a["stage_a"], rtol=2**-8)
    assert half.nbytes < dv.device_store_from(store, [3, 1], extra_channels=("stage_a",)).nbytes
    est = dv.device_store_bytes(store, [3, 1], dtype=jnp.bfloat16, extra_channels=("stage_a",))
    assert 0.5 * half.nbytes <= est <= 2.0 * half.nbytes
    with pytest.raises(ConfigError, match="stage_a"):  # the last case has no stage_a.npy
        dv.device_store_from(store, [0, len(store) - 1], extra_channels=("stage_a",))
    with pytest.raises(ConfigError):
        dv.device_store_from(store, [len(store)])
    with pytest.raises(ConfigError):
        dv.device_store_from(store, dtype=np.int16)
    ds = dv.device_store_from(store, [0, 1])
    with pytest.raises(ConfigError):
        dv.draw_params(jax.random.key(0), np.ones(3), ds, batch_size=2, patch_shape=PATCH)
    with pytest.raises(ConfigError):
        dv.draw_params(jax.random.key(0), np.zeros(2), ds, batch_size=2, patch_shape=PATCH)
    with pytest.raises(ConfigError):
        dv.draw_params(jax.random.key(0), np.ones(2), ds, batch_size=2, patch_shape=(8, 8))


# ---- exactness against the host crop -----------------------------------------------------------------------


@pytest.mark.parametrize("patch", [PATCH, (40, 24, 12)])  # the second is longer than the volume in z and y
def test_unaugmented_crops_equal_host_crops(store, dstore, patch):
    chans = jax.jit(make_channels_jnp)
    w = np.array([1.0, 2.0, 1.0, 1.0, 1.0])
    fg = {i: {tuple(v) for v in store.foreground(i)} for i in range(len(store))}
    for p_fg, p_hot in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        b, p = _render(
            jax.random.key(5),
            w,
            dstore,
            batch_size=12,
            patch_shape=patch,
            augment=False,
            p_foreground=jnp.float32(p_fg),
            p_hot_negative=jnp.float32(p_hot),
            return_params=True,
        )
        assert b["image"].shape == (12, *patch, 5) and b["image"].dtype == jnp.float32
        assert b["label"].shape == (12, *patch) and b["label"].dtype == jnp.int32
        np.testing.assert_array_equal(b["case_index"], p.case)
        np.testing.assert_array_equal(b["labeled"], store.has_seg[np.asarray(p.case)])
        for k in range(12):
            c = int(p.case[k])
            a = store.case_arrays(c)
            shape = a["ct"].shape
            start, mode, vox = np.asarray(p.start[k]), int(p.mode[k]), tuple(np.asarray(p.voxel[k]))
            ct, suv, seg = pl.crop_patch(a, start, patch)
            raw, lab = _crop(dstore, c, start, patch_shape=patch)
            np.testing.assert_array_equal(raw[..., 0], ct)
            np.testing.assert_array_equal(raw[..., 1], suv)
            np.testing.assert_array_equal(lab, seg)
            np.testing.assert_array_equal(b["label"][k], seg)
            np.testing.assert_array_equal(b["image"][k], chans(ct, suv))
            # XLA:CPU divides by multiplying with the reciprocal: the windows differ from NumPy by <= 1 ulp
            np.testing.assert_allclose(b["image"][k], make_channels(ct, suv), rtol=0, atol=1.2e-7)
            assert bool(b["lesion_centred"][k]) == (mode == 1)
            if mode == 0:
                for s, n, q in zip(start, shape, patch):
                    assert (0 <= s <= n - q) if n >= q else (-(q // 2) <= s <= n - q // 2)
            else:
                np.testing.assert_array_equal(start, pl._start_on_voxel(vox, shape, patch))
            if p_fg == 1.0:
                assert mode == (1 if fg[c] else 0)
                if mode == 1:
                    assert vox in fg[c] and seg.any()
            if p_hot == 1.0:
                has_hot = store.has_seg[c] and int(dstore.hot_count[c]) > 0
                assert mode == (2 if has_hot else 0)
                if mode == 2:
                    assert a["suv"][vox] >= HOT_SUV and a["seg"][vox] == 0
            if p_fg == 0.0 and p_hot == 0.0:
                assert mode == 0


def test_affine_and_flipped_crops_close_to_host(store):
    ds = dv.device_store_from(store, [0, 2, 3], extra_channels=("stage_a",))
    crop = _crop
    rng = np.random.default_rng(3)
    shape = np.asarray(ds.shape[0])
    labels_diff = 0
    for t in range(6):
        pos = t % 3
        a = _host_arrays(store, ds, pos)
        m = aug.affine_matrix(rng, store.geometry(int(ds.store_index[pos])).spacing_mm)
        start = rng.integers(-12, shape - 4)  # partly outside the volume too
        ct, suv, seg, sa = pl.crop_patch(a, start, PATCH, m, extra=("stage_a",))
        raw, lab = crop(ds, pos, start, patch_shape=PATCH, matrix=m)
        np.testing.assert_allclose(raw[..., 0], ct, atol=1e-2)  # HU; float32 coordinates on the device
        np.testing.assert_allclose(raw[..., 1], suv, atol=1e-4)
        np.testing.assert_allclose(raw[..., 2], sa, atol=1e-5)
        labels_diff += int((np.asarray(lab) != seg).sum())
        # flips: the flipped sampling grid == the flipped patch (affine and plain)
        flips = rng.random(3) < 0.5
        axes = tuple(int(i) for i in np.flatnonzero(flips))
        fr, fl = crop(ds, pos, start, patch_shape=PATCH, matrix=m, flips=flips)
        np.testing.assert_allclose(fr, np.flip(np.asarray(raw), axes), atol=1e-3)
        np.testing.assert_array_equal(fl, np.flip(np.asarray(lab), axes))
        pr, plab = crop(ds, pos, start, patch_shape=PATCH, flips=flips)
        hct, hsuv, hseg, hsa = pl.crop_patch(a, start, PATCH, extra=("stage_a",))
        np.testing.assert_array_equal(pr[..., 0], np.flip(hct, axes))
        np.testing.assert_array_equal(pr[..., 2], np.flip(hsa, axes))
        np.testing.assert_array_equal(plab, np.flip(hseg, axes))
    assert labels_diff <= 6 * np.prod(PATCH) * 1e-3  # nearest-neighbour ties at half voxels only


class _FixedRng:
    """Stands in for np.random.Generator in the augment functions: every uniform draw returns `value`."""

    def __init__(self, value):
        self.value = value

    def uniform(self, lo=0.0, hi=1.0, size=None):
        return self.value


def test_intensity_augmentations_match_host():
    rng = np.random.default_rng(1)
    x = ndi.gaussian_filter(rng.gamma(2.0, 1.5, (20, 14, 12)), 1.0).astype(np.float32)
    xj = jnp.asarray(x)
    blur, contrast, lowres = (
        jax.jit(f) for f in (dv.gaussian_blur_jnp, dv.contrast_jnp, dv.simulate_low_resolution_jnp)
    )
    gamma, suv_aug = jax.jit(dv.gamma_jnp, static_argnames="invert"), jax.jit(dv.augment_suv_jnp)
    for sigma in (0.5, 0.7, 0.9, 1.0):  # radius 2 and 3
        np.testing.assert_allclose(blur(xj, sigma), aug.gaussian_blur(x, _FixedRng(sigma)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(contrast(xj, 1.2), aug.contrast(x, _FixedRng(1.2)), rtol=1e-5, atol=1e-5)
    for inv in (False, True):
        np.testing.assert_allclose(
            gamma(xj, 1.3, invert=inv), aug.gamma(x, _FixedRng(1.3), invert=inv), rtol=1e-4, atol=1e-4
        )
    const = jnp.full(x.shape, 2.0)
    np.testing.assert_array_equal(gamma(const, 1.3), const)
    for z in (0.55, 0.63, 0.8, 1.0):
        got = np.asarray(lowres(xj, z))
        # nearest down-sampling as the host, then LINEAR up-sampling (the host: cubic)
        small_shape = tuple(max(1, int(round(n * z))) for n in x.shape)
        small = ndi.zoom(x, [a / b for a, b in zip(small_shape, x.shape)], order=0, grid_mode=True, mode="nearest")
        lin = ndi.zoom(small, [a / b for a, b in zip(x.shape, small.shape)], order=1, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(got, lin, rtol=1e-5, atol=1e-5)
        host = aug.simulate_low_resolution(x, _FixedRng(z))
        assert np.corrcoef(got.ravel(), host.ravel())[0, 1] > 0.97
    fire, params = jnp.zeros(6, bool), jnp.array([0.8, 1.1, 1.1, 0.7, 1.2, 1.2])
    np.testing.assert_array_equal(suv_aug(xj, fire, params), xj)
    np.testing.assert_allclose(suv_aug(xj, fire.at[1].set(True), params), x * np.float32(1.1), rtol=1e-6)
    assert float(suv_aug(xj, jnp.ones(6, bool), params).min()) >= 0.0
    # the constants are the augment functions' defaults
    defaults = [
        inspect.signature(f).parameters[k].default
        for f, k in (
            (aug.gaussian_blur, "sigma_range"),
            (aug.multiplicative_brightness, "range_"),
            (aug.contrast, "range_"),
            (aug.simulate_low_resolution, "zoom_range"),
            (aug.gamma, "gamma_range"),
            (aug.gamma, "gamma_range"),
        )
    ]
    assert [tuple(d) for d in defaults] == [tuple(r) for r in dv.INTENSITY_RANGES]
    am = inspect.signature(aug.affine_matrix).parameters
    assert am["max_angle"].default == dv.MAX_ANGLE and tuple(am["scale_range"].default) == dv.SCALE_RANGE
    for ang, s, sp in (((0.2, -0.1, 0.3), 1.05, (6.0, 4.0, 2.0)), ((0.0, 0.0, 0.0), 1.0, (6.0, 6.0, 6.0))):
        exp = np.diag(1.0 / np.asarray(sp)) @ aug.rotation_matrix(ang) @ np.diag(sp) / s
        np.testing.assert_allclose(dv.affine_matrix_jnp(jnp.asarray(ang), s, jnp.asarray(sp)), exp, atol=1e-6)


# ---- distributions against the host sampler ----------------------------------------------------------------


def _host_draws(store, weights, n, **kw):
    """Run pipeline.PatchSampler for n elements (tiny patches) and record its random draws via wrappers."""
    rec, cur = [], {}
    orig = {name: getattr(aug, name) for name in (*dv.INTENSITY_STEPS[:4], "gamma", "random_flips")}
    orig_crop, orig_on_voxel = pl.crop_patch, pl._start_on_voxel

    def wrap_step(name):
        def f(x, r, *a, **k):
            cur["steps"].add("gamma_inverted" if name == "gamma" and k.get("invert") else name)
            return orig[name](x, r, *a, **k)

        return f

    def flips(arrays, r, p=0.5, axes=(0, 1, 2)):
        r2 = copy.deepcopy(r)  # replay the draws on a copy: same decisions as the original
        cur["flips"] = [r2.random() < p for _ in axes]
        return orig["random_flips"](arrays, r, p, axes)

    def crop(arrays, start, patch_shape, matrix=None, extra=()):
        cur["start"], cur["matrix"] = np.asarray(start), matrix
        return orig_crop(arrays, start, patch_shape, matrix, extra)

    def on_voxel(v, shape, p):
        cur["voxel"] = tuple(int(t) for t in v)
        return orig_on_voxel(v, shape, p)

    sampler = pl.PatchSampler(
        store,
        weights,
        seed=1,
        stage=0,
        patch_shape=(6, 6, 6),
        batch_size=1,
        local_batch=1,
        process_index=0,
        hot_suv=HOT_SUV,
        **kw,
    )
    with contextlib.ExitStack() as st:
        mp = st.enter_context(pytest.MonkeyPatch.context())
        for name in (*dv.INTENSITY_STEPS[:4], "gamma"):
            mp.setattr(aug, name, wrap_step(name))
        mp.setattr(aug, "random_flips", flips)
        mp.setattr(pl, "crop_patch", crop)
        mp.setattr(pl, "_start_on_voxel", on_voxel)
        for j in range(n):
            cur.clear()
            cur["steps"] = set()
            out = sampler(j)
            mode = 1 if out["lesion_centred"] else (2 if "voxel" in cur else 0)
            rec.append(
                {
                    "case": int(out["case_index"]),
                    "mode": mode,
                    "start": cur["start"],
                    "matrix": cur["matrix"],
                    "flips": cur["flips"],
                    "steps": cur["steps"],
                }
            )
    return rec


def _prop_ok(k, n, p, z=4.5):
    return abs(k - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1e-9


def test_distributions_match_host(store, dstore):
    w = np.array([1.0, 2.0, 0.0, 3.0, 2.0])
    kw = dict(p_foreground=0.3, p_hot_negative=0.4, p_affine=0.5, p_intensity=0.3, p_flip=0.5)
    n_host, n_dev, patch = 1200, 20000, (6, 6, 6)
    host = _host_draws(store, w, n_host, augment=True, **kw)
    d = _draw(jax.random.key(11), w, dstore, batch_size=n_dev, patch_shape=patch, augment=True, **kw)
    d = jax.tree.map(np.asarray, d)
    h_case = np.array([r["case"] for r in host])
    p_case = w / w.sum()
    for cases, n in ((d.case, n_dev), (h_case, n_host)):
        counts = np.bincount(cases, minlength=len(w))
        assert counts[2] == 0
        assert stats.chisquare(counts[w > 0], n * p_case[w > 0]).pvalue > 1e-4, counts
    # crop centre modes: analytic fractions, both samplers
    has_les = np.array([int(dstore.lesion_count[i]) > 0 for i in range(len(w))])
    has_hot = np.array([bool(dstore.labeled[i]) and int(dstore.hot_count[i]) > 0 for i in range(len(w))])
    p_les = kw["p_foreground"] * p_case[has_les].sum()
    p_hot = (1 - kw["p_foreground"]) * kw["p_hot_negative"] * p_case[has_hot].sum()
    h_mode = np.array([r["mode"] for r in host])
    for modes, n in ((d.mode, n_dev), (h_mode, n_host)):
        assert _prop_ok((modes == 1).sum(), n, p_les) and _prop_ok((modes == 2).sum(), n, p_hot)
    # crop starts: same distribution per axis (two-sample KS), overall and for the uniform crops
    h_start = np.array([r["start"] for r in host])
    for sel_d, sel_h in ((slice(None), slice(None)), (d.mode == 0, h_mode == 0)):
        for a in range(3):
            assert stats.ks_2samp(d.start[sel_d, a], h_start[sel_h, a]).pvalue > 1e-3, a
    # augmentation decisions
    h_aff = np.array([r["matrix"] is not None for r in host])
    h_flips = np.array([r["flips"] for r in host])
    for aff, flips, n in ((d.affine, d.flips, n_dev), (h_aff, h_flips, n_host)):
        assert _prop_ok(aff.sum(), n, kw["p_affine"])
        assert all(_prop_ok(flips[:, a].sum(), n, kw["p_flip"]) for a in range(3))
    h_steps = np.array([[s in r["steps"] for s in dv.INTENSITY_STEPS] for r in host])
    for steps, n in ((d.intensity, n_dev), (h_steps, n_host)):
        assert all(_prop_ok(steps[:, k].sum(), n, kw["p_intensity"]) for k in range(6)), steps.sum(0)
    # affine matrices: same distribution of every entry and of the scale (det M = scale^-3)
    h_m = np.array([r["matrix"] for r in host if r["matrix"] is not None])
    d_m = d.matrix[d.affine]
    for i in range(3):
        for j in range(3):
            assert stats.ks_2samp(d_m[:, i, j], h_m[:, i, j]).pvalue > 1e-3, (i, j)
    assert stats.ks_2samp(np.linalg.det(d_m) ** (-1 / 3), np.linalg.det(h_m) ** (-1 / 3)).pvalue > 1e-3
    # parameter ranges: uniform on the documented intervals
    lo, hi = -dv.MAX_ANGLE, dv.MAX_ANGLE
    assert d.angles.min() >= lo and d.angles.max() <= hi
    assert stats.kstest(d.angles.ravel(), "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    assert stats.kstest(d.scale, "uniform", args=(0.9, 0.2)).pvalue > 1e-3
    for k, (a, b) in enumerate(dv.INTENSITY_RANGES):
        assert stats.kstest(d.intensity_param[:, k], "uniform", args=(a, b - a)).pvalue > 1e-3, k
    # without augmentation nothing is drawn on
    off = jax.tree.map(np.asarray, _draw(jax.random.key(1), w, dstore, batch_size=64, patch_shape=patch, augment=False))
    assert not off.affine.any() and not off.flips.any() and not off.intensity.any()
    np.testing.assert_array_equal(off.matrix, np.broadcast_to(np.eye(3), (64, 3, 3)))


# ---- compilation and multi-device invariance ---------------------------------------------------------------


def test_one_compilation_for_new_weights(store, dstore):
    kw = dict(batch_size=4, patch_shape=PATCH, p_foreground=0.4, p_hot_negative=0.3, p_intensity=0.5)
    a = _render(jax.random.key(0), jnp.ones(len(store)), dstore, **kw)
    compiled = _render._cache_size()
    b = _render(jax.random.key(0), jnp.array([0.0, 0.0, 0.0, 1.0, 0.0]), dstore, **kw)
    c = _render(jax.random.key(1), jnp.array([5.0, 1.0, 0.0, 0.0, 2.0]), dstore, **dict(kw, p_foreground=0.9))
    assert _render._cache_size() == compiled  # new weights and probabilities: no new compilation
    assert np.all(np.asarray(b["case_index"]) == 3) and a["image"].shape == (4, *PATCH, 5)
    assert set(np.asarray(c["case_index"]).tolist()) <= {0, 1, 4}
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0


def test_first_element_gives_device_count_invariant_batches(store, dstore):
    """Element b depends only on fold_in(key, first_element + b): two halves, or two devices each drawing its slice
    (shard_map over a replicated DeviceStore), give the single-device batch."""
    w = jnp.array([1.0, 2.0, 1.0, 1.0, 3.0])
    kw = dict(patch_shape=PATCH, p_foreground=0.4, p_hot_negative=0.3, p_intensity=0.5)
    key = jax.random.key(42)
    full = _render(key, w, dstore, batch_size=4, **kw)
    halves = [_render(key, w, dstore, batch_size=2, first_element=jnp.int32(o), **kw) for o in (0, 2)]

    def check(parts):
        for k in full:
            got = np.concatenate([np.asarray(h[k]) for h in parts]) if isinstance(parts, list) else np.asarray(parts[k])
            if k == "image":  # differently compiled programs may round the intensity augmentations differently
                np.testing.assert_allclose(got, full[k], rtol=0, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, full[k], err_msg=k)

    check(halves)
    other = _render(jax.random.key(43), w, dstore, batch_size=4, **kw)
    assert not np.array_equal(other["image"], full["image"])
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py forces 4 CPU devices)")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    ds = dv.device_store_from(store, hot_suv=HOT_SUV, device=NamedSharding(mesh, P()))

    def per_device(k, ww, d):
        return dv.sample_batch(k, ww, d, batch_size=2, first_element=jax.lax.axis_index("data") * 2, **kw)

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P("data")))
    check(sharded(key, w, ds))


# ---- extra channels ----------------------------------------------------------------------------------------


def test_extra_channel_follows_crop_not_intensity(store):
    ds = dv.device_store_from(store, [0, 1, 3], extra_channels=("stage_a",))
    w = np.ones(3)
    b, p = _render(
        jax.random.key(2),
        w,
        ds,
        batch_size=6,
        patch_shape=PATCH,
        augment=True,
        p_affine=0.0,
        p_flip=0.0,
        p_intensity=1.0,
        return_params=True,
    )
    assert b["image"].shape == (6, *PATCH, 6)
    for k in range(6):
        a = _host_arrays(store, ds, int(p.case[k]))
        ct, suv, seg, sa = pl.crop_patch(a, np.asarray(p.start[k]), PATCH, extra=("stage_a",))
        np.testing.assert_array_equal(b["image"][k, ..., 5], sa)  # not intensity-augmented
        np.testing.assert_array_equal(b["image"][k, ..., 0], make_channels_jnp(ct, suv)[..., 0])  # CT untouched
        np.testing.assert_array_equal(b["label"][k], seg)
        assert not np.allclose(b["image"][k, ..., 1], make_channels(ct, suv)[..., 1])  # SUV augmented


# ---- the benchmark's quick mode ----------------------------------------------------------------------------


def test_benchmark_small_mode(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_data_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = []
    out = mod.compare(small=True, cache_dir=tmp_path, log=lines.append)
    assert re.fullmatch(r"ratio device/host: \d+\.\d\d", lines[-1]), lines
    assert (
        out["host"] > 0 and out["device"] > 0 and float(lines[-1].split()[-1]) == pytest.approx(out["ratio"], abs=0.006)
    )
