"""Tests of `clips_jax.evaluation`: the one evaluation loop of validation, test evaluation and teacher scoring.

Worlds: the tiny built-in phantom store of `clips_jax/configs/default.py:tiny` (6 cases of 48x22x22 voxels at 6 mm) and
the same phantoms at native resolution (96x64x64) with stage-A maps from a simple SUV-driven predictor, for
the refiner. Independent references: `tiled_inference` called directly (with `cover_end=True`), `argmax_mask`
and the metric functions.
"""

import math
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clips_jax import evaluation as E
from clips_jax import trainer
from clips_jax.data.geometry import Geometry
from clips_jax.data.phantoms import DEFAULT_SPACING_MM, SIZES
from clips_jax.data.pipeline import make_eval_cases
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError
from clips_jax.experiments import compare_curricula as cc
from clips_jax.experiments import teacher as T
from clips_jax.inference import argmax_mask, nnx_predictor, pad_to_multiple, tiled_inference
from clips_jax.metrics import case_metrics, dice
from clips_jax.metrics.lesions import fpv_fnv_ml, lesion_overlaps
from clips_jax.model import Refiner, UNet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from clips_jax.configs import default as default_config  # noqa: E402

UNET = dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3)
QUIET = dict(log=lambda m: None)


# Predictors `x (B, D, H, W, C) -> logits (B, D, H, W, 2)` (module-level functions: hashable, compiled once).
def _flat(x):
    """p = (0.5, 0.5) everywhere: zero-weight voxels are the only ones with p = (0, 0)."""
    return jnp.zeros(x.shape[:-1] + (2,), jnp.float32)


def _all_lesion(x):
    """Lesion everywhere (p1 = sigmoid(4) ~ 0.98)."""
    return jnp.stack([jnp.zeros(x.shape[:-1]), jnp.full(x.shape[:-1], 4.0)], axis=-1)


def _suv_logits(x):
    """A crude stage A: lesion logit = SUV - 2."""
    return jnp.stack([jnp.zeros(x.shape[:-1]), x[..., 1] - 2.0], axis=-1)


def _tiny_config(cache, **overrides):
    cfg = default_config.get_config("tiny")
    cfg.data.phantoms.cache = str(cache)
    cfg.num_devices = 1
    cfg.quiet = True
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


REFINER = {
    "model.kind": "refiner",
    "data.spacing_mm": 0.0,
    "model.refiner_features": 4,
    "model.refiner_blocks": 1,
    "steps": 2,
    "data.patch_shape": (16, 16, 16),
    "eval.tile_shape": (32, 64, 64),
    "eval.tile_step": (16, 64, 64),
    "eval.every_steps": 2,
    "eval.at_start": False,
    "checkpoint.every_steps": 2,
}
# Refiner eval tiles: 5 tiles per 96x64x64 native phantom (full-width y/x tiles whose zero-weight faces are the
# volume's own outer y/x planes: allowed, as in the original), to keep the CPU time of these tests small.


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms6")
    return trainer.ensure_store(_tiny_config(cache), lambda m: None)


@pytest.fixture(scope="module")
def native_store(tmp_path_factory):
    """Native-resolution phantoms with stage-A maps (the refiner's store)."""
    from clips_jax.cascade import compute_stage_a

    cache = tmp_path_factory.mktemp("native")
    st = trainer.ensure_store(_tiny_config(cache, **REFINER), lambda m: None)
    summary = compute_stage_a(st, _suv_logits, tile_shape=(16, 16, 16), step=(8, 8, 8), log=lambda m: None)
    assert not summary["failed"]
    return CaseStore(st.cache_dir)


@pytest.fixture(scope="module")
def unet():
    return UNet(5, 2, **UNET, rngs=nnx.Rngs(5))


def _direct_prob(model, image, tile, step, batch_size=1):
    """Both class probabilities (z, y, x, 2) by a direct `tiled_inference` call reaching the volume's end."""
    pred, params = nnx_predictor(model)
    return tiled_inference(
        image, pred, params=params, tile_shape=tile, step=step, batch_size=batch_size, cover_end=True
    )


# ---- coverage ---------------------------------------------------------------------------------------------


