r"""Stage-A lesion probabilities for every case of a store: the refiner's 6th input channel, for training.

Examples:
    clips-stage-a --store cache/autopet_native --weights weights/tmtv-net
    python -m clips_jax.stage_a --store CACHE --weights DIR [--model ensemble|unet] \
        [--tile 128,96,96] [--step 64,48,48] [--batch_size 1] [--spacing 6] [--dtype float32|bfloat16] \
        [--out_dtype store|float32|float16] [--split train] [--cases ID,ID] [--overwrite]

TMTV-Net's refiner (stage B) sees the 5 image channels at native PET resolution plus the stage-A lesion
probability: the 6 mm ensemble output, linearly upsampled onto the PET grid (Yousefirizi et al., EJNMMI
Research 2024; `inference_fn` in `main/main.py` of the original repository `qurit-frizi/TMTV-Net`).
Inference computes it on the fly (`clips_jax.cascade.cascade`); training the refiner needs it stored next
to each case, which is what this command does (`clips_jax.cascade.compute_stage_a`). Typical use:

    clips-prepare --input DATA --output CACHE_NATIVE --spacing native
    clips-stage-a --store CACHE_NATIVE --weights weights/tmtv-net
    # then train with config.model.kind = "refiner" on CACHE_NATIVE (pipeline extra_channels=("stage_a",))

Per case (the same steps as the cascade's stage A; details in the `clips_jax.cascade` module docstring): the
stored CT / SUV go onto the stage-A grid (`native_geometry.resampled(--spacing)`), through the stage-A model
(tiled inference), and the lesion probability comes back onto the store grid, saved atomically as
`cases/<id>/stage_a.npy` ((z, y, x), float16 or float32); the case's manifest entry gets the derived record
`derived.stage_a` of the producing weights/model and the settings (spacing, tile, step, compute dtype), written
after every case through the store's one locked writer (`clips_jax.data.store`, "Writing").
Re-running skips a case whose file exists and whose record equals the current settings; a case made by
other weights or settings is recomputed (so one store never silently mixes two stage-A models, unless
`--cases`/`--split` restrict a run on purpose, see below). A failing case is reported on one line and skipped;
the command exits with status 1 if any failed. `prepare` or the teacher scoring may update the same store
meanwhile (the manifest is locked per update), but re-preparing a case deletes its stage_a.npy and record, as it
should (the map was computed from the old arrays): run this command again for such cases.

Training-time caveat (honest): how the original TMTV-Net produced the cascade channel for training its
refiner is not documented (neither the paper nor the original repository says how the training-time cascade
input was generated and resampled). Running the released ensemble on cases it may have been trained on
(autoPET) gives stage-A maps that are better than what the refiner will see on new patients, so the refiner
may learn to trust stage A too much. Ideally the maps of training cases come from OUT-OF-FOLD models: train k
stage-A models on k folds and run each on its held-out fold only (`--cases` / `--split` plus a per-fold
`--weights`; the manifest records, per case, which weights made its map). Validation/test cases should use
the stage-A model that will be deployed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clips_jax.cascade import compute_stage_a
from clips_jax.data import store as st
from clips_jax.errors import ConfigError


def run_from_flags(fv, log: Callable[[str], None] = print) -> int:
    """Run the command with parsed absl flags `fv` (see `define_flags`); returns 0 when every selected case is
    done, 1 when some case failed (reported). Bad flags or settings (ConfigError, UsageError: exit 2) and an
    unreadable store or weights (exit 1) are raised and reported on one line by `cli.run_tool`."""
    from clips_jax.cli import parse_zyx
    from clips_jax.model import load_model, read_weights_meta

    store = st.CaseStore(fv["store"].value)
    names = sorted(read_weights_meta(fv["weights"].value)["models"])
    name = fv["model"].value
    if name not in names:
        raise ConfigError(f"{fv['weights'].value}: no model {name!r} (has {names}); pass --model with one of them")
    tile, step = parse_zyx(fv["tile"].value, "tile"), parse_zyx(fv["step"].value, "step")
    sp = parse_zyx(fv["spacing"].value, "spacing", float)
    model = load_model(fv["weights"].value, name)
    out_dtype = fv["out_dtype"].value
    cases = fv["split"].value or ([c for c in fv["cases"].value.split(",") if c] if fv["cases"].value else None)
    summary = compute_stage_a(
        store,
        model,
        tile_shape=tile,
        step=step,
        batch_size=fv["batch_size"].value,
        spacing_mm=sp[0] if len(set(sp)) == 1 else list(sp),
        dtype=fv["dtype"].value,
        out_dtype=None if out_dtype == "store" else np.dtype(out_dtype),
        source={"weights": Path(fv["weights"].value).resolve().as_posix(), "model": name},
        cases=cases,
        overwrite=fv["overwrite"].value,
        log=log,
    )
    return 1 if summary["failed"] else 0


def define_flags(fv) -> None:
    """Define the command-line flags on the absl `FlagValues` `fv` (global FLAGS or a private one)."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("store", None, "case store folder (any grid: 6 mm or native)", **kw)
    flags.DEFINE_string("weights", None, "weights directory (convert_weights output or a trainer export)", **kw)
    flags.DEFINE_string("model", "ensemble", "network of the weights directory: ensemble or unet", **kw)
    flags.DEFINE_string("tile", "128,96,96", "stage-A tile z,y,x voxels at the coarse spacing (multiples of 16)", **kw)
    flags.DEFINE_string("step", "64,48,48", "tile step z,y,x voxels", **kw)
    flags.DEFINE_integer("batch_size", 1, "tiles per model call (more = faster on GPU, more memory)", **kw)
    flags.DEFINE_string("spacing", "6", "stage-A grid spacing in mm: one number or z,y,x", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the tiles", **kw)
    flags.DEFINE_enum("out_dtype", "store", ["store", "float32", "float16"], "dtype of stage_a.npy", **kw)
    flags.DEFINE_string("split", None, "only the cases of this split (train/val/test/unused)", **kw)
    flags.DEFINE_string("cases", None, "only these comma-separated case ids", **kw)
    flags.DEFINE_bool("overwrite", False, "recompute cases that are already done", **kw)
    flags.mark_flags_as_required(["store", "weights"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """`clips-stage-a`: `main(["stage_a", "--store", ..., "--weights", ...])` (None = sys.argv) -> exit status.

    Uses a private absl FlagValues (importing or calling this defines no global flags), so it can also be
    called in-process (tests). Exit status as README, "Command-line convention". `python -m
    clips_jax.stage_a` runs exactly this.
    """
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
