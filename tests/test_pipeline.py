"""Tests of the grain training pipeline and the NumPy augmentations."""

import math

import numpy as np
import pytest

from clips_jax.data import augment as aug
from clips_jax.data.channels import make_channels
from clips_jax.data.phantoms import write_phantoms
from clips_jax.data.pipeline import crop_patch, make_eval_cases, make_train_iterator, sample_case_indices, weights_cdf
from clips_jax.data.prepare import prepare_dataset
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError

PATCH = (24, 16, 16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    paths = write_phantoms(root / "data", 5, seed=7, size=(48, 32, 32), spacing_mm=(4.0, 4.0, 4.0))
    (paths[4] / "SEG.nii.gz").unlink()  # one unlabeled study
    prepare_dataset(root / "data", root / "cache", spacing_mm=6.0, log=lambda m: None)
    return CaseStore(root / "cache")


def _it(store, weights, **kw):
    args = dict(seed=3, stage=0, batch_size=2, patch_shape=PATCH, process_index=0, process_count=1)
    args.update(kw)
    return make_train_iterator(store, weights, **args)


def test_weighted_sampling_frequencies():
    w = np.array([1.0, 0.0, 2.0, 5.0, 0.0, 2.0])
    n = 20000
    idx = sample_case_indices(11, 2, w, n)
    counts = np.bincount(idx, minlength=len(w))
    p = w / w.sum()
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4.5 * sd + 1e-9), (counts, n * p)
    assert counts[1] == 0 and counts[4] == 0  # zero weight never sampled
    np.testing.assert_array_equal(idx[:50], sample_case_indices(11, 2, w, 50))  # pure function
    np.testing.assert_array_equal(idx[100:150], sample_case_indices(11, 2, w, 50, start=100))  # order-free
    assert not np.array_equal(idx[:200], sample_case_indices(11, 3, w, 200))  # another stage, another stream
    # trailing zero weight: the cdf ends at exactly 1 at the last positive weight
    cdf = weights_cdf([1.0, 3.0, 0.0])
    assert cdf[1] == 1.0 and cdf[2] == 1.0
    with pytest.raises(ConfigError):
        sample_case_indices(0, 0, [0.0, 0.0], 3)
    with pytest.raises(ConfigError):
        sample_case_indices(0, 0, [1.0, -1.0], 3)


def test_crop_patch_padding_and_rotation():
    rng = np.random.default_rng(0)
    vol = {
        "ct": rng.uniform(-900, 900, (10, 12, 14)).astype(np.float32),
        "suv": rng.uniform(0, 9, (10, 12, 14)).astype(np.float32),
        "seg": (rng.random((10, 12, 14)) > 0.7).astype(np.uint8),
    }
    ct, suv, seg = crop_patch(vol, (-3, 5, 8), (8, 8, 8))
    exp_ct = np.full((8, 8, 8), -1024.0, np.float32)
    exp_ct[3:8, 0:7, 0:6] = vol["ct"][0:5, 5:12, 8:14]
    np.testing.assert_array_equal(ct, exp_ct)
    assert suv[:3].max() == 0 and seg[:, 7:].max() == 0
    np.testing.assert_array_equal(suv[3:8, 0:7, 0:6], vol["suv"][0:5, 5:12, 8:14])
    # identity matrix == plain crop; a 90 degree rotation about x == np.rot90 in the (z, y) plane
    cube = {k: v[1:9, 2:10, 3:11] for k, v in vol.items()}
    for k, a in zip(("ct", "suv", "seg"), crop_patch(vol, (1, 2, 3), (8, 8, 8), np.eye(3))):
        np.testing.assert_allclose(a, cube[k], atol=1e-4)
    m = aug.rotation_matrix((math.pi / 2, 0.0, 0.0))
    got = crop_patch(vol, (1, 2, 3), (8, 8, 8), m)
    for k, a in zip(("ct", "suv", "seg"), got):
        exp = np.rot90(cube[k], k=1, axes=(1, 0))  # out[z, y] = in[-y, z] about the centre
        np.testing.assert_allclose(a, exp, atol=1e-3)


