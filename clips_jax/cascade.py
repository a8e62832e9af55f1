"""The two-stage TMTV-Net cascade on arrays, and the stage-A maps a refiner is trained with.

Where this fits: `clips_jax.inference` tiles arrays through a network and knows no cases or grids;
`clips_jax.data` reads, resamples and stores cases and knows no network. The cascade needs both, so it lives
here, above them (and below `clips_jax.predict`, the command that segments studies, and `clips_jax.stage_a`,
the command that stores stage-A maps).

The cascade (`cascade`, result `CascadeResult`): TMTV-Net's two-stage inference (Yousefirizi et al., EJNMMI
Research 2024; in the original repository `qurit-frizi/TMTV-Net`, `inference_fn` in `main/main.py`) for one
PET/CT study on the PET grid.
Stage A: CT/SUV resampled to `spacing_mm` (`clips_jax.data.resample.resample_case`: linear, outside -1024 HU /
0 SUV, grid anchored at PET voxel 0), the 5 input channels (`clips_jax.data.channels.make_channels`), tiled
inference of the ensemble (`clips_jax.inference.tiled_inference`, tile 128x96x96, step 64x48x48), lesion
probability kept. Stage B: the 5 channels at native resolution (rounded to float16 first, as the original),
+ the stage-A probability carried onto the PET grid by `clips_jax.inference.upsample_probability` as 6th
channel, tiled inference of the refiner (96^3, step 48^3), `argmax_mask`.

Stage-A maps (`stage_a_probability` for one case, `compute_stage_a` for a case store; the command is
`python -m clips_jax.stage_a`). The refiner sees the stage-A probability as its 6th input channel; inference
computes it on the fly (`cascade`), training the refiner needs it stored next to each case. Per case (the
same steps as `cascade`'s stage A):
1. the coarse grid is `native_geometry.resampled(spacing_mm)` (the grid the cascade uses at inference;
   anchored at PET voxel 0);
2. the stored CT / SUV are resampled onto it (`resample_to_grid`, linear, outside -1024 HU / 0 SUV; nothing
   to do when the store already is that grid, e.g. a 6 mm store), windowed into the 5 channels;
3. `tiled_inference` of the stage-A model (the "ensemble" of a converted weights directory, or a trained
   "unet"), lesion probability = softmax channel 1;
4. carried back onto the STORE grid with `upsample_probability` (the cascade's index-space mapping, valid
   because both grids share voxel 0 and direction; skipped when the store grid is the coarse grid; a store
   grid not anchored like that falls back to world-space `resample_to_grid`, linear, outside 0);
5. saved atomically as `cases/<id>/stage_a.npy` ((z, y, x), float16 or float32), and the case's manifest entry
   gets the derived record `derived.stage_a` (`CaseStore.derived(i, "stage_a")`) of the producing weights/model
   and the settings (spacing, tile, step, compute dtype), written through the store's one locked writer after
   every case (`CaseStore.set_derived`; other writers of the same store may run meanwhile).
Re-running skips a case whose file exists and whose record equals the current settings; a case made by
other weights or settings is recomputed (so one store never silently mixes two stage-A models, unless
`cases` restricts a run on purpose, see below). A failing case is reported on one line and skipped.

Training-time caveat (honest): how the original TMTV-Net produced the cascade channel for training its
refiner is not documented: neither the paper nor the original repository (whose `inference_fn` shows only
the inference-time cascade) says how the training-time cascade input was generated and resampled. Running the
released ensemble on cases it may have been trained on (autoPET) gives stage-A maps that are better than what
the refiner will see on new patients, so the refiner may learn to trust stage A too much. Ideally the maps of
training cases come from OUT-OF-FOLD models: train k stage-A models on k folds and run each on its held-out
fold only (`cases` plus a per-fold model; the manifest records, per case, which weights made its map).
Validation/test cases should use the stage-A model that will be deployed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from clips_jax import batch
from clips_jax.checks import zyx_triple
from clips_jax.data import store as st
from clips_jax.data.case import Case
from clips_jax.data.channels import make_channels
from clips_jax.data.geometry import Geometry
from clips_jax.data.resample import resample_case, resample_to_grid
from clips_jax.errors import ConfigError
from clips_jax.fileio import atomic_path, json_safe
from clips_jax.inference import Progress, argmax_mask, as_predictor, tiled_inference, upsample_probability

# ----------------------------------------------------------------------------------------------------------
# The two-stage cascade
# ----------------------------------------------------------------------------------------------------------


class CascadeResult(NamedTuple):
    """Outputs of `cascade`.

    mask: `(z, y, x)` uint8 final lesion mask on the native PET grid (argmax of `probs`).
    probs: `(z, y, x, 2)` float32 refiner probabilities on the native grid.
    stage_a_prob: `(d, h, w)` float32 stage-A lesion probability on the coarse grid.
    stage_a_geometry: the coarse grid (`geometry.resampled(spacing_mm)`).
    cascade_channel: `(z, y, x)` float32, `stage_a_prob` upsampled to the native grid (refiner's 6th input).
    """

    mask: np.ndarray
    probs: np.ndarray
    stage_a_prob: np.ndarray
    stage_a_geometry: Any
    cascade_channel: np.ndarray


def cascade(
    ct_hu: np.ndarray,
    suv: np.ndarray,
    geometry: Any,
    ensemble_fn: Callable,
    refiner_fn: Callable,
    *,
    spacing_mm: float = 6.0,
    ensemble_params: Any = None,
    refiner_params: Any = None,
    stage_a_tile: Sequence[int] = (128, 96, 96),
    stage_a_step: Sequence[int] = (64, 48, 48),
    stage_b_tile: Sequence[int] = (96, 96, 96),
    stage_b_step: Sequence[int] = (48, 48, 48),
    batch_size: int = 1,
    blend: str = "central",
    dtype: str = "float32",
    tta: bool = False,
    round_stage_b_fp16: bool = True,
    progress: Progress | None = None,
) -> CascadeResult:
    """TMTV-Net's two-stage inference for one PET/CT study on the PET grid (see the module docstring).

    Stage A: CT/SUV resampled to `spacing_mm` (`resample_case`: linear, outside -1024 HU / 0 SUV, grid
    anchored at PET voxel 0), 5 channels, tiled inference of the ensemble (tile 128x96x96, step 64x48x48),
    lesion probability kept. Stage B: 5 channels at native resolution (rounded to float16 first when
    `round_stage_b_fp16`, as the original), + the stage-A probability upsampled by `upsample_probability` as
    6th channel, tiled inference of the refiner (96^3, step 48^3), argmax.

    Args:
      ct_hu, suv: `(z, y, x)` CT in HU and SUVbw on the PET grid `geometry` (a `clips_jax.data.Geometry`).
      ensemble_fn, refiner_fn: predictors as in `tiled_inference` (5 -> 2 and 6 -> 2 channels, logits);
        `ensemble_params` / `refiner_params` are their optional weights (see `nnx_predictor`).
      spacing_mm: stage-A voxel size in mm.
      stage_*_tile, stage_*_step, batch_size, blend, dtype, tta: passed to `tiled_inference` for both stages.
      progress: optional `progress(stage, done, total)` with stage "A" or "B".
    Returns:
      `CascadeResult`.
    """
    case = Case("cascade", np.asarray(ct_hu, np.float32), np.asarray(suv, np.float32), None, geometry)
    coarse = resample_case(case, spacing_mm)
    common = dict(batch_size=batch_size, blend=blend, dtype=dtype, tta=tta)
    prog_a = None if progress is None else (lambda d, t: progress("A", d, t))
    prob6 = tiled_inference(
        make_channels(coarse.ct, coarse.suv),
        ensemble_fn,
        tile_shape=stage_a_tile,
        step=stage_a_step,
        params=ensemble_params,
        progress=prog_a,
        **common,
    )[..., 1]
    spacing_c = coarse.geometry.spacing_mm
    channel = upsample_probability(prob6, geometry.shape, geometry.spacing_mm, spacing_c)
    volume_b = np.empty(case.suv.shape + (6,), np.float32)  # filled in place: no float32 copy of the 5
    volume_b[..., :5] = make_channels(case.ct, case.suv, dtype=np.float16 if round_stage_b_fp16 else np.float32)
    volume_b[..., 5] = channel
    prog_b = None if progress is None else (lambda d, t: progress("B", d, t))
    probs = tiled_inference(
        volume_b,
        refiner_fn,
        tile_shape=stage_b_tile,
        step=stage_b_step,
        params=refiner_params,
        progress=prog_b,
        **common,
    )
    return CascadeResult(argmax_mask(probs), probs, np.ascontiguousarray(prob6), coarse.geometry, channel)


# ----------------------------------------------------------------------------------------------------------
# Stage-A maps of a case store (the refiner's training input)
# ----------------------------------------------------------------------------------------------------------

FILE_NAME = "stage_a.npy"
NAME = "stage_a"
"""Name of the extra case array (pipeline `extra_channels=("stage_a",)`) and of its manifest record."""


def shares_voxel0(fine: Geometry, coarse: Geometry, atol_mm: float = 1e-3) -> bool:
    """True if both grids put voxel (0, 0, 0) at the same point and have the same axis directions.

    Then coarse continuous index = fine index * s_fine / s_coarse per axis, the mapping `upsample_probability`
    assumes (true for any two `Geometry.resampled` grids of one native grid).
    """
    a, b = fine.affine_array, coarse.affine_array
    if not np.allclose(a[:3, 3], b[:3, 3], atol=atol_mm, rtol=0):
        return False
    da = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0, keepdims=True)
    db = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0, keepdims=True)
    return bool(np.allclose(da, db, atol=1e-6))


def stage_a_probability(
    ct_hu: np.ndarray,
    suv: np.ndarray,
    geometry: Geometry,
    coarse: Geometry,
    predictor: Callable,
    *,
    params: Any = None,
    tile_shape: Sequence[int] = (128, 96, 96),
    step: Sequence[int] = (64, 48, 48),
    batch_size: int = 1,
    dtype: str = "float32",
) -> np.ndarray:
    """The stage-A lesion probability of one case on the case's own grid ("Stage-A maps" steps 2-4, above).

    Args:
      ct_hu, suv: (z, y, x) CT in HU and SUVbw on `geometry` (any float dtype; float16 stores are fine).
      geometry: the grid of ct/suv (the store grid).
      coarse: the stage-A grid (normally `native_geometry.resampled(6.0)`).
      predictor, params: the stage-A model as for `tiled_inference` (5 channels -> 2 logits), e.g.
        `clips_jax.inference.nnx_predictor(ensemble)`.
      tile_shape, step, batch_size, dtype: passed to `tiled_inference` (central blending, as the original).
    Returns:
      (z, y, x) float32 probability in [0, 1] with `geometry.shape`; 0 where no tile weight reached a voxel
      (the zero-weight rule of `tiled_inference`) or outside the coarse volume.
    """
    same = geometry.same_grid(coarse)
    if same:
        ct6, suv6 = np.asarray(ct_hu, np.float32), np.asarray(suv, np.float32)
    else:
        ct6 = resample_to_grid(ct_hu, geometry, coarse, order=1, cval=-1024.0)
        suv6 = resample_to_grid(suv, geometry, coarse, order=1, cval=0.0)
    prob6 = tiled_inference(
        make_channels(ct6, suv6),
        predictor,
        params=params,
        tile_shape=tile_shape,
        step=step,
        batch_size=batch_size,
        dtype=dtype,
    )[..., 1]
    if same:
        return np.ascontiguousarray(prob6, dtype=np.float32)
    if shares_voxel0(geometry, coarse):
        return upsample_probability(prob6, geometry.shape, geometry.spacing_mm, coarse.spacing_mm)
    return resample_to_grid(prob6, coarse, geometry, order=1, cval=0.0)


def _select(store: st.CaseStore, cases) -> list[int]:
    if cases is None:
        return list(range(len(store)))
    if isinstance(cases, str):
        return [int(i) for i in store.split_indices(cases)]
    return [store.index(c if isinstance(c, str) else int(c)) for c in cases]


def compute_stage_a(
    store: st.CaseStore | str | Path,
    model,
    *,
    tile_shape: Sequence[int] = (128, 96, 96),
    step: Sequence[int] = (64, 48, 48),
    batch_size: int = 1,
    spacing_mm=6.0,
    dtype: str = "float32",
    out_dtype=None,
    source: Mapping[str, Any] | None = None,
    cases=None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Compute and store `stage_a.npy` for the cases of a store (the command `python -m clips_jax.stage_a`).

    Steps 1-5 of "Stage-A maps" in the module docstring; read the training-time caveat there too.

    Args:
      store: a CaseStore (its in-memory copy is refreshed after each write) or its folder.
      model: the stage-A network: an NNX module (Ensemble or UNet, `x (N, D, H, W, 5) -> logits (..., 2)`),
        a `(predictor, params)` pair or a predictor callable (see `tiled_inference`).
      tile_shape, step, batch_size: tiles (z, y, x) voxels of the coarse grid; each tile size divisible by 16
        for a U-Net. Defaults are the original's stage A (128x96x96, step 64x48x48).
      spacing_mm: stage-A grid spacing in mm (one number or (z, y, x)); 6 for TMTV-Net.
      dtype: compute dtype of the tiles ("float32" or "bfloat16").
      out_dtype: storage dtype of stage_a.npy (np.float16 or np.float32); default the store's ct/suv dtype.
      source: provenance recorded in the manifest record (e.g. `{"weights": DIR, "model": "ensemble"}`).
      cases: None (all), a split name, or a sequence of case ids / store indices.
      overwrite: recompute even cases whose file and record are current.
      log: one-line progress / failure sink.
    Returns:
      summary dict: `computed`, `skipped`, `failed` (lists of case ids), `errors` (id -> one-line message),
      `total` (cases selected), `record` (the manifest record written for computed cases).
    Raises:
      ConfigError for bad tiles/steps/dtypes or unknown cases (before any case is touched).
    """
    store = store if isinstance(store, st.CaseStore) else st.CaseStore(store)
    tile, stp = zyx_triple(tile_shape, "tile_shape"), zyx_triple(step, "step")
    sp, out_dt = _check_stage_a_settings(store, batch_size, spacing_mm, dtype, out_dtype)
    predictor, params = as_predictor(model)
    settings = {"spacing_mm": sp, "tile_shape": list(tile), "step": list(stp), "dtype": dtype}
    record = json.loads(json.dumps(json_safe({**dict(source or {}), **settings})))
    selected = [store.ids[i] for i in _select(store, cases)]  # by id: each write refreshes the store's cases
    tiles = dict(tile_shape=tile, step=stp, batch_size=int(batch_size), dtype=dtype)
    t0 = time.time()

    def one_case(cid: str):
        i = store.index(cid)
        path = store.case_dir(i) / FILE_NAME
        if not overwrite and path.is_file() and store.derived(i, NAME) == record:
            return batch.skipped()
        grid, coarse, prob = _stage_a_of_case(store, i, sp, predictor, params, tiles)
        with atomic_path(path) as tmp:
            np.save(tmp, np.ascontiguousarray(prob, dtype=out_dt))
        return batch.done(
            f"ok, {grid.shape} voxels (stage A on {coarse.shape}), max p {float(prob.max()):.3f}, "
            f"{int((prob > 0.5).sum())} voxels > 0.5 ({time.time() - t0:.0f} s)"
        )

    def write_record(cid: str, outcome) -> None:  # outside the per-case handling: a manifest write that fails
        if not outcome.skipped:  # stops the run instead of failing every case alike
            store.set_derived(NAME, {cid: record})

    outcomes = batch.for_each_case(selected, one_case, log=log, after_each=write_record)
    outcomes.log_summary(
        log,
        f"summary: {outcomes.total} cases, {len(outcomes.done)} computed, {len(outcomes.skipped)} already "
        f"done, {len(outcomes.failed)} failed; store {store.cache_dir}",
    )
    return {**outcomes.as_summary("computed"), "record": record}


def _check_stage_a_settings(store: st.CaseStore, batch_size, spacing_mm, dtype, out_dtype):
    """(spacing [z, y, x] mm as floats, storage np.dtype) of `compute_stage_a`'s settings; ConfigError naming
    the bad one (batch size < 1, non-positive spacing, unknown compute or storage dtype)."""
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    sp = [float(v) for v in np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,))]
    if not all(np.isfinite(v) and v > 0 for v in sp):
        raise ConfigError(f"spacing_mm={spacing_mm!r}: need positive mm")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype={dtype!r}: use float32 or bfloat16")
    out_dt = np.dtype(out_dtype if out_dtype is not None else store.manifest.get("dtype", "float32"))
    if out_dt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ConfigError(f"out_dtype {out_dt}: use float16 or float32")
    return sp, out_dt


def _stage_a_of_case(store: st.CaseStore, i: int, spacing_mm, predictor, params, tiles: Mapping):
    """(store grid, coarse grid, stage-A probability (z, y, x) float32 on the store grid) of store case `i`:
    steps 1-4 of "Stage-A maps" (module docstring); `tiles` = tile_shape, step, batch_size, dtype."""
    entry = store.cases[i]
    grid = store.geometry(i)
    native = Geometry.from_json(entry["native_geometry"]) if entry.get("native_geometry") else grid
    coarse = native.resampled(spacing_mm)
    a = store.case_arrays(i)
    prob = stage_a_probability(a["ct"], a["suv"], grid, coarse, predictor, params=params, **tiles)
    return grid, coarse, prob
