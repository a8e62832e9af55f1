"""A training run's folder and its formats, in one place: what is written where, how it is read back.

Layout of a run folder (`python -m clips_jax.train --workdir W`, `trainer.train_and_evaluate(cfg, W)`):

    W/run.json             {"format": RUN_FORMAT, "created": date, ...}: the folder's format version
    W/config.json          the full config of the run (reproduces it)
    W/metrics.jsonl        one JSON object per line: kind "train" (per step), "eval", "curriculum" (per stage)
    W/summary.json         written when the run finishes (steps, wall time, validation metrics, curriculum settings,
                           the machine, versions and commit that trained its last part: `provenance.run_provenance`)
    W/checkpoints/last/S/  orbax, every `checkpoint.every_steps`: items "state" (parameters, optimizer state,
                           step, counters, and "ema", the weight average, when `optim.ema_decay` > 0),
                           "curriculum" (the curriculum's state pytree), "meta" (JSON: step, stage, stage
                           weights, data-stream and schedule settings, among them `optim.ema_decay`)
    W/checkpoints/best/S/  orbax, the best validation Dice: item "state" with "params" and "rest" only (the
                           weights validation used: the weight average when the run keeps one)

Formats: 1 = folders written before run.json existed (2026-11-26 and earlier): their curriculum states of
Exp3.S and self-paced learning have another layout, so they are not resumed (the message says what to do),
but their trained model loads (`load_run_model`). 2 = this version. A folder of a newer format is refused.

Everything here is plain I/O around orbax (`orbax.checkpoint.CheckpointManager`, Composite items) and JSON;
the trainer decides *when* to save, this module decides *how*. `load_run_model` is what the transfer-teacher
scoring, the comparison and the hardness scoring use to get a trained network back.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from clips_jax.errors import ConfigError
from clips_jax.fileio import json_safe, write_text_atomic
from clips_jax.model.checkpoint import abstract_arrays

RUN_FORMAT = 2
"""Format version of run folders written by this code (see the module docstring)."""


# ---------------------------------------------------------------------------------------------------------
# Format version
# ---------------------------------------------------------------------------------------------------------


def run_format(workdir: str | os.PathLike) -> int | None:
    """The format of a run folder: RUN_FORMAT-like int from run.json, 1 for a folder with checkpoints but no
    run.json (written before formats were recorded), None for a new (empty) folder."""
    workdir = Path(workdir)
    path = workdir / "run.json"
    if path.is_file():
        try:
            return int(json.loads(path.read_text())["format"])
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: unreadable run format ({e}); restore the file or use a new --workdir") from e
    return 1 if (workdir / "checkpoints").is_dir() else None


def open_for_training(workdir: str | os.PathLike) -> Path:
    """Create `workdir` (or accept an existing one of this format) and record its format in run.json.

    Raises ConfigError for a folder of another format: format 1 cannot be resumed (its curriculum state has
    another layout) and a newer format needs a newer clips-jax; the message says what to do.
    """
    workdir = Path(workdir)
    fmt = run_format(workdir)
    if fmt is not None and fmt != RUN_FORMAT:
        if fmt < RUN_FORMAT:
            raise ConfigError(
                f"{workdir}: a run folder of format {fmt} (written by an older clips-jax); it cannot be "
                "resumed with this version (the curriculum state changed), but its model still loads "
                "for prediction and teacher scoring. Train in a new --workdir"
            )
        raise ConfigError(
            f"{workdir}: a run folder of format {fmt}, newer than this clips-jax ({RUN_FORMAT}); "
            "upgrade clips-jax or use a new --workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if fmt is None and jax.process_index() == 0:
        write_text_atomic(
            workdir / "run.json", json.dumps({"format": RUN_FORMAT, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        )
    return workdir


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


PRINT_FLUSHED = functools.partial(print, flush=True)
"""The default progress sink: a console line, flushed at once (logs piped to a file stay current)."""


class MetricsWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` (process 0 only) and sends progress lines
    to `echo` (default `print`: the training command's console; a library caller may pass its own sink)."""

    def __init__(self, workdir: Path, quiet: bool = False, echo: Callable[[str], None] = PRINT_FLUSHED):
        self.path = Path(workdir) / "metrics.jsonl"
        self.primary = jax.process_index() == 0
        self.quiet = quiet
        self.echo = echo

    def write(self, row: dict) -> None:
        """Append one row (a dict; made JSON-ready with `json_safe`)."""
        self.write_many([row])

    def write_many(self, rows) -> None:
        """Append several rows with one open (the device path writes a chunk of steps at once)."""
        if self.primary:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(json_safe(r)) + "\n" for r in rows))

    def log(self, line: str) -> None:
        """Send one progress line to `echo` (process 0, unless quiet)."""
        if self.primary and not self.quiet:
            self.echo(line)