def test_batches_shapes_and_case_indices(store):
    w = np.array([1.0, 1.0, 0.0, 2.0, 1.0])
    it = _it(store, w, augment=False)
    batches = [next(it) for _ in range(4)]
    b = batches[0]
    assert b["image"].shape == (2, *PATCH, 5) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, *PATCH) and b["label"].dtype == np.int32
    assert b["case_index"].dtype == np.int32 and b["labeled"].dtype == bool
    got = np.concatenate([x["case_index"] for x in batches])
    np.testing.assert_array_equal(got, sample_case_indices(3, 0, w, 8))
    assert 2 not in got
    for x in batches:
        np.testing.assert_array_equal(x["labeled"], store.has_seg[x["case_index"]])
        assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
        assert set(np.unique(x["label"])) <= {0, 1}


def test_unaugmented_patch_is_a_crop_of_the_case(store):
    """Without augmentation each patch is exactly the channels of a sub-volume of its case (found by search)."""
    it = _it(store, np.ones(len(store)), augment=False, patch_shape=(8, 6, 6))
    b = next(it)
    for k in range(2):
        a = store.case_arrays(int(b["case_index"][k]))
        ch = make_channels(a["ct"], a["suv"])
        p = b["image"][k]
        Z, Y, X = ch.shape[:3]
        found = any(
            np.array_equal(ch[z : z + 8, y : y + 6, x : x + 6], p)
            and np.array_equal(a["seg"][z : z + 8, y : y + 6, x : x + 6], b["label"][k])
            for z in range(Z - 7)
            for y in range(Y - 5)
            for x in range(X - 5)
        )
        assert found


def test_foreground_oversampling(store):
    les = np.flatnonzero(store.has_lesion)
    assert len(les) >= 2
    it = _it(store, np.ones(len(les)), case_indices=les, p_foreground=1.0, augment=False, batch_size=4)
    for _ in range(3):
        b = next(it)
        assert set(b["case_index"].tolist()) <= set(les.tolist())
        assert all(b["label"][k].sum() > 0 for k in range(4))


def test_hot_negative_sampling(store):
    # threshold: the 99.95th percentile of non-lesion SUV, so hard negatives exist but are rare
    cases = [store.case_arrays(i) for i in range(len(store))]
    bg = np.concatenate([np.asarray(a["suv"], np.float32)[np.asarray(a["seg"]) == 0] for a in cases])
    hot = float(np.quantile(bg, 0.9995))
    thr = (min(hot, 30.0) - 0.0) / 30.0 - 1e-6  # the "suv" channel's window is [0, 30]
    suv_c = 1  # CHANNELS index of "suv"

    have = np.array(
        [
            i
            for i, a in enumerate(cases)  # (unlabeled cases are never centred on hard negatives)
            if store.has_seg[i] and ((np.asarray(a["suv"]) >= hot) & (np.asarray(a["seg"]) == 0)).any()
        ]
    )
    assert len(have) >= 1

    def hot_patches(p):
        it = _it(
            store,
            np.ones(len(have)),
            case_indices=have,
            p_hot_negative=p,
            hot_suv=hot,
            augment=False,
            batch_size=4,
            patch_shape=(8, 8, 8),
        )
        n = 0
        for _ in range(4):
            b = next(it)
            n += sum(bool(((b["image"][k, ..., suv_c] >= thr) & (b["label"][k] == 0)).any()) for k in range(4))
        return n

    assert hot_patches(1.0) == 16  # the chosen voxel is always inside its patch
    assert hot_patches(0.0) < 16  # uniform crops miss them (else the test says nothing)
    # no voxel that hot: falls back to the uniform crop
    a = next(_it(store, np.ones(len(store)), p_hot_negative=1.0, hot_suv=1e9, augment=False))
    assert a["image"].shape == (2, *PATCH, 5)
    with pytest.raises(ConfigError, match="p_hot_negative"):
        _it(store, np.ones(len(store)), p_hot_negative=1.5)