def test_default_eval_tiles_cover_the_default_phantoms():
    for variant, expect in (("", (163, 68, 68)), ("tiny", (48, 22, 22))):
        cfg = default_config.get_config(variant)
        native = Geometry.from_spacing(SIZES[cfg.data.phantoms.size], DEFAULT_SPACING_MM)
        shape = native.resampled(cfg.data.spacing_mm).shape
        assert shape == expect
        E.check_coverage(shape, cfg.eval.tile_shape, cfg.eval.tile_step, case="phantom")  # accepted
    # The original tiling (no tile flush with the end) left 9.75 % of the default phantom without weight.
    cfg = default_config.get_config()
    with pytest.raises(ConfigError) as err:
        E.check_coverage((163, 68, 68), cfg.eval.tile_shape, cfg.eval.tile_step, case="phantom_0007", cover_end=False)
    for part in (
        "case phantom_0007:",
        "tiles (32, 32, 32) every (24, 24, 24)",
        "(163, 68, 68) volume",
        "9.75 %",
        "z = 161, 162",
        "eval.tile_step",
    ):
        assert part in str(err.value)


# (shape, tile, step, blend, cover_end, expected to be refused)
TILINGS = [
    ((40, 20, 24), (16, 16, 16), (12, 12, 12), "central", True, False),
    ((40, 20, 24), (16, 16, 16), (12, 12, 12), "central", False, True),  # trailing voxels without a tile
    ((40, 20, 24), (16, 8, 8), (16, 8, 8), "central", True, True),  # step = tile: zero faces meet
    ((30, 30, 30), (16, 16, 16), (20, 20, 20), "central", True, True),  # step > tile: gaps
    ((33, 17, 20), (12, 8, 16), (5, 6, 7), "central", True, False),
    ((33, 17, 20), (12, 8, 16), (11, 7, 15), "central", True, True),  # step = tile - 1
    ((41, 19, 19), (20, 8, 8), (10, 8, 8), "central", True, False),  # y/x faces of this tile are not 0
    ((50, 50, 50), (16, 16, 16), (20, 20, 20), "gaussian", True, True),  # gaps whatever the weights
    ((30, 30, 30), (16, 16, 16), (16, 16, 16), "constant", True, False),
]


@pytest.mark.parametrize("shape,tile,step,blend,cover_end,refused", TILINGS)
def test_coverage_check_equals_the_zero_weight_voxels_of_tiled_inference(
    shape, tile, step, blend, cover_end, refused, monkeypatch
):
    probs = tiled_inference(
        np.zeros(shape + (1,), np.float32), _flat, tile_shape=tile, step=step, blend=blend, cover_end=cover_end
    )
    zero = probs.sum(-1) == 0
    # allowed: the outer planes of the padded volume (real voxels only on sides without padding)
    allowed = np.zeros(shape, bool)
    for a, (left, right) in enumerate(pad_to_multiple(shape, tile)):
        for side, pad in ((0, left), (-1, right)):
            if pad == 0:
                idx = [slice(None)] * 3
                idx[a] = side
                allowed[tuple(idx)] = True
    n_bad = int((zero & ~allowed).sum())
    assert (n_bad > 0) == refused
    E._coverage_gaps.cache_clear()
    assert E._coverage_gaps(shape, tile, step, blend, cover_end)[0] == n_bad  # per-axis path
    E._coverage_gaps.cache_clear()
    monkeypatch.setattr(E, "_separable_support", lambda w: None)
    assert E._coverage_gaps(shape, tile, step, blend, cover_end)[0] == n_bad  # volume fallback
    E._coverage_gaps.cache_clear()
    monkeypatch.undo()
    if refused:
        with pytest.raises(ConfigError, match=rf"case c1: tiles {re.escape(str(tile))}"):
            E.check_coverage(shape, tile, step, blend=blend, case="c1", cover_end=cover_end)
    else:
        E.check_coverage(shape, tile, step, blend=blend, case="c1", cover_end=cover_end)


def test_uncoverable_case_is_refused_or_recorded(store, unet):
    idx = store.split_indices("val")
    with pytest.raises(ConfigError, match=store.ids[int(idx[0])] + r": tiles \(16, 16, 16\) every \(20, 20, 20\)"):
        E.evaluate_cases(unet, store, idx, tile_shape=(16, 16, 16), step=(20, 20, 20))
    failed, lines = {}, []
    rows = E.evaluate_cases(
        unet, store, idx, tile_shape=(16, 16, 16), step=(20, 20, 20), failed=failed, log=lines.append
    )
    assert rows == [] and list(failed) == [store.ids[int(i)] for i in idx]
    # a user error is shown as its own one-line message (clips_jax.batch.error_line), naming the case
    assert all(m.startswith(f"case {cid}: tiles (16, 16, 16)") and "\n" not in m for cid, m in failed.items())
    assert any("FAILED, skipped" in line for line in lines)