#: An archived run's reduced metric log (`clips_jax.experiments.archive`), read where metrics.jsonl is absent.
METRICS_GZ = "metrics.jsonl.gz"


def read_metrics(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Rows of `workdir/metrics.jsonl` (optionally only `kind` = "train" / "eval"), the last row per
    (kind, step) kept: a resumed run re-logs the steps after its last checkpoint. A folder without it but with
    `METRICS_GZ` (an archived run's reduced log, `clips_jax.experiments.archive`) is read from that; a folder
    with neither gives []."""
    path = Path(workdir) / "metrics.jsonl"
    gz = Path(workdir) / METRICS_GZ
    if path.is_file():
        text = path.read_text()
    elif gz.is_file():
        text = gzip.decompress(gz.read_bytes()).decode("utf-8")
    else:
        return []
    rows = {}
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            if kind is None or r.get("kind") == kind:
                rows[(r.get("kind"), r.get("step"))] = r
    return sorted(rows.values(), key=lambda r: (r.get("step", 0), str(r.get("kind"))))


def write_json(workdir: str | os.PathLike, name: str, doc: Any) -> None:
    """Write `workdir/name` as indented JSON (process 0, atomically)."""
    if jax.process_index() == 0:
        write_text_atomic(Path(workdir) / name, json.dumps(json_safe(doc), indent=1))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def checkpoint_managers(workdir: Path, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    """(last, best) managers of `workdir/checkpoints/{last,best}` (synchronous saves; best by "val_dice")."""
    last = ocp.CheckpointManager(
        (Path(workdir) / "checkpoints" / "last").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False),
    )
    best = ocp.CheckpointManager(
        (Path(workdir) / "checkpoints" / "best").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda m: m["val_dice"],
            best_mode="max",
            keep_checkpoints_without_metrics=False,
            create=True,
            enable_async_checkpointing=False,
        ),
    )
    return last, best


def save_last(mgr: ocp.CheckpointManager, step: int, state, cur_state, meta: dict) -> None:
    """Save the whole training state at `step` (every process takes part)."""
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            curriculum=ocp.args.StandardSave(cur_state),
            meta=ocp.args.JsonSave(json_safe(meta)),
        ),
        force=True,
    )


def read_last_meta(mgr: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The "meta" item (JSON) of `last` checkpoint `step` (default: the latest), without reading its arrays;
    {} when it has none."""
    step = mgr.latest_step() if step is None else step
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}


def restore_last(mgr: ocp.CheckpointManager, state_like, cur_like, sharding) -> tuple[Any, Any, dict]:
    """(state, curriculum state, meta) of the latest `last` checkpoint, placed with `sharding`."""
    restored = mgr.restore(
        mgr.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_arrays(state_like, sharding=sharding)),
            curriculum=ocp.args.StandardRestore(abstract_arrays(cur_like, sharding=sharding)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.curriculum, restored.meta


def save_best(mgr: ocp.CheckpointManager, step: int, weights: dict, val_dice: float) -> None:
    """Save `weights` ({"params", "rest"}: the weights that scored `val_dice`) as a best-validation candidate
    (orbax keeps the best one)."""
    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave({"params": weights["params"], "rest": weights["rest"]})),
        metrics={"val_dice": float(val_dice)},
        force=True,
    )


# ---------------------------------------------------------------------------------------------------------
# A trained run's model
# ---------------------------------------------------------------------------------------------------------


def checkpoint_ema_decay(meta: dict) -> float:
    """The weight-average decay (`optim.ema_decay`) a `last` checkpoint's meta records: from its "schedule"
    settings, or a top-level "ema_decay" (checkpoints of the first version of the average, 2026-12-02), else 0
    (checkpoints from before the average existed hold none)."""
    return float((meta.get("schedule") or {}).get("optim.ema_decay", meta.get("ema_decay", 0.0)))


