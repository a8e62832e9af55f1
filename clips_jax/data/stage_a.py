r"""Stage-A lesion probabilities for every case of a store: the refiner's 6th input channel, for training.

    python -m clips_jax.data.stage_a --store CACHE --weights DIR [--model ensemble|unet] \
        [--tile 128,96,96] [--step 64,48,48] [--batch-size 1] [--spacing 6] [--dtype float32|bfloat16] \
        [--out-dtype store|float32|float16] [--split train] [--cases ID,ID] [--overwrite]

TMTV-Net's refiner (stage B) sees the 5 image channels at native PET resolution plus the stage-A lesion
probability: the 6 mm ensemble output, linearly upsampled onto the PET grid (reference tmtv-net.md §1.5).
Inference computes it on the fly (`clips_jax.inference.cascade`); training the refiner needs it stored next
to each case, which is what this module does. Typical use:

    python -m clips_jax.data.prepare --input DATA --output CACHE_NATIVE --spacing native
    python -m clips_jax.data.stage_a --store CACHE_NATIVE --weights weights/tmtv-net
    # then train with config.model.kind = "refiner" on CACHE_NATIVE (pipeline extra_channels=("stage_a",))

Per case (`stage_a_probability`, the same steps as `cascade`'s stage A):
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
   gets `"stage_a": {...}` recording the producing weights/model and the settings (spacing, tile, step,
   compute dtype). The manifest is rewritten atomically after every case.
Re-running skips a case whose file exists and whose record equals the current settings; a case made by
other weights or settings is recomputed (so one store never silently mixes two stage-A models, unless
`--cases`/`--split` restrict a run on purpose, see below). A failing case is reported on one line and skipped;
the command exits with status 1 if any failed. Do not run `prepare` on the same store at the same time
(both rewrite the manifest; re-preparing a case deletes its stage_a.npy, as it should).

Training-time caveat (honest): how the original TMTV-Net produced the cascade channel for training its
refiner is unknown (reference §6 item 1 and §7.4: training code deleted, generation and resampling of the
training-time cascade input undocumented). Running the released ensemble on cases it may have been trained on
(autoPET) gives stage-A maps that are better than what the refiner will see on new patients, so the refiner
may learn to trust stage A too much. Ideally the maps of training cases come from OUT-OF-FOLD models: train k
stage-A models on k folds and run each on its held-out fold only (`--cases` / `--split` plus a per-fold
`--weights`; the manifest records, per case, which weights made its map). Validation/test cases should use
the stage-A model that will be deployed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clips_jax.data import store as st
from clips_jax.data.channels import make_channels
from clips_jax.data.geometry import Geometry
from clips_jax.data.resample import resample_to_grid
from clips_jax.errors import ConfigError
from clips_jax.fileio import atomic_path
from clips_jax.inference import tiled_inference, upsample_probability

FILE_NAME = "stage_a.npy"
NAME = "stage_a"
"""Name of the extra case array (pipeline `extra_channels=("stage_a",)`) and of its manifest record."""


def _triple(value, name: str) -> tuple[int, int, int]:
    t = tuple(int(v) for v in np.broadcast_to(np.asarray(value), (3,)))
    if min(t) < 1:
        raise ConfigError(f"{name}={value!r}: need three positive integers (z, y, x)")
    return t


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


def stage_a_probability(ct_hu: np.ndarray, suv: np.ndarray, geometry: Geometry, coarse: Geometry,
                        predictor: Callable, *, params: Any = None, tile_shape: Sequence[int] = (128, 96, 96),
                        step: Sequence[int] = (64, 48, 48), batch_size: int = 1,
                        dtype: str = "float32") -> np.ndarray:
    """The stage-A lesion probability of one case, on the case's own grid (steps 2-4 of the module docstring).

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
    prob6 = tiled_inference(make_channels(ct6, suv6), predictor, params=params, tile_shape=tile_shape, step=step,
                            batch_size=batch_size, dtype=dtype)[..., 1]
    if same:
        return np.ascontiguousarray(prob6, dtype=np.float32)
    if shares_voxel0(geometry, coarse):
        return upsample_probability(prob6, geometry.shape, geometry.spacing_mm, coarse.spacing_mm)
    return resample_to_grid(prob6, coarse, geometry, order=1, cval=0.0)