# ---- what the evaluator counts ------------------------------------------------------------------------------


def test_false_positives_in_the_formerly_uncovered_tail_are_counted(store):
    """Lesion everywhere: the predicted volume is the whole volume minus the zero-weight faces (z = 0 and 47:
    z needs no padding for 16-voxel tiles), also in the last 8 z-planes that the original tiling left out."""
    tile, step = (16, 16, 16), (12, 12, 12)
    idx = np.arange(len(store))
    assert all(store.geometry(int(i)).shape == (48, 22, 22) for i in idx)
    rows = E.evaluate_cases((_all_lesion, None), store, idx, tile_shape=tile, step=step)
    vox = store.geometry(0).voxel_volume_ml
    expected = 46 * 22 * 22 * vox
    assert [r["case"] for r in rows] == list(store.ids)
    for r in rows:
        assert r["tmtv_pred_ml"] == pytest.approx(expected, rel=1e-9)
    free = [r for i, r in zip(idx, rows) if not store.has_lesion[int(i)]]
    assert free and all(r["fpv_ml"] == pytest.approx(expected, rel=1e-9) for r in free)
    # the original tiling (no tile flush with the end) covered z-planes 1..38 only
    image = next(make_eval_cases(store, idx[:1]))["image"]
    old = argmax_mask(tiled_inference(image, _all_lesion, tile_shape=tile, step=step, cover_end=False))
    assert int(old.sum()) == 38 * 22 * 22


def test_refiner_gets_its_stage_a_channel(native_store):
    refiner = Refiner(6, 2, features=4, n_blocks=1, rngs=nnx.Rngs(0))
    assert E.model_channels(refiner) == ("stage_a",)
    assert E.model_channels(UNet(5, 2, **UNET, rngs=nnx.Rngs(0))) == ()
    assert E.model_channels((_flat, None)) == ()
    with pytest.raises(ConfigError, match="NNX module"):
        E.model_channels("not a model")
    cfg = _tiny_config("unused", **REFINER)
    tile, step = tuple(cfg.eval.tile_shape), tuple(cfg.eval.tile_step)
    i = int(native_store.split_indices("test")[0])
    stage_a = np.load(native_store.case_dir(i) / "stage_a.npy").astype(np.float32)
    assert stage_a.max() > stage_a.min()  # a real, non-constant channel
    ((case, prob),) = list(E.predict_cases(refiner, native_store, [i], tile_shape=tile, step=step))
    assert case["image"].shape[-1] == 6
    np.testing.assert_array_equal(case["image"][..., 5], stage_a)
    direct = _direct_prob(refiner, case["image"], tile, step)[..., 1]
    assert prob.dtype == np.float32 and prob.shape == case["label"].shape
    np.testing.assert_array_equal(prob, direct)
    # the comparison's predict_cases now feeds it too (it failed with 5 vs 6 channels before)
    ((_, prob_cc),) = list(cc.predict_cases(refiner, native_store, [i], cfg))
    # the same model and cases; float32 rounding may differ between the two paths on some CPUs (1.8e-7 seen)
    np.testing.assert_allclose(prob_cc, prob, rtol=0, atol=1e-6)


# ---- the three users ----------------------------------------------------------------------------------------