def test_hot_negative_off_leaves_the_stream_unchanged(store):
    # p_hot_negative = 0 draws no random number: same batches and state as a pipeline without the option
    w = np.array([1.0, 2.0, 3.0, 1.0, 1.0])
    a = _it(store, w, stage=2, p_foreground=0.5)
    b = _it(store, w, stage=2, p_foreground=0.5, p_hot_negative=0.0, hot_suv=0.5)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a.get_state() == b.get_state()
    c = _it(store, w, stage=2, p_foreground=0.5, p_hot_negative=0.5, hot_suv=0.5)
    assert c.get_state() != a.get_state()  # the sampling is part of the iterator's identity


def test_resume_gives_identical_batches(store):
    w = np.array([1.0, 2.0, 3.0, 1.0, 1.0])
    it = _it(store, w, stage=4, p_foreground=0.3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = _it(store, w, stage=4, p_foreground=0.3)
    it2.set_state(state)
    for e in expected:
        got = next(it2)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    with pytest.raises(ConfigError):
        _it(store, w * np.array([1, 1, 1, 1, 2]), stage=4).set_state(state)


def test_multihost_slices_assemble_the_global_batch(store):
    w = np.ones(len(store))
    full = next(_it(store, w, batch_size=4))
    parts = [next(_it(store, w, batch_size=4, process_index=p, process_count=2)) for p in range(2)]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), full[k])
    with pytest.raises(ConfigError):
        _it(store, w, batch_size=3, process_index=0, process_count=2)


def test_zero_and_two_workers_identical(store):
    w = np.array([1.0, 2.0, 1.0, 1.0, 1.0])
    a = _it(store, w, num_workers=0, patch_shape=(16, 12, 12))
    b = _it(store, w, num_workers=2, patch_shape=(16, 12, 12))
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_eval_cases(store):
    val = store.split_indices("val")
    items = list(make_eval_cases(store, "val"))
    assert [it["case_index"] for it in items] == val.tolist()
    for it in items:
        a = store.case_arrays(it["case_index"])
        assert it["image"].shape == (*store.geometry(it["case_index"]).shape, 5)
        np.testing.assert_array_equal(it["image"], make_channels(a["ct"], a["suv"]))
        np.testing.assert_array_equal(it["label"], a["seg"])
    assert list(make_eval_cases(store, [])) == []


# ---- augmentations ---------------------------------------------------------------------------------------