def _check_checkpoint_decay(mgr: ocp.CheckpointManager, step: int, decay: float, where: Path) -> None:
    """ConfigError when the `last` checkpoint `step` records another weight-average decay than `decay` (the
    config's `optim.ema_decay`): its state would lack the average, or hold one the config does not describe.
    Checkpoints written before the decay was recorded count as 0 (no average)."""
    saved = checkpoint_ema_decay(read_last_meta(mgr, step))
    if saved != decay:
        raise ConfigError(
            f"{where}/{step}: checkpoint written with optim.ema_decay={saved:g}, but the config given has "
            f"{decay:g}; pass the run's own config (its config.json)"
        )


def read_config(run_dir: str | os.PathLike):
    """The ConfigDict of a run (`run_dir/config.json`); ConfigError when missing or unreadable."""
    import ml_collections

    path = Path(run_dir) / "config.json"
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not a training run (no config.json); pass the workdir of `python -m clips_jax.train`"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable run config ({e})") from e


def load_run_model(
    run_dir: str | os.PathLike, which: str = "best", config=None, step: int | None = None, raw: bool = False
) -> tuple[Any, dict]:
    """The trained network of a training run (any format: only its parameters are read).

    Args:
      run_dir: the run's workdir (holds `config.json` and `checkpoints/{best,last}`).
      which: "best": the best-validation checkpoint `checkpoints/best`, or the latest of `checkpoints/last` when
        the run has no best one (it never validated); "last": the latest of `checkpoints/last`.
      config: the run's ConfigDict; default: read from `run_dir/config.json`.
      step: with which="last", that kept training step of `checkpoints/last` instead of the latest.
      raw: with which="last", the trained weights even when the run keeps a weight average.
    Returns:
      (nnx model with the restored parameters, info `{"checkpoint": "best"|"last", "checkpoint_step": int,
      "weights": "average"|"trained"}`). The weights are those validation used: for a run trained with
      `optim.ema_decay` > 0, the bias-corrected weight average (`trainer.averaged_params`; the best checkpoint
      holds it already), unless `raw`.
    Raises:
      ConfigError for an unknown `which`, a missing or unreadable `config.json`, or a run without the requested
      checkpoint (naming the folder and, for a `step` not kept, the steps that are).
    """
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from clips_jax import trainer

    if which not in ("best", "last") or ((step is not None or raw) and which != "last"):
        raise ConfigError(
            f"which={which!r}, step={step!r}, raw={raw!r}: use 'best', or 'last' with an optional step and raw"
        )
    run_dir = Path(run_dir).absolute()
    config = read_config(run_dir) if config is None else config
    model, trainable = trainer.build_training_model(config)
    repl = NamedSharding(trainer.make_mesh(1), P())

    def latest(d: Path):
        return ocp.CheckpointManager(d).latest_step() if d.is_dir() else None

    best_dir, last_dir = run_dir / "checkpoints" / "best", run_dir / "checkpoints" / "last"
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if which == "best" and latest(best_dir) is not None:
        mgr, kind = ocp.CheckpointManager(best_dir), "best"
        step = mgr.best_step() if mgr.best_step() is not None else mgr.latest_step()
    elif latest(last_dir) is not None:
        mgr, kind = ocp.CheckpointManager(last_dir), "last"
        if step is not None and int(step) not in mgr.all_steps():
            raise ConfigError(f"{last_dir}: no checkpoint of step {step} (kept: {sorted(mgr.all_steps())})")
        step = mgr.latest_step() if step is None else int(step)
    else:
        raise ConfigError(
            f"{run_dir}: no {'checkpoint' if which == 'best' else 'last checkpoint'} to load; "
            "train the run first (or check the folder)"
        )
    # Only the model part is read (a partial restore of the "state" item), so optimizer or curriculum states of
    # other formats do not matter.
    decay = trainer.ema_decay_of(config)
    if kind == "last":
        _check_checkpoint_decay(mgr, step, decay, last_dir)
    average = kind == "last" and decay > 0 and not raw
    model_part = {"params": params, "rest": rest}
    if average:
        model_part["ema"] = trainer.weight_average(decay).init(params)
    target = abstract_arrays(model_part, sharding=repl)
    restored = mgr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
        ),
    )
    st = restored.state
    weights = trainer.averaged_params(st["params"], st["ema"], decay) if average else st["params"]
    model = nnx.merge(graphdef, jax.device_get(weights), jax.device_get(st["rest"]))
    info = {"checkpoint": kind, "checkpoint_step": int(step)}
    return model, {**info, "weights": "average" if average or (kind == "best" and decay > 0) else "trained"}
