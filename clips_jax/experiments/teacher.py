r"""Transfer-teacher scoring: a trained model's loss on each training case, stored in the case-store manifest.

Examples:
    clips-teacher --store cache/autopet --weights weights/tmtv-net
    python -m clips_jax.experiments.teacher --store CACHE --weights DIR [--model ensemble|unet|refiner]
    python -m clips_jax.experiments.teacher --store CACHE --run WORKDIR [--which best|last]
        [--split train] [--loss soft_dice|combined] [--tile Z,Y,X] [--step Z,Y,X] [--batch_size 1]
        [--dtype float32|bfloat16] [--out_manifest PATH] [--overwrite]

How it fits: scoring is an experiment step that runs a network (it is not a curriculum; the curricula only read
its result). The curriculum preset "transfer_teacher" (transfer teacher / bootstrapping, docs/curricula.md;
`clips_jax.curricula.registry`, measure `teacher_loss`) ranks the training cases by the `teacher_loss` column
of the manifest (`case_table_from_manifest`), easiest (lowest loss) first, and paces them like any predefined
curriculum. This module fills that column once, before training:

1. the teacher is a stage-A model: the `ensemble` (or a `unet`) of a converted / exported weights directory
   (`--weights`, default teacher: the converted TMTV-Net ensemble, see docs/weights.md), or the trained
   network of a training run (`--run WORKDIR`: parameters of `WORKDIR/checkpoints/best` (best validation Dice;
   the latest `last` checkpoint when the run never validated) or `checkpoints/last` (`--which last`), built
   from the run's `config.json`; `load_run_model`). The `refiner` is accepted but is NOT a sensible teacher
   unless the store is a native-grid store with stage-A maps (`python -m clips_jax.stage_a`): it refines
   a stage-A probability it is given as 6th channel, so without one there is nothing to score, and with one its
   loss measures how hard the case is *after* stage A, not for the student being trained;
2. whole-volume tiled inference on the store grid (`clips_jax.evaluation.predict_cases`, the evaluator shared
   with validation and test: central blending, the original TMTV-Net tiles plus a last tile flush with the end
   of each axis, coverage checked per case) of every case of `--split` (default "train"): lesion probability
   p (z, y, x);
3. the per-case loss against the stored label t (`case_loss`), higher = harder:
   * `soft_dice` (default): 1 - 2 sum(p t) / (sum(p) + sum(t)), in [0, 1]; continuous, so a teacher whose
     hard Dice is 0 on several cases still orders them;
   * `combined`: the supervised part of the TMTV-Net paper's Eq. 1 with its weights, Dice + 2 * CE, where
     Dice is the training soft Dice (`clips_jax.losses.soft_dice_loss`, smoothing 1e-3 / 1e-5) and CE the
     voxel-mean cross-entropy of (1 - p, p) with p clipped to [1e-7, 1 - 1e-7]. The alpha = 1e-5 Mumford-Shah
     term is left out: it does not compare with the label and its plain voxel sum grows with the body size;
   * lesion-free and unlabeled cases: NaN (written as null), and the network is not run on them. Their loss
     would be an FP-only score on another scale than the lesion cases' ordering; the predefined curricula
     sample lesion-free cases outside the ordering at a fixed proportion (`stratify_negatives`, docs/curricula.md
     "Case table and difficulty measures"), and a NaN-scored lesion case would be ranked last (hardest).
4. `write_teacher_losses`: each scored case's manifest entry gets `teacher_loss` and a `teacher` record
   (source, model, checkpoint, loss kind, tiles, compute dtype, date); the manifest also gets a top-level
   `teacher` record of the latest run. Everything else of the manifest is kept as it is (re-read from disk
   just before each write). The manifest is rewritten atomically after every case, so an interrupted run
   keeps what it scored.

Re-running skips the cases whose entry already holds a `teacher` record of the same teacher and settings
(every record field but the date; a run's checkpoint step included, so a run trained further is re-scored);
`--overwrite` re-scores them. A failing case is reported on one line and skipped (exit status 1). With
`--out_manifest PATH` the store's manifest is left untouched and the scored copy goes to PATH (scores already
in PATH count for skipping); to train on it, put it as `manifest.json` in a folder whose `cases` is a link to
the store's `cases` folder. Do not run `prepare` or `stage_a` on the same store at the same time (all rewrite
the manifest). `prepare` keeps the per-case entries (and so the scores) of cases it does not redo.

Scores of a teacher trained on the same cases are optimistic (memorised easy cases); prefer out-of-fold
teachers (docs/curricula.md): score each fold's held-out cases with that fold's model (`score_cases` with
`indices`, then `write_teacher_losses`), see `clips_jax.curricula.out_of_fold_difficulty`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clips_jax.errors import ConfigError, DataError
from clips_jax.metrics.case_losses import (CASE_LOSSES, CE_WEIGHT, PROB_CLIP, case_loss,  # noqa: F401 - re-exported
                                           combined_case_loss, soft_dice_of_probs)

LOSSES = CASE_LOSSES
"""Per-case teacher loss kinds (see the module docstring)."""

LOSS_KEY = "teacher_loss"
RECORD_KEY = "teacher"
"""Manifest keys: the per-case loss, and the provenance record (per case and top-level)."""

DEFAULT_TILE = (128, 96, 96)
DEFAULT_STEP = (64, 48, 48)
"""Default tiles of a weights-directory teacher: the original stage A (6 mm grid)."""


# ---------------------------------------------------------------------------------------------------------
# Per-case losses: `clips_jax.metrics.case_losses` (below the evaluation and the curricula), re-exported here
# under the names this module has always had: soft_dice_loss = soft_dice_of_probs (probabilities, not the
# logits-based training loss `clips_jax.losses.soft_dice_loss`), combined_teacher_loss = combined_case_loss,
# case_loss, LOSSES, PROB_CLIP, CE_WEIGHT.
# ---------------------------------------------------------------------------------------------------------

soft_dice_loss = soft_dice_of_probs
combined_teacher_loss = combined_case_loss


# ---------------------------------------------------------------------------------------------------------
# Teachers: a training run's checkpoint
# ---------------------------------------------------------------------------------------------------------

def load_run_model(run_dir: str | os.PathLike, which: str = "best", config=None) -> tuple[Any, dict]:
    """The trained network of a training run: `clips_jax.runs.load_run_model` (kept here under its old name)."""
    from clips_jax import runs

    return runs.load_run_model(run_dir, which, config)


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------

def score_cases(store, model, *, indices=None, tile_shape: Sequence[int] = DEFAULT_TILE,
                step: Sequence[int] = DEFAULT_STEP, batch_size: int = 1, loss: str = "soft_dice",
                dtype: str = "float32", extra_channels: Sequence[str] | None = None,
                on_case: Callable[[str, float], None] | None = None, failed: dict[str, str] | None = None,
                log: Callable[[str], None] = print) -> dict[str, float]:
    """The teacher loss of store cases (steps 2-3 of the module docstring); writes nothing itself.

    Each lesion case goes through `clips_jax.evaluation.predict_cases` (tiles reaching the end of every axis;
    a tiling that leaves voxels without weight fails the case, see `clips_jax.evaluation.check_coverage`) and
    `clips_jax.evaluation.teacher_row`.

    Args:
      store: a `CaseStore` (or its folder).
      model: the teacher: an NNX module (`x (N, D, H, W, C) -> logits (N, D, H, W, 2)`; a `Refiner` gets the
        stored stage-A map as 6th channel) or a `(predictor, params)` pair as for `tiled_inference`.
      indices: store indices to score (int sequence); None = the "train" split.
      tile_shape, step, batch_size, dtype: tiles (z, y, x voxels of the store grid; multiples of 16 for a
        U-Net), tile step (at most tile - 2 per axis), tiles per model call, compute dtype
        ("float32"/"bfloat16"), as `tiled_inference`.
      loss: "soft_dice" or "combined" (`case_loss`).
      extra_channels: input arrays after the 5 image channels; None = ("stage_a",) for a Refiner, else none.
      on_case: called as `on_case(case_id, loss)` after each scored case (e.g. to write the manifest); its
        exceptions propagate.
      failed: if given, receives `case_id -> one-line error` for each case that failed (reported via `log` and
        skipped either way).
      log: one-line progress sink.
    Returns:
      {case id: loss} in store order for every case scored (NaN for lesion-free / unlabeled cases, which are
      not run through the network); failed cases are absent.
    Raises:
      ConfigError for an unknown loss or, before any case is run, when a required extra channel (stage_a) is
      missing for a selected case.
    """
    from clips_jax import evaluation
    from clips_jax.data.store import CaseStore

    if loss not in LOSSES:
        raise ConfigError(f"teacher loss {loss!r} unknown; use one of {LOSSES}")
    store = store if isinstance(store, CaseStore) else CaseStore(store)
    idx = [int(i) for i in (store.split_indices("train") if indices is None else np.asarray(indices).reshape(-1))]
    pair = evaluation.as_predictor(model)  # split once: one compilation for all cases of a run
    extra = tuple(evaluation.model_channels(model) if extra_channels is None else extra_channels)
    has_seg, has_lesion = store.has_seg, store.has_lesion
    store.require_extra(extra, [i for i in idx if has_lesion[i]])  # only lesion cases go through the network
    scores: dict[str, float] = {}
    t0 = time.time()
    for k, i in enumerate(idx):
        cid = store.ids[i]
        prefix = f"[{k + 1}/{len(idx)}] {cid}"
        try:
            seg = store.case_arrays(i)["seg"]
            if not has_seg[i] or not np.any(seg):
                value = float("nan")
                log(f"{prefix}: {'unlabeled' if not has_seg[i] else 'lesion-free'}, no teacher loss (NaN)")
            else:
                case, prob = next(evaluation.predict_cases(pair, store, [i], tile_shape=tile_shape, step=step,
                                                           batch_size=int(batch_size), dtype=dtype,
                                                           extra_channels=extra))
                value = evaluation.teacher_row(prob, case, loss=loss)[LOSS_KEY]
                log(f"{prefix}: {loss} {value:.4f} ({time.time() - t0:.0f} s)")
        except Exception as e:  # noqa: BLE001 - a batch command reports the case and carries on
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            if failed is not None:
                failed[cid] = msg
            log(f"{prefix}: FAILED, skipped ({msg})")
            continue
        scores[cid] = value
        if on_case is not None:
            on_case(cid, value)
    return scores


# ---------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------

def same_teacher(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """True if two teacher records describe the same teacher and settings (every field but "date")."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return False
    strip = lambda r: {k: v for k, v in r.items() if k != "date"}  # noqa: E731
    return json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)