def _as_predictor(model) -> tuple[Callable, Any]:
    """(predictor, params) from an NNX module, a (predictor, params) pair, or a plain predictor callable."""
    if isinstance(model, tuple) and len(model) == 2:
        return model
    from flax import nnx

    if isinstance(model, nnx.Module):
        from clips_jax.inference import nnx_predictor

        return nnx_predictor(model)
    if callable(model):
        return model, None
    raise ConfigError(f"stage-A model {type(model).__name__}: pass an NNX module, (predictor, params) or a callable")


def _select(store: st.CaseStore, cases) -> list[int]:
    if cases is None:
        return list(range(len(store)))
    if isinstance(cases, str):
        return [int(i) for i in store.split_indices(cases)]
    return [store.index(c if isinstance(c, str) else int(c)) for c in cases]


def compute_stage_a(store: st.CaseStore | str | Path, model, *, tile_shape: Sequence[int] = (128, 96, 96),
                    step: Sequence[int] = (64, 48, 48), batch_size: int = 1, spacing_mm=6.0,
                    dtype: str = "float32", out_dtype=None, source: Mapping[str, Any] | None = None,
                    cases=None, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Compute and store `stage_a.npy` for the cases of a store (see the module docstring, incl. the caveat).

    Args:
      store: a CaseStore (its in-memory manifest entries are updated too) or its folder.
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
    tile, stp = _triple(tile_shape, "tile_shape"), _triple(step, "step")
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
    predictor, params = _as_predictor(model)
    record = json.loads(json.dumps(st._json_safe({**dict(source or {}), "spacing_mm": sp, "tile_shape": list(tile),
                                                   "step": list(stp), "dtype": dtype})))
    selected = _select(store, cases)
    extra_top = {k: v for k, v in store.manifest.items() if k not in ("version", "cases")}
    summary: dict[str, Any] = {"computed": [], "skipped": [], "failed": [], "errors": {}, "total": len(selected),
                               "record": record}
    t0 = time.time()
    for k, i in enumerate(selected):
        cid, entry = store.ids[i], store.cases[i]
        prefix = f"[{k + 1}/{len(selected)}] {cid}"
        path = store.case_dir(i) / FILE_NAME
        if not overwrite and path.is_file() and entry.get(NAME) == record:
            summary["skipped"].append(cid)
            continue
        try:
            a = store.case_arrays(i)
            grid = store.geometry(i)
            native = Geometry.from_json(entry["native_geometry"]) if entry.get("native_geometry") else grid
            coarse = native.resampled(sp)
            prob = stage_a_probability(a["ct"], a["suv"], grid, coarse, predictor, params=params, tile_shape=tile,
                                       step=stp, batch_size=int(batch_size), dtype=dtype)
            with atomic_path(path) as tmp:
                np.save(tmp, np.ascontiguousarray(prob, dtype=out_dt))
            entry[NAME] = record
            st.write_manifest(store.cache_dir, store.cases, extra_top)
            summary["computed"].append(cid)
            log(f"{prefix}: ok, {grid.shape} voxels (stage A on {coarse.shape}), max p {float(prob.max()):.3f}, "
                f"{int((prob > 0.5).sum())} voxels > 0.5 ({time.time() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 - a batch command reports the case and carries on
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            summary["failed"].append(cid)
            summary["errors"][cid] = msg
            log(f"{prefix}: FAILED, skipped ({msg})")
    log(f"summary: {len(selected)} cases, {len(summary['computed'])} computed, {len(summary['skipped'])} already "
        f"done, {len(summary['failed'])} failed; store {store.cache_dir}")
    for cid in summary["failed"]:
        log(f"  failed {cid}: {summary['errors'][cid]}")
    return summary


def run_from_flags(fv, log: Callable[[str], None] = print) -> int:
    """Run the command with parsed absl flags `fv` (see `define_flags`); returns the exit status.

    0: every selected case done; 1: some case failed (reported); 2: usage or configuration error (one line
    on stderr: unknown model, bad tile, unreadable store or weights).
    """
    from clips_jax.errors import ClipsError
    from clips_jax.model import load_model, read_weights_meta

    if not fv["store"].value or not fv["weights"].value:
        print("error: --store and --weights are required (see --help)", file=sys.stderr)
        return 2
    try:
        store = st.CaseStore(fv["store"].value)
        names = sorted(read_weights_meta(fv["weights"].value)["models"])
        name = fv["model"].value
        if name not in names:
            raise ConfigError(f"{fv['weights'].value}: no model {name!r} (has {names}); pass --model with one "
                              "of them")
        tile = _parse_triple(fv["tile"].value, "--tile")
        step = _parse_triple(fv["step"].value, "--step")
        try:
            sp = [float(v) for v in fv["spacing"].value.split(",")]
        except ValueError:
            sp = []
        if len(sp) not in (1, 3):
            raise ConfigError(f"--spacing {fv['spacing'].value!r}: one number of mm or z,y,x")
        model = load_model(fv["weights"].value, name)
        out_dtype = fv["out-dtype"].value
        cases = fv["split"].value or ([c for c in fv["cases"].value.split(",") if c] if fv["cases"].value
                                      else None)
        summary = compute_stage_a(store, model, tile_shape=tile, step=step, batch_size=fv["batch-size"].value,
                                  spacing_mm=sp[0] if len(sp) == 1 else sp, dtype=fv["dtype"].value,
                                  out_dtype=None if out_dtype == "store" else np.dtype(out_dtype),
                                  source={"weights": Path(fv["weights"].value).resolve().as_posix(),
                                          "model": name},
                                  cases=cases, overwrite=fv["overwrite"].value, log=log)
    except ClipsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


def _parse_triple(text: str, name: str) -> tuple[int, int, int]:
    try:
        vals = [int(v) for v in str(text).split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 3):
        raise ConfigError(f"{name} {text!r}: give Z,Y,X voxels (e.g. 128,96,96) or one number")
    return _triple(vals, name)


def define_flags(fv) -> None:
    """Define the command-line flags on the absl `FlagValues` `fv` (global FLAGS or a private one)."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("store", None, "case store folder (any grid: 6 mm or native)", **kw)
    flags.DEFINE_string("weights", None, "weights directory (convert_weights output or a trainer export)", **kw)
    flags.DEFINE_string("model", "ensemble", "network of the weights directory: ensemble or unet", **kw)
    flags.DEFINE_string("tile", "128,96,96", "stage-A tile z,y,x voxels at the coarse spacing (multiples of 16)",
                        **kw)
    flags.DEFINE_string("step", "64,48,48", "tile step z,y,x voxels", **kw)
    flags.DEFINE_integer("batch-size", 1, "tiles per model call (more = faster on GPU, more memory)", **kw)
    flags.DEFINE_string("spacing", "6", "stage-A grid spacing in mm: one number or z,y,x", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the tiles", **kw)
    flags.DEFINE_enum("out-dtype", "store", ["store", "float32", "float16"], "dtype of stage_a.npy", **kw)
    flags.DEFINE_string("split", None, "only the cases of this split (train/val/test/unused)", **kw)
    flags.DEFINE_string("cases", None, "only these comma-separated case ids", **kw)
    flags.DEFINE_bool("overwrite", False, "recompute cases that are already done", **kw)


def main(argv: Sequence[str]) -> int:
    """Command-line entry: `main(["stage_a", "--store", ..., "--weights", ...])` -> exit status.

    Uses a private absl FlagValues (importing or calling this defines no global flags), so it can also be
    called in-process (tests). 2 for invalid flags, otherwise as `run_from_flags`. `python -m
    clips_jax.data.stage_a` runs exactly this.
    """
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