def test_trainer_validation_equals_direct_calls(store, unet):
    cfg = _tiny_config("unused")
    tile, step = tuple(cfg.eval.tile_shape), tuple(cfg.eval.tile_step)
    idx = np.concatenate([store.split_indices("val"), store.split_indices("test")])
    got = trainer.evaluate_cases(unet, store, idx, cfg)
    expected = []
    for case in make_eval_cases(store, idx):
        pred = argmax_mask(_direct_prob(unet, case["image"], tile, step, int(cfg.eval.batch_size))).astype(bool)
        truth = case["label"] > 0
        vox = case["geometry"].voxel_volume_ml
        fpv, fnv = fpv_fnv_ml(lesion_overlaps(pred, truth), vox)
        expected.append(
            {
                "id": case["id"],
                "dice": dice(pred, truth) if truth.any() else float("nan"),
                "tmtv_pred_ml": float(pred.sum() * vox),
                "tmtv_true_ml": float(truth.sum() * vox),
                "fpv_ml": fpv,
                "fnv_ml": fnv,
                "tmtv_abs_err_ml": abs(float(pred.sum() - truth.sum()) * vox),
            }
        )
    assert [list(r) for r in got["cases"]] == [list(r) for r in expected]
    for g, e in zip(got["cases"], expected):
        assert g["id"] == e["id"]
        for k in list(e)[1:]:
            assert g[k] == pytest.approx(e[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    assert got["val_fpv_ml"] == pytest.approx(np.mean([e["fpv_ml"] for e in expected]))
    lesion = [e["dice"] for e in expected if not math.isnan(e["dice"])]
    assert got["val_dice"] == pytest.approx(np.mean(lesion)) if lesion else math.isnan(got["val_dice"])


def test_test_evaluation_equals_direct_calls_and_is_cached(store, unet, tmp_path, monkeypatch):
    cfg = _tiny_config("unused")
    tile, step = tuple(cfg.eval.tile_shape), tuple(cfg.eval.tile_step)
    monkeypatch.setattr(cc, "load_trained_model", lambda c, run_dir: unet)
    rows = cc.evaluate_test(cfg, tmp_path, store)
    test_idx = store.split_indices("test")
    assert [r["case"] for r in rows] == [store.ids[int(i)] for i in test_idx]
    for r, case in zip(rows, make_eval_cases(store, test_idx)):
        p = _direct_prob(unet, case["image"], tile, step, int(cfg.eval.batch_size))
        want = case_metrics(argmax_mask(p).astype(bool), case["label"] > 0, case["geometry"].spacing_mm, case["suv"])
        assert set(r) == {"case", *want}
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    assert (tmp_path / "test_metrics.csv").is_file()
    monkeypatch.setattr(cc, "load_trained_model", lambda c, run_dir: pytest.fail("not read from the cache"))
    again = cc.evaluate_test(cfg, tmp_path, store)
    assert [r["case"] for r in again] == [r["case"] for r in rows]
    assert again[0]["dice"] == pytest.approx(rows[0]["dice"], rel=1e-5, nan_ok=True)


def test_teacher_scores_equal_direct_calls(store, unet):
    tile, step = (32, 16, 16), (16, 8, 8)
    train = store.split_indices("train")
    scores = T.score_cases(store, unet, indices=train, tile_shape=tile, step=step, **QUIET)
    rows = E.evaluate_cases(unet, store, train, tile_shape=tile, step=step, row_fn=E.teacher_row)
    for case, r in zip(make_eval_cases(store, train), rows):
        cid = case["id"]
        t = case["label"] > 0
        if not t.any():
            assert math.isnan(scores[cid]) and math.isnan(r["teacher_loss"])
            continue
        p = _direct_prob(unet, case["image"], tile, step)[..., 1].astype(np.float64)
        expected = 1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum())
        assert scores[cid] == pytest.approx(expected, rel=1e-6)
        assert r["teacher_loss"] == pytest.approx(expected, rel=1e-6)
    # the old names still work and are the moved functions
    from clips_jax.metrics import case_losses

    assert cc.soft_dice_of_probs is case_losses.soft_dice_of_probs and T.case_loss is case_losses.case_loss
    assert T.combined_teacher_loss is case_losses.combined_case_loss


# ---- end to end ---------------------------------------------------------------------------------------------


def test_tiny_refiner_comparison_runs_end_to_end(native_store, tmp_path):
    cfg = _tiny_config(tmp_path / "unused", **REFINER)
    wd = tmp_path / "exp"
    out = cc.run_comparison(
        cfg, workdir=wd, curricula=["none"], seeds=1, data=str(native_store.cache_dir), log=lambda m: None
    )
    assert out["runs"] == {"none": {0: "trained"}}
    test_rows = (wd / "runs" / "none" / "seed0" / "test_metrics.csv").read_text().splitlines()
    assert len(test_rows) == 1 + len(native_store.split_indices("test"))
    assert (wd / "results.csv").is_file()
    assert "none" in (wd / "results.md").read_text()