def make_record(source: str, model: str, loss: str, tile_shape: Sequence[int], step: Sequence[int],
                dtype: str = "float32", **more: Any) -> dict:
    """A teacher provenance record (JSON-safe): source (weights dir or run dir), model, loss kind, tiles,
    compute dtype, any `more` fields (e.g. checkpoint, checkpoint_step) and the date (UTC, ISO 8601)."""
    return {"source": str(source), "model": str(model), **{k: v for k, v in more.items()}, "loss": str(loss),
            "tile_shape": [int(v) for v in tile_shape], "step": [int(v) for v in step], "dtype": str(dtype),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def apply_scores(cases: Sequence[Mapping[str, Any]], scores: Mapping[str, float],
                 record: Mapping[str, Any] | None) -> list[dict]:
    """Copies of manifest entries with `teacher_loss` (and the `teacher` record, if given) set for the scored ids.

    Args: cases: manifest entries (dicts with "id"); scores: {case id: loss (NaN allowed)}; record: provenance.
    Returns: new list of new dicts, same order; entries not in `scores` are copied unchanged.
    Raises: DataError naming the first id of `scores` that is not in `cases`, or a negative/infinite loss.
    """
    from clips_jax.curricula.predefined import teacher_difficulty

    ids = {str(c.get("id")) for c in cases}
    unknown = [k for k in scores if k not in ids]
    if unknown:
        raise DataError(f"teacher scores for case {unknown[0]!r} (and {len(unknown) - 1} more) not in the manifest; "
                        "score the store the manifest belongs to")
    checked = dict(zip(scores, teacher_difficulty(np.array(list(scores.values()), np.float64)).tolist()))
    out = []
    for c in cases:
        c = dict(c)
        if c.get("id") in checked:
            c[LOSS_KEY] = checked[c["id"]]
            if record is not None:
                c[RECORD_KEY] = dict(record)
        out.append(c)
    return out


def _manifest_paths(store_dir: str | os.PathLike, out_manifest: str | os.PathLike | None) -> tuple[Path, Path]:
    """(manifest to read, manifest to write): the store's, or `out_manifest` (read from it once it exists)."""
    from clips_jax.data.store import MANIFEST

    own = Path(store_dir) / MANIFEST
    if out_manifest is None or Path(out_manifest).absolute() == own.absolute():
        return own, own
    out = Path(out_manifest)
    return (out if out.is_file() else own), out


def read_manifest(store_dir: str | os.PathLike, out_manifest: str | os.PathLike | None = None) -> dict:
    """The manifest document the scores are merged into (see `write_teacher_losses`). DataError if unreadable."""
    src, _ = _manifest_paths(store_dir, out_manifest)
    try:
        return json.loads(src.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{src}: no manifest; run `python -m clips_jax.data.prepare` first") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{src}: unreadable manifest ({e})") from e


def write_teacher_losses(store_dir: str | os.PathLike, scores: Mapping[str, float],
                         record: Mapping[str, Any] | None, *, out_manifest: str | os.PathLike | None = None) -> Path:
    """Merge teacher losses into a store's manifest, atomically, keeping every other field as it is.

    Args:
      store_dir: the case-store folder.
      scores: {case id: loss} (NaN -> null); ids must be in the manifest.
      record: teacher provenance (`make_record`): stored in each scored entry under "teacher" and as the
        top-level "teacher"; None writes the losses only.
      out_manifest: write here instead of `store_dir/manifest.json` (the store is then untouched); when this
        file already exists it is the document merged into (so successive calls accumulate).
    Returns: the path written. Raises: DataError for an unreadable manifest or unknown case ids.
    The manifest is re-read from disk right before writing (other fields changed meanwhile are kept).
    """
    from clips_jax.data.store import _json_safe
    from clips_jax.fileio import write_text_atomic

    _, dst = _manifest_paths(store_dir, out_manifest)
    doc = read_manifest(store_dir, out_manifest)
    doc["cases"] = apply_scores(doc.get("cases", []), scores, record)
    if record is not None:
        doc[RECORD_KEY] = dict(record)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst, json.dumps(_json_safe(doc), indent=1, allow_nan=False))
    return dst


