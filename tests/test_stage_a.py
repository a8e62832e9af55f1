"""Tests of `clips_jax.cascade.compute_stage_a` and its command `clips_jax.stage_a`: stage-A probabilities stored
in the case store (refiner training data).

The independent reference is `clips_jax.cascade.cascade` run on the ORIGINAL study files (its
`cascade_channel` is the stage-A probability the refiner sees at inference), or a direct `tiled_inference` on
a 6 mm store. The stage-A model is a tiny random Ensemble saved with `save_weights`.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clips_jax.cascade import cascade, compute_stage_a
from clips_jax.data.channels import make_channels
from clips_jax.data.phantoms import write_phantoms
from clips_jax.data.prepare import prepare_dataset
from clips_jax.data.store import CaseStore
from clips_jax.data.study import load_study
from clips_jax.errors import ConfigError
from clips_jax.inference import nnx_predictor, tiled_inference
from clips_jax.model import Ensemble, load_model, save_weights
from clips_jax.stage_a import main

TILE, STEP = (16, 16, 16), (8, 8, 8)


def _zero_refiner(x):
    """A stand-in stage B (the test only looks at the cascade channel)."""
    return jnp.zeros(x.shape[:-1] + (2,), jnp.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_a")
    paths = write_phantoms(root / "data", 2, seed=5, size=(30, 22, 20), spacing_mm=(4.0, 3.5, 3.5))
    prepare_dataset(root / "data", root / "native", spacing_mm="native", log=lambda m: None)
    prepare_dataset(root / "data", root / "six", spacing_mm=6.0, log=lambda m: None)
    ens = Ensemble(4, unet_kwargs=dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3), rngs=nnx.Rngs(3))
    save_weights(root / "w", {"ensemble": ens})
    return {"root": root, "paths": paths, "weights": root / "w", "model": load_model(root / "w", "ensemble")}


def _run(store, model, **kw):
    args = dict(tile_shape=TILE, step=STEP, batch_size=2, log=lambda m: None)
    args.update(kw)
    return compute_stage_a(store, model, **args)


def test_native_store_matches_the_cascade_and_skips_on_rerun(world):
    store = CaseStore(world["root"] / "native")
    src = {"weights": "w", "model": "ensemble"}
    s = _run(store, world["model"], out_dtype=np.float32, source=src)
    assert sorted(s["computed"]) == sorted(store.ids) and not s["failed"] and not s["skipped"]
    for i in range(len(store)):
        p = np.load(store.case_dir(i) / "stage_a.npy")
        assert p.shape == store.geometry(i).shape and p.dtype == np.float32
        assert p.min() >= 0.0 and p.max() <= 1.0 and p.max() > 0.0
    # independent: the inference cascade on the original files of case 0
    case = load_study(world["paths"][0])
    i0 = store.index(world["paths"][0].name)
    pred, params = nnx_predictor(world["model"])
    ref = cascade(
        case.ct,
        case.suv,
        case.geometry,
        pred,
        _zero_refiner,
        ensemble_params=params,
        stage_a_tile=TILE,
        stage_a_step=STEP,
        stage_b_tile=TILE,
        stage_b_step=STEP,
        batch_size=2,
    )
    assert ref.stage_a_prob.shape != case.geometry.shape  # a real upsampling happened
    np.testing.assert_allclose(np.load(store.case_dir(i0) / "stage_a.npy"), ref.cascade_channel, atol=1e-6)
    # manifest records the producer, on disk and in memory
    again = CaseStore(store.cache_dir)
    rec = again.derived(i0, "stage_a")
    assert again.cases[i0]["derived"]["stage_a"] == rec and "stage_a" not in again.cases[i0]  # its namespace
    assert store.derived(i0, "stage_a") == rec  # the store passed in was refreshed
    assert rec["model"] == "ensemble" and rec["tile_shape"] == list(TILE) and rec["spacing_mm"] == [6.0] * 3
    assert again.manifest["grid"] == "native" and again.cases[i0]["tmtv_ml"] == store.cases[i0]["tmtv_ml"]
    # re-run: all skipped, files untouched; other weights: recomputed
    f = store.case_dir(0) / "stage_a.npy"
    mt = f.stat().st_mtime_ns
    s2 = _run(again, world["model"], out_dtype=np.float32, source=src)
    assert sorted(s2["skipped"]) == sorted(store.ids) and not s2["computed"]
    assert f.stat().st_mtime_ns == mt
    s3 = _run(again, world["model"], out_dtype=np.float32, source={**src, "weights": "other"}, cases=[store.ids[0]])
    assert s3["computed"] == [store.ids[0]] and s3["total"] == 1
    assert CaseStore(store.cache_dir).derived(0, "stage_a")["weights"] == "other"


def test_six_mm_store_no_upsampling_and_failures(world, tmp_path):
    import shutil

    shutil.copytree(world["root"] / "six", tmp_path / "six")
    store = CaseStore(tmp_path / "six")
    bad = store.ids[1]
    (store.case_dir(bad) / "suv.npy").write_bytes(b"garbage")
    lines = []
    s = _run(store, world["model"], out_dtype=np.float16, log=lines.append)
    assert s["computed"] == [store.ids[0]] and s["failed"] == [bad]
    assert sum("FAILED" in m and bad in m for m in lines) == 1
    assert not (store.case_dir(bad) / "stage_a.npy").exists()
    assert CaseStore(store.cache_dir).derived(1, "stage_a") is None
    got = np.load(store.case_dir(0) / "stage_a.npy")
    a = store.case_arrays(0)
    pred, params = nnx_predictor(world["model"])
    exp = tiled_inference(make_channels(a["ct"], a["suv"]), pred, params=params, tile_shape=TILE, step=STEP)[..., 1]
    assert got.dtype == np.float16 and got.shape == store.geometry(0).shape
    np.testing.assert_allclose(got.astype(np.float32), exp, atol=1e-3)  # float16 storage
    with pytest.raises(ConfigError):
        _run(store, world["model"], tile_shape=(16, 0, 16))


def test_cli(world, tmp_path, capsys):
    """The command line, in-process (`main` parses on private absl flags, like `python -m`)."""
    import shutil

    shutil.copytree(world["root"] / "six", tmp_path / "six")
    args = [
        "stage_a",
        "--store",
        str(tmp_path / "six"),
        "--weights",
        str(world["weights"]),
        "--tile",
        "16,16,16",
        "--step",
        "8,8,8",
        "--batch_size",
        "2",
    ]
    assert main(args + ["--out_dtype", "float32"]) == 0
    assert "2 computed" in capsys.readouterr().out
    store = CaseStore(tmp_path / "six")
    for i in range(2):
        assert np.load(store.case_dir(i) / "stage_a.npy").dtype == np.float32
        rec = store.derived(i, "stage_a")
        assert rec["model"] == "ensemble" and rec["weights"] == str(world["weights"].resolve().as_posix())
    assert json.loads((tmp_path / "six" / "manifest.json").read_text())["grid"] == "resampled"
    assert main(args) == 0 and "2 already done" in capsys.readouterr().out
    assert main(args + ["--model", "refiner"]) == 2 and "no model 'refiner'" in capsys.readouterr().err
    assert main(args + ["--tile", "16,16"]) == 2 and "--tile" in capsys.readouterr().err
    assert main(["stage_a", "--store", str(tmp_path / "six")]) == 2