def test_augmentations():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.5, (12, 10, 8)).astype(np.float32)
    y = aug.multiplicative_brightness(x, np.random.default_rng(5))
    ratio = y / x
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-5) and 0.75 <= ratio.flat[0] <= 1.25
    c = aug.contrast(x, np.random.default_rng(5))
    assert c.min() >= x.min() - 1e-5 and c.max() <= x.max() + 1e-5
    for inv in (False, True):
        g = aug.gamma(x, np.random.default_rng(2), invert=inv)
        assert g.mean() == pytest.approx(x.mean(), rel=1e-4) and g.std() == pytest.approx(x.std(), rel=1e-4)
        assert not np.allclose(g, x)
    b = aug.gaussian_blur(x, np.random.default_rng(3))
    assert b.std() < x.std() and b.mean() == pytest.approx(x.mean(), rel=0.05)
    lr = aug.simulate_low_resolution(x, np.random.default_rng(4))
    assert lr.shape == x.shape and lr.dtype == np.float32
    np.testing.assert_array_equal(aug.augment_suv(x, np.random.default_rng(0), p=0.0), x)
    assert aug.augment_suv(x, np.random.default_rng(0), p=1.0).min() >= 0
    s = (x > 3).astype(np.uint8)
    fx, fs = aug.random_flips([x, s], np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(fx, x[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(fs, s[::-1, ::-1, ::-1])
    m = aug.affine_matrix(np.random.default_rng(0), (2.0, 2.0, 2.0))
    sv = np.linalg.svd(m, compute_uv=False)
    assert np.allclose(sv, sv[0]) and 1 / 1.1 <= sv[0] <= 1 / 0.9  # rotation x isotropic scale
    r = aug.rotation_matrix((0.2, -0.1, 0.3))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)


def test_affine_crop_matches_scipy_affine_transform():
    """The vectorised sampler equals scipy.ndimage.affine_transform (linear / nearest) on a padded volume."""
    import scipy.ndimage as ndi

    r = np.random.default_rng(0)
    vol = {
        "ct": r.uniform(-1000, 500, (30, 24, 20)).astype(np.float32),
        "suv": r.uniform(0, 5, (30, 24, 20)).astype(np.float32),
        "seg": (r.random((30, 24, 20)) > 0.5).astype(np.uint8),
    }
    m = aug.affine_matrix(np.random.default_rng(1), (6.0, 4.0, 4.0))
    start, shape, pad = np.array((5, -3, 2)), np.array((18, 16, 14)), 12
    got = crop_patch(vol, start, shape, m)
    half = (shape - 1) / 2
    offset = start + half + pad - m @ half
    for k, g, order, fill in zip(("ct", "suv", "seg"), got, (1, 1, 0), (-1024, 0, 0)):
        big = np.pad(vol[k], pad, constant_values=fill)
        exp = ndi.affine_transform(big, m, offset=offset, output_shape=tuple(shape), order=order)
        np.testing.assert_allclose(g, exp, atol=1e-3 if k == "ct" else 1e-5)


# ---- extra input channels (the refiner's stage-A probability) -------------------------------------------


def _ct_code(ct):
    """A fake stage-A map that is a LINEAR function of the raw CT and is 0 where the CT is padding (-1024)."""
    return ((np.asarray(ct, np.float32) + 1024.0) / 4000.0).astype(np.float32)


@pytest.fixture(scope="module")
def extra_store(store):
    """The shared store with stage_a.npy = _ct_code(ct) for every case except the last (ids sorted)."""
    for i in range(len(store) - 1):
        np.save(store.case_dir(i) / "stage_a.npy", _ct_code(store.case_arrays(i)["ct"]))
    return store


def test_extra_channel_is_the_crop_of_stage_a(extra_store):
    s = extra_store
    idx = np.arange(len(s) - 1)
    it = _it(
        s,
        np.ones(len(idx)),
        case_indices=idx,
        augment=False,
        patch_shape=(8, 6, 6),
        batch_size=4,
        extra_channels=("stage_a",),
    )
    b = next(it)
    assert b["image"].shape == (4, 8, 6, 6, 6) and b["image"].dtype == np.float32
    assert it.get_state()["extra_channels"] == ["stage_a"]
    for k in range(4):
        a = s.case_arrays(int(b["case_index"][k]))
        ch = make_channels(a["ct"], a["suv"])
        sa = np.load(s.case_dir(int(b["case_index"][k])) / "stage_a.npy")
        p = b["image"][k]
        Z, Y, X = sa.shape
        hits = [
            (z, y, x)
            for z in range(Z - 7)
            for y in range(Y - 5)
            for x in range(X - 5)
            if np.array_equal(ch[z : z + 8, y : y + 6, x : x + 6], p[..., :5])
            and np.array_equal(a["seg"][z : z + 8, y : y + 6, x : x + 6], b["label"][k])
        ]
        assert hits and any(np.array_equal(sa[z : z + 8, y : y + 6, x : x + 6], p[..., 5]) for z, y, x in hits)


def test_extra_channel_follows_augmentation_and_leaves_the_rest_unchanged(extra_store):
    s = extra_store
    idx = np.arange(len(s) - 1)
    w = np.array([1.0, 2.0, 1.0, 1.0])
    five = _it(s, w, case_indices=idx, p_foreground=0.5, batch_size=4)
    six = _it(s, w, case_indices=idx, p_foreground=0.5, batch_size=4, extra_channels=("stage_a",))
    n_checked = 0
    for _ in range(3):
        x, y = next(five), next(six)
        np.testing.assert_array_equal(y["image"][..., :5], x["image"])  # same draws, same 5 channels
        for key in ("label", "case_index", "labeled"):
            np.testing.assert_array_equal(y[key], x[key])
        # where the CT window is not clipped, HU = ch0 * 450 - 150 exactly; the 6th channel was resampled with
        # the same (affine, linear) weights and flips from a linear function of HU, so it must agree there
        c0 = y["image"][..., 0]
        inside = (c0 > 1e-3) & (c0 < 1 - 1e-3)
        np.testing.assert_allclose(y["image"][..., 5][inside], _ct_code(c0[inside] * 450.0 - 150.0), atol=2e-4)
        n_checked += int(inside.sum())
        assert 0.0 <= y["image"][..., 5].min() and y["image"][..., 5].max() <= 1.0
    assert n_checked > 500


def test_crop_patch_extra_is_linear_with_zero_outside():
    import scipy.ndimage as ndi

    r = np.random.default_rng(2)
    vol = {
        "ct": r.uniform(-1000, 500, (20, 18, 16)).astype(np.float32),
        "suv": r.uniform(0, 5, (20, 18, 16)).astype(np.float32),
        "seg": (r.random((20, 18, 16)) > 0.5).astype(np.uint8),
        "stage_a": r.random((20, 18, 16)).astype(np.float32),
    }
    m = aug.affine_matrix(np.random.default_rng(4), (6.0, 4.0, 4.0))
    start, shape, pad = np.array((-4, 3, 5)), np.array((14, 12, 12)), 12
    ct, suv, seg, sa = crop_patch(vol, start, shape, m, extra=("stage_a",))
    base = crop_patch(vol, start, shape, m)
    for got, ref in zip((ct, suv, seg), base):
        np.testing.assert_array_equal(got, ref)
    half = (shape - 1) / 2
    exp = ndi.affine_transform(
        np.pad(vol["stage_a"], pad), m, offset=start + half + pad - m @ half, output_shape=tuple(shape), order=1
    )
    np.testing.assert_allclose(sa, exp, atol=1e-5)
    plain = crop_patch(vol, start, shape, extra=("stage_a",))[3]
    assert plain[:4].max() == 0.0 and plain[:, :, 11].max() == 0.0  # outside the volume
    np.testing.assert_array_equal(plain[4:, :, :11], vol["stage_a"][0:10, 3:15, 5:16])


def test_missing_stage_a_is_a_config_error(extra_store):
    s = extra_store
    last = s.ids[-1]
    for make in (
        lambda: _it(s, np.ones(len(s)), extra_channels=("stage_a",)),
        lambda: list(make_eval_cases(s, [0, len(s) - 1], extra_channels=("stage_a",))),
    ):
        with pytest.raises(ConfigError, match="clips_jax.stage_a") as e:
            make()
        assert last in str(e.value)
    # a zero weight on the case without the file is fine (it is never drawn)
    next(_it(s, np.r_[np.ones(len(s) - 1), 0.0], extra_channels=("stage_a",), augment=False))
    with pytest.raises(ConfigError):
        _it(s, np.ones(len(s) - 1), case_indices=np.arange(len(s) - 1), extra_channels=("ct",))


def test_eval_cases_with_extra(extra_store):
    s = extra_store
    items = list(make_eval_cases(s, [0, 1], extra_channels=("stage_a",)))
    for it in items:
        a = s.case_arrays(it["case_index"], extra=("stage_a",))
        assert it["image"].shape == (*s.geometry(it["case_index"]).shape, 6)
        np.testing.assert_array_equal(it["image"][..., :5], make_channels(a["ct"], a["suv"]))
        np.testing.assert_array_equal(it["image"][..., 5], a["stage_a"])
        np.testing.assert_array_equal(it["stage_a"], a["stage_a"])