def pending_cases(manifest: Mapping[str, Any], ids: Sequence[str], record: Mapping[str, Any],
                  overwrite: bool = False) -> list[str]:
    """The ids among `ids` still to score: all with `overwrite`, else those whose manifest entry lacks a
    `teacher_loss` or has a record of another teacher (`same_teacher`). Order of `ids` is kept."""
    by_id = {c.get("id"): c for c in manifest.get("cases", [])}
    if overwrite:
        return list(ids)
    return [i for i in ids if LOSS_KEY not in by_id.get(i, {}) or not same_teacher(by_id[i].get(RECORD_KEY), record)]


def score_store(store_dir: str | os.PathLike, model, record: Mapping[str, Any], *, split: str = "train",
                tile_shape: Sequence[int] = DEFAULT_TILE, step: Sequence[int] = DEFAULT_STEP, batch_size: int = 1,
                loss: str = "soft_dice", dtype: str = "float32", overwrite: bool = False,
                out_manifest: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Score the cases of a split that are not yet scored by this teacher and write them (the whole command).

    Args: as `score_cases` / `write_teacher_losses`; `record` from `make_record` with the same loss, tiles
      and dtype. The manifest is written after every case.
    Returns: {"scored": ids, "skipped": ids already scored by the same teacher, "failed": ids, "errors":
      {id: message}, "total": cases in the split, "written": manifest path or None}.
    Raises: ConfigError for an empty/unknown split or bad settings; DataError for an unreadable manifest.
    """
    from clips_jax.data.store import CaseStore

    store = CaseStore(store_dir)
    idx = [int(i) for i in store.split_indices(split)]
    if not idx:
        raise ConfigError(f"store {store.cache_dir}: no case in split {split!r}; use --split train/val/test/unused")
    ids = [store.ids[i] for i in idx]
    todo = set(pending_cases(read_manifest(store_dir, out_manifest), ids, record, overwrite))
    summary: dict[str, Any] = {"scored": [], "skipped": [i for i in ids if i not in todo], "failed": [],
                               "errors": {}, "total": len(ids), "written": None}
    if summary["skipped"]:
        log(f"{len(summary['skipped'])} of {len(ids)} cases already scored by this teacher: skipped "
            "(--overwrite re-scores them)")

    def on_case(cid: str, value: float) -> None:
        summary["written"] = str(write_teacher_losses(store_dir, {cid: value}, record, out_manifest=out_manifest))
        summary["scored"].append(cid)

    score_cases(store, model, indices=[i for i in idx if store.ids[i] in todo], tile_shape=tile_shape, step=step,
                batch_size=batch_size, loss=loss, dtype=dtype, on_case=on_case, failed=summary["errors"], log=log)
    summary["failed"] = list(summary["errors"])
    log(f"summary: {len(ids)} cases in split {split!r}, {len(summary['scored'])} scored, "
        f"{len(summary['skipped'])} already done, {len(summary['failed'])} failed; manifest "
        f"{_manifest_paths(store_dir, out_manifest)[1]}")
    for cid in summary["failed"]:
        log(f"  failed {cid}: {summary['errors'][cid]}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def run_from_flags(fv, log: Callable[[str], None] = print) -> int:
    """Run the command with parsed absl flags `fv` (see `define_flags`); returns 0 when every case of the split
    is scored (now or before), 1 when some case failed (reported). Usage and settings errors (missing or
    conflicting --weights/--run, unknown model, bad tiles: exit 2) and unreadable store, weights or run (exit 1)
    are raised and reported on one line by `cli.run_tool`."""
    from clips_jax.cli import UsageError, parse_zyx
    from clips_jax.data.store import CaseStore
    from clips_jax.model import load_model, read_weights_meta

    weights, run = fv["weights"].value, fv["run"].value
    if not fv["store"].value or bool(weights) == bool(run):
        raise UsageError("give --store and exactly one of --weights or --run (see --help)")
    if int(fv["batch_size"].value) < 1:
        raise ConfigError(f"--batch_size={fv['batch_size'].value}: need >= 1")
    store = CaseStore(fv["store"].value)
    if weights:
        names = sorted(read_weights_meta(weights)["models"])
        name = fv["model"].value
        if name not in names:
            raise ConfigError(f"{weights}: no model {name!r} (has {names}); pass --model with one of them")
        model, more, source = load_model(weights, name), {}, Path(weights).resolve().as_posix()
        tile_default, step_default = DEFAULT_TILE, DEFAULT_STEP
        sp = store.manifest.get("spacing_mm")
        if name != "refiner" and not (sp and np.allclose(sp, 6.0)):
            log(f"warning: the store grid is {sp or 'native'} mm; the TMTV-Net stage-A models were trained on "
                "the 6 mm grid")
    else:
        model, more = load_run_model(run, fv["which"].value)
        cfg = json.loads((Path(run) / "config.json").read_text())
        name, source = str(cfg.get("model", {}).get("kind", "unet")), Path(run).resolve().as_posix()
        tile_default, step_default = cfg["eval"]["tile_shape"], cfg["eval"]["tile_step"]
    tile = parse_zyx(fv["tile"].value or ",".join(map(str, tile_default)), "tile")
    stp = parse_zyx(fv["step"].value or ",".join(map(str, step_default)), "step")
    record = make_record(source, name, fv["loss"].value, tile, stp, fv["dtype"].value, **more)
    log(f"teacher: {name} from {source}" + (f" ({more['checkpoint']} checkpoint, step "
                                            f"{more['checkpoint_step']})" if more else "")
        + f"; loss {fv['loss'].value}; tiles {tile} step {stp}")
    summary = score_store(store.cache_dir, model, record, split=fv["split"].value, tile_shape=tile, step=stp,
                          batch_size=int(fv["batch_size"].value), loss=fv["loss"].value,
                          dtype=fv["dtype"].value, overwrite=bool(fv["overwrite"].value),
                          out_manifest=fv["out_manifest"].value or None, log=log)
    return 1 if summary["failed"] else 0


def define_flags(fv) -> None:
    """Define the command-line flags on the absl `FlagValues` `fv` (global FLAGS or a private one)."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("store", None, "case store folder whose manifest gets the teacher_loss column", **kw)
    flags.DEFINE_string("weights", None, "teacher: a weights directory (convert_weights output or a trainer "
                        "export); exclusive with --run", **kw)
    flags.DEFINE_enum("model", "ensemble", ["ensemble", "unet", "refiner"], "network of --weights (the refiner "
                      "needs a native-grid store with stage-A maps and is not a sensible teacher otherwise)", **kw)
    flags.DEFINE_string("run", None, "teacher: a training run's workdir (config.json + checkpoints/); exclusive "
                        "with --weights", **kw)
    flags.DEFINE_enum("which", "best", ["best", "last"], "checkpoint of --run: best validation Dice (the last "
                      "one if the run never validated) or the last one", **kw)
    flags.DEFINE_string("split", "train", "cases to score: the cases of this split", **kw)
    flags.DEFINE_enum("loss", "soft_dice", list(LOSSES), "per-case loss: soft_dice = 1 - soft Dice; combined = "
                      "training soft Dice + 2 * cross-entropy; NaN for lesion-free cases", **kw)
    flags.DEFINE_string("tile", "", "tile z,y,x voxels of the store grid (default: 128,96,96 for --weights, the "
                        "run's eval.tile_shape for --run)", **kw)
    flags.DEFINE_string("step", "", "tile step z,y,x voxels (default: 64,48,48 for --weights, the run's "
                        "eval.tile_step for --run)", **kw)
    flags.DEFINE_integer("batch_size", 1, "tiles per model call (more = faster on GPU, more memory)", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the tiles", **kw)
    flags.DEFINE_string("out_manifest", None, "write the scored manifest here instead of the store's "
                        "manifest.json (which is then left untouched)", **kw)
    flags.DEFINE_bool("overwrite", False, "re-score cases already scored by the same teacher", **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """`clips-teacher`: `main(["teacher", "--store", ..., "--weights", ...])` (None = sys.argv) -> exit status.

    Uses a private absl FlagValues (importing or calling this defines no global flags), so it can be called
    in-process (tests). Exit status as README, "Command-line convention".
    """
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
