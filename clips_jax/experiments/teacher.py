r"""Transfer-teacher scoring: a trained model's loss on each training case, stored in the case store.

Examples:
    clips-teacher --store cache/autopet --weights weights/tmtv-net
    python -m clips_jax.experiments.teacher --store CACHE --weights DIR [--model ensemble|unet|refiner]
    python -m clips_jax.experiments.teacher --store CACHE --run WORKDIR [--which best|last]
        [--split train] [--loss soft_dice|combined] [--tile Z,Y,X] [--step Z,Y,X] [--batch_size 1]
        [--dtype float32|bfloat16] [--overwrite]

How it fits: scoring is an experiment step that runs a network (it is not a curriculum; the curricula only read
its result). The curriculum preset "transfer_teacher" (transfer teacher / bootstrapping, docs/curricula.md;
`clips_jax.curricula.registry`, measure `teacher_loss`) ranks the training cases by their `teacher_loss`
(`CaseStore.case_rows(teacher)` -> `case_table_from_manifest`), easiest (lowest loss) first, and paces them like
any predefined curriculum. This module computes those losses once, before training:

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
4. `write_teacher_losses`: the losses are derived data of the store, kept per teacher: the teacher id
   (`teacher_id`: the model kind and a hash of the provenance record without its date) names the namespace,
   each scored case gets `derived.teacher.<id>` = its loss, the manifest's `derived.teachers.<id>` = the
   record (source, model, checkpoint, loss kind, tiles, compute dtype, date), and the teacher becomes the
   store's default teacher (the one training reads unless `data.teacher` names another). Written through the
   store's one locked writer after every case (`CaseStore.set_teacher_losses`; everything else of the manifest,
   and other teachers' scores, are kept), so an interrupted run keeps what it scored and `prepare` or
   `stage_a` may run on the same store meanwhile. `prepare` keeps the entries (and so the scores) of cases it
   does not redo; a re-prepared case loses its scores.

Re-running skips the cases already scored by the same teacher and settings (the same teacher id: every record
field but the date; a run's checkpoint step included, so a run trained further is a new teacher and re-scores);
`--overwrite` re-scores them. A failing case is reported on one line and skipped (exit status 1). Several
teachers can score one store without clashing (the curriculum comparison scores its baseline teacher into the
comparison's store this way). The former `--out_manifest` (a scored copy of the manifest) is gone: scores of a
teacher no longer disturb anything else in the store.

Scores of a teacher trained on the same cases are optimistic (memorised easy cases); prefer out-of-fold
teachers (docs/curricula.md): score each fold's held-out cases with that fold's model (`score_cases` with
`indices`, then `write_teacher_losses(store, scores, record, teacher="oof")`: one common teacher id for all folds,
the record of the fold written last is kept), see `clips_jax.curricula.out_of_fold_difficulty`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clips_jax import batch
from clips_jax.errors import ConfigError
from clips_jax.metrics.case_losses import (
    CASE_LOSSES,
    case_loss,  # noqa: F401 - re-exported
    combined_case_loss,
)

LOSSES = CASE_LOSSES
"""Per-case teacher loss kinds (see the module docstring)."""

LOSS_KEY = "teacher_loss"
"""The per-case loss column of `CaseStore.case_rows` (stored under `derived.teacher.<id>`)."""

DEFAULT_TILE = (128, 96, 96)
DEFAULT_STEP = (64, 48, 48)
"""Default tiles of a weights-directory teacher: the original stage A (6 mm grid)."""


# ---------------------------------------------------------------------------------------------------------
# Per-case losses live in `clips_jax.metrics.case_losses` (below the evaluation and the curricula):
# `soft_dice_of_probs` (probabilities; the logits-based training loss is `clips_jax.losses.soft_dice_loss`),
# `combined_case_loss` (also named combined_teacher_loss here), `case_loss`, `CASE_LOSSES` (LOSSES here).
# ---------------------------------------------------------------------------------------------------------

combined_teacher_loss = combined_case_loss


# ---------------------------------------------------------------------------------------------------------
# Teachers: a training run's checkpoint
# ---------------------------------------------------------------------------------------------------------


def load_run_model(run_dir: str | os.PathLike, which: str = "best", config=None, **kwargs) -> tuple[Any, dict]:
    """The trained network of a training run: `clips_jax.runs.load_run_model` (kept here under its old name;
    `kwargs`: its `step` and `raw`)."""
    from clips_jax import runs

    return runs.load_run_model(run_dir, which, config, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------


def score_cases(
    store,
    model,
    *,
    indices=None,
    tile_shape: Sequence[int] = DEFAULT_TILE,
    step: Sequence[int] = DEFAULT_STEP,
    batch_size: int = 1,
    loss: str = "soft_dice",
    dtype: str = "float32",
    extra_channels: Sequence[str] | None = None,
    on_case: Callable[[str, float], None] | None = None,
    failed: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
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
    tiles = dict(tile_shape=tile_shape, step=step, batch_size=int(batch_size), dtype=dtype, extra_channels=extra)
    scores: dict[str, float] = {}
    t0 = time.time()

    def one_case(cid: str):
        i = store.index(cid)
        if not has_seg[i] or not np.any(store.case_arrays(i)["seg"]):
            scores[cid] = float("nan")
            message = f"{'unlabeled' if not has_seg[i] else 'lesion-free'}, no teacher loss (NaN)"
        else:
            case, prob = next(evaluation.predict_cases(pair, store, [i], **tiles))
            scores[cid] = evaluation.teacher_row(prob, case, loss=loss)[LOSS_KEY]
            message = f"{loss} {scores[cid]:.4f} ({time.time() - t0:.0f} s)"
        return batch.done(message)

    outcomes = batch.for_each_case(
        [store.ids[i] for i in idx],
        one_case,
        log=log,
        on_failure=None if failed is None else failed.__setitem__,
        after_each=None if on_case is None else lambda cid, _: on_case(cid, scores[cid]),
    )
    return {cid: scores[cid] for cid in outcomes.done}


# ---------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------


def make_record(
    source: str,
    model: str,
    loss: str,
    tile_shape: Sequence[int],
    step: Sequence[int],
    dtype: str = "float32",
    **more: Any,
) -> dict:
    """A teacher provenance record (JSON-safe): source (weights dir or run dir), model, loss kind, tiles,
    compute dtype, any `more` fields (e.g. checkpoint, checkpoint_step) and the date (UTC, ISO 8601)."""
    return {
        "source": str(source),
        "model": str(model),
        **{k: v for k, v in more.items()},
        "loss": str(loss),
        "tile_shape": [int(v) for v in tile_shape],
        "step": [int(v) for v in step],
        "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def teacher_id(record: Mapping[str, Any] | None) -> str:
    """The id a teacher's scores are stored under: "<model>-<10 hex digits of a hash of the record without its
    date>" (equal ids: the same teacher and settings), or "unrecorded" for scores written without a record."""
    if not isinstance(record, Mapping):
        return "unrecorded"
    text = json.dumps({k: v for k, v in record.items() if k != "date"}, sort_keys=True, default=str)
    return f"{record.get('model', 'teacher')}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def check_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """{case id: loss} validated by `clips_jax.curricula.predefined.teacher_difficulty` (DataError for a
    negative or infinite loss; NaN allowed)."""
    from clips_jax.curricula.predefined import teacher_difficulty

    return dict(zip(scores, teacher_difficulty(np.array(list(scores.values()), np.float64)).tolist()))


def write_teacher_losses(
    store,
    scores: Mapping[str, float],
    record: Mapping[str, Any] | None,
    *,
    teacher: str | None = None,
    default: bool = True,
) -> Path:
    """Store teacher losses in a case store (`CaseStore.set_teacher_losses`: one locked update of the manifest,
    everything else kept).

    Args:
      store: the case-store folder, or a `CaseStore` (its in-memory copy is refreshed).
      scores: {case id: loss} (NaN -> null); ids must be in the store.
      record: teacher provenance (`make_record`), stored as `derived.teachers.<teacher>`; None stores the losses
        only.
      teacher: the teacher id; default `teacher_id(record)`.
      default: also make this teacher the store's default teacher (the one read when none is named).
    Returns: the manifest path. Raises: DataError for an unreadable manifest, unknown case ids or a
    negative/infinite loss (nothing written then).
    """
    from clips_jax.data.store import MANIFEST, CaseStore

    store = store if isinstance(store, CaseStore) else CaseStore(store)
    store.set_teacher_losses(teacher or teacher_id(record), check_scores(scores), record, default=default)
    return store.cache_dir / MANIFEST


def pending_cases(
    store, ids: Sequence[str], record: Mapping[str, Any], overwrite: bool = False, teacher: str | None = None
) -> list[str]:
    """The ids among `ids` still to score: all with `overwrite`, else those the teacher (id `teacher`, default
    `teacher_id(record)`) has not scored in `store` (a `CaseStore`). Order of `ids` is kept."""
    if overwrite:
        return list(ids)
    tid = teacher or teacher_id(record)
    done = store.teacher_losses(tid) if tid in store.teachers else {}
    return [i for i in ids if i not in done]


def score_store(
    store_dir: str | os.PathLike,
    model,
    record: Mapping[str, Any],
    *,
    split: str = "train",
    tile_shape: Sequence[int] = DEFAULT_TILE,
    step: Sequence[int] = DEFAULT_STEP,
    batch_size: int = 1,
    loss: str = "soft_dice",
    dtype: str = "float32",
    overwrite: bool = False,
    default: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Score the cases of a split that are not yet scored by this teacher and write them (the whole command).

    Args: as `score_cases` / `write_teacher_losses`; `record` from `make_record` with the same loss, tiles
      and dtype. The scores are written after every case, under `teacher_id(record)`.
    Returns: {"scored": ids, "skipped": ids already scored by the same teacher, "failed": ids, "errors":
      {id: message}, "total": cases in the split, "written": manifest path or None, "teacher": the teacher id}.
    Raises: ConfigError for an empty/unknown split or bad settings; DataError for an unreadable manifest.
    """
    from clips_jax.data.store import CaseStore

    store = CaseStore(store_dir)
    idx = [int(i) for i in store.split_indices(split)]
    if not idx:
        raise ConfigError(f"store {store.cache_dir}: no case in split {split!r}; use --split train/val/test/unused")
    ids = [store.ids[i] for i in idx]
    tid = teacher_id(record)
    todo = set(pending_cases(store, ids, record, overwrite))
    summary: dict[str, Any] = {
        "scored": [],
        "skipped": [i for i in ids if i not in todo],
        "failed": [],
        "errors": {},
        "total": len(ids),
        "written": None,
        "teacher": tid,
    }
    if summary["skipped"]:
        log(
            f"{len(summary['skipped'])} of {len(ids)} cases already scored by this teacher: skipped "
            "(--overwrite re-scores them)"
        )

    def on_case(cid: str, value: float) -> None:
        summary["written"] = str(write_teacher_losses(store, {cid: value}, record, teacher=tid, default=default))
        summary["scored"].append(cid)

    # A fixed snapshot of the store to score from (`on_case` refreshes `store`, which other writers may change).
    score_cases(
        CaseStore(store.cache_dir),
        model,
        indices=[i for i in idx if store.ids[i] in todo],
        tile_shape=tile_shape,
        step=step,
        batch_size=batch_size,
        loss=loss,
        dtype=dtype,
        on_case=on_case,
        failed=summary["errors"],
        log=log,
    )
    summary["failed"] = list(summary["errors"])
    log(
        f"summary: {len(ids)} cases in split {split!r}, {len(summary['scored'])} scored, "
        f"{len(summary['skipped'])} already done, {len(summary['failed'])} failed; teacher {tid} in "
        f"{store.cache_dir}"
    )
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
    if fv["out_manifest"].value:
        raise UsageError(
            "--out_manifest was removed: the scores are stored in the store under the teacher's own "
            "id (derived.teacher.<id>) and disturb nothing else; drop the flag, and train with "
            "--config.data.teacher=<id> to use a teacher other than the store's default"
        )
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
            log(
                f"warning: the store grid is {sp or 'native'} mm; the TMTV-Net stage-A models were trained on "
                "the 6 mm grid"
            )
    else:
        model, more = load_run_model(run, fv["which"].value)
        cfg = json.loads((Path(run) / "config.json").read_text())
        name, source = str(cfg.get("model", {}).get("kind", "unet")), Path(run).resolve().as_posix()
        tile_default, step_default = cfg["eval"]["tile_shape"], cfg["eval"]["tile_step"]
    tile = parse_zyx(fv["tile"].value or ",".join(map(str, tile_default)), "tile")
    stp = parse_zyx(fv["step"].value or ",".join(map(str, step_default)), "step")
    record = make_record(source, name, fv["loss"].value, tile, stp, fv["dtype"].value, **more)
    log(
        f"teacher: {name} from {source}"
        + (f" ({more['checkpoint']} checkpoint, step {more['checkpoint_step']})" if more else "")
        + f"; loss {fv['loss'].value}; tiles {tile} step {stp}; teacher id {teacher_id(record)}"
    )
    summary = score_store(
        store.cache_dir,
        model,
        record,
        split=fv["split"].value,
        tile_shape=tile,
        step=stp,
        batch_size=int(fv["batch_size"].value),
        loss=fv["loss"].value,
        dtype=fv["dtype"].value,
        overwrite=bool(fv["overwrite"].value),
        log=log,
    )
    return 1 if summary["failed"] else 0


def define_flags(fv) -> None:
    """Define the command-line flags on the absl `FlagValues` `fv` (global FLAGS or a private one)."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("store", None, "case store folder whose manifest gets the teacher_loss column", **kw)
    flags.DEFINE_string(
        "weights",
        None,
        "teacher: a weights directory (convert_weights output or a trainer export); exclusive with --run",
        **kw,
    )
    flags.DEFINE_enum(
        "model",
        "ensemble",
        ["ensemble", "unet", "refiner"],
        "network of --weights (the refiner "
        "needs a native-grid store with stage-A maps and is not a sensible teacher otherwise)",
        **kw,
    )
    flags.DEFINE_string(
        "run", None, "teacher: a training run's workdir (config.json + checkpoints/); exclusive with --weights", **kw
    )
    flags.DEFINE_enum(
        "which",
        "best",
        ["best", "last"],
        "checkpoint of --run: best validation Dice (the last one if the run never validated) or the last one",
        **kw,
    )
    flags.DEFINE_string("split", "train", "cases to score: the cases of this split", **kw)
    flags.DEFINE_enum(
        "loss",
        "soft_dice",
        list(LOSSES),
        "per-case loss: soft_dice = 1 - soft Dice; combined = "
        "training soft Dice + 2 * cross-entropy; NaN for lesion-free cases",
        **kw,
    )
    flags.DEFINE_string(
        "tile",
        "",
        "tile z,y,x voxels of the store grid (default: 128,96,96 for --weights, the run's eval.tile_shape for --run)",
        **kw,
    )
    flags.DEFINE_string(
        "step", "", "tile step z,y,x voxels (default: 64,48,48 for --weights, the run's eval.tile_step for --run)", **kw
    )
    flags.DEFINE_integer("batch_size", 1, "tiles per model call (more = faster on GPU, more memory)", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the tiles", **kw)
    flags.DEFINE_string(
        "out_manifest",
        None,
        "removed (an error when given): scores are stored per teacher in the store, see the module docstring",
        **kw,
    )
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
