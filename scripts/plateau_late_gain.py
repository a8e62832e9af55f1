"""Is a study run's late validation gain real, or the noise of its small validation split?

    .venv/bin/python scripts/plateau_late_gain.py WORKDIR EXPERIMENT SEED [CONFIG] [--average=K] [--raw] [--kept]

e.g. `scripts/plateau_late_gain.py runs/late_gain none 3` (CONFIG default `curriculum_study`, a file of
`clips_jax/configs/`, optionally `name:variant`). Why: the plateau rule (`clips_jax/experiments/plateau.py`)
reads each run's validation Dice on the study's 12 validation cases. When a run "still improves" in its last
20 % of steps, that gain may be real learning or the noise of 12 cases; a larger validation split would only
cure the second. This script tells them apart for one run:

1. trains the run (EXPERIMENT, SEED) as the comparison trains it (`compare_curricula.run_config` over the
   config with `apply_run_defaults(cfg, 0, True)`, i.e. `--steps 0`), but keeps every checkpoint; a run
   finished earlier in WORKDIR/runs/EXPERIMENT/seedSEED is not trained again (an interrupted one resumes), and
   is refused when it was trained with other curriculum, schedule or weight-average settings or lacks a
   checkpoint of a validation step (a `clips-compare` workdir keeps only the last 3: use a workdir of its own,
   or `--kept`, below);
2. builds an independent phantom cohort: the same generator and settings with phantom seed
   `INDEPENDENT_SEED` (cases the study never saw), whose test and validation lesion cases (52 for the study
   config) are the independent set (built-in phantoms only: a config with `data.store` is refused);
3. evaluates every kept checkpoint on the run's own validation split and on the independent set (the
   trainer's validation: `clips_jax.trainer.evaluate_cases`, Dice per lesion case);
4. prints, per checkpoint, both mean Dice; then for each case set the plateau rule on its curve and two
   paired per-case changes of Dice, each with its standard error and 95 % t interval over cases: between the
   rule's own two checkpoints (the best before the last 20 % and the best in it: what the rule's gain
   compares), and from the last checkpoint before the last 20 % to the first one in it (which a dip at the
   boundary checkpoint inflates). The unit is the case: one run, so this says nothing about seeds.

`--average=K` (K >= 2): evaluate instead, at each validation step from the K-th on, the mean of the weights of
the K checkpoints up to it (a running checkpoint average; the first K - 1 steps are left out), to see whether
averaging weights steadies the end of a run without training it again; the file name gets `_avgK`.

`--raw`: for a config that keeps a weight average during training (`optim.ema_decay` > 0, e.g.
`curriculum_study:ema`), evaluate the trained weights of each checkpoint instead of their average (what the
trainer validated); the file name gets `_raw`. Training is the same with or without the average, so the two
files of one run compare the average with the weights it averages, on the same trajectory.

`--kept`: evaluate only the checkpoints a finished run kept, e.g. a run of a `clips-compare` workdir (which keeps
the last 3) that failed the plateau rule, without training it again (an unfinished run is refused). The rule's
own checkpoints may be gone, so instead of the rule the report gives, per case set, the paired per-case change
from the first kept checkpoint to each later one; the file name gets `_kept`.

Writes WORKDIR/late_gain_EXPERIMENT_seedSEED[_avgK][_raw][_kept].json: a list, one entry per checkpoint in step
order, with "step", "val" and "independent" (mean Dice over the lesion cases), "val_cases" and
"independent_cases" (the Dice per case in the stores' split order, test before validation for the independent
set; null for a lesion-free case).
Time on the 2-core development VM: about 11 min of training (beside another process) and 5-10 min of evaluation
per run of the study config.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

#: Phantom seed of the independent cohort (the study's cohort is seed 0).
INDEPENDENT_SEED = 1


def study_config(spec: str):
    """The comparison's base config of `clips_jax/configs/<spec>` (`--steps 0` run defaults), every
    checkpoint kept."""
    import importlib.util

    from clips_jax.configs import config_path
    from clips_jax.experiments import compare_curricula as cc

    path, _, variant = config_path(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("late_gain_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(variant) if variant else module.get_config()
    with cfg.unlocked():
        cc.apply_run_defaults(cfg, 0, True)
        cfg.quiet = True
        cfg.checkpoint.keep = int(math.ceil(cfg.steps / cfg.checkpoint.every_steps)) + 1
    return cfg


def train_run(base, experiment: str, seed: int, run_dir: Path, train: bool = True):
    """Train (or resume) one run of the comparison in `run_dir`; returns (its config, the study's store). A
    finished run is checked, not trained again; with `train` False (`--kept`) an unfinished run is a
    ConfigError naming it."""
    from clips_jax import trainer
    from clips_jax.errors import ConfigError
    from clips_jax.experiments import compare_curricula as cc

    store = trainer.ensure_store(base, print)
    cfg = cc.run_config(base, experiment, seed, store.cache_dir.absolute())
    if cc.run_finished(run_dir, cfg.steps):
        cc.check_run_curriculum(run_dir, cfg)
        cc.check_run_schedule(run_dir, cfg)
    elif not train:
        raise ConfigError(f"{run_dir}: not a finished run of {cfg.steps} steps; --kept evaluates finished runs only")
    else:
        trainer.train_and_evaluate(cfg, run_dir)
    return cfg, store


def run_end(run_dir: Path, cfg) -> int:
    """The step a finished run ended at: `cfg.steps`, or the step the trainer stopped it at a plateau
    (summary.json's `stopped_at_plateau`; `clips_jax.convergence.end_step`)."""
    from clips_jax.experiments.plateau import run_end_step

    return run_end_step(run_dir, int(cfg.steps))


def checkpoint_steps(run_dir: Path, cfg, kept_only: bool = False) -> list[int]:
    """The kept checkpoint steps of `run_dir/checkpoints/last`; ConfigError naming the run when a validation
    step has none (unless `kept_only`) or, with `kept_only`, when fewer than 2 are kept."""
    import orbax.checkpoint as ocp

    from clips_jax.errors import ConfigError

    kept = sorted(ocp.CheckpointManager(run_dir / "checkpoints" / "last").all_steps())
    if kept_only:
        if len(kept) < 2:
            raise ConfigError(f"{run_dir}: --kept needs at least 2 kept checkpoints, found {kept}")
        return kept
    every = int(cfg.eval.every_steps)
    missing = [s for s in range(every, run_end(run_dir, cfg) + 1, every) if s not in kept]
    if missing:
        raise ConfigError(
            f"{run_dir}: no checkpoint of validation step(s) {missing} (kept: {kept}); this script needs every "
            "one: give it a workdir of its own (it keeps them all), not a clips-compare workdir"
        )
    return kept


def independent_cases(base):
    """(store, indices) of the independent set: test + validation cases of the cohort with phantom seed
    INDEPENDENT_SEED (lesion-free ones have no Dice and are left out of the means)."""
    from clips_jax import trainer
    from clips_jax.errors import ConfigError

    if base.data.store:
        raise ConfigError(
            f"data.store={base.data.store!r}: the independent set is a cohort of the built-in phantoms; use a "
            "config without data.store"
        )
    other = base.copy_and_resolve_references()
    with other.unlocked():
        other.data.phantoms.seed = INDEPENDENT_SEED
    store = trainer.ensure_store(other, print)
    return store, np.concatenate([store.split_indices("test"), store.split_indices("val")])


def checkpoint_model(run_dir: Path, cfg, step: int, raw: bool = False):
    """The model of checkpoint `step` of `run_dir/checkpoints/last` (parameters only;
    `clips_jax.runs.load_run_model`): the weights validation used (the weight average when the run keeps one),
    or with `raw` the trained weights."""
    from clips_jax.runs import load_run_model

    return load_run_model(run_dir, "last", config=cfg, step=step, raw=raw)[0]


def average_models(models: list):
    """A model whose floating-point weights are the mean of `models`' (same architecture); integer and other
    leaves are taken from the last model."""
    import jax
    from flax import nnx

    graphdefs, states = zip(*(nnx.split(m) for m in models))

    def mean(*leaves):
        last = np.asarray(leaves[-1])
        if not np.issubdtype(last.dtype, np.floating):
            return leaves[-1]
        return (sum(np.asarray(x, np.float64) for x in leaves) / len(leaves)).astype(last.dtype)

    return nnx.merge(graphdefs[-1], jax.tree.map(mean, *states))


def dice_per_case(model, store, indices, cfg) -> list[float]:
    """Dice of each case (NaN for lesion-free ones), by the trainer's validation."""
    from clips_jax import trainer

    return [float(r["dice"]) for r in trainer.evaluate_cases(model, store, indices, cfg)["cases"]]


def paired_change(before: list[float], after: list[float]) -> str:
    """Mean per-case change after - before over cases with a Dice in both, its s.e. and 95 % t interval."""
    from scipy import stats

    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)  # None (null) -> NaN
    d = d[np.isfinite(d)]
    if d.size < 2:
        return f"not estimable ({d.size} case(s) with a Dice at both steps)"
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(stats.t.ppf(0.975, d.size - 1)) * se
    return f"{d.mean():+.4f} (s.e. {se:.4f}, 95 % CI {d.mean() - half:+.4f} to {d.mean() + half:+.4f}, {d.size} cases)"


def checkpoint_rows(
    run_dir: Path, cfg, store, ind_store, ind_idx, average: int = 1, raw: bool = False, kept_only: bool = False
) -> list[dict]:
    """Per checkpoint of a validation step (`kept_only`: per kept checkpoint; with `average` > 1: per running
    average of that many, from the `average`-th step on; `raw`: `checkpoint_model`'s): {"step", "val" /
    "independent": mean Dice, "val_cases" / "independent_cases": per case, None for a lesion-free case}; printed
    as they come."""
    rows, recent = [], []
    for step in checkpoint_steps(run_dir, cfg, kept_only):
        recent = (recent + [checkpoint_model(run_dir, cfg, step, raw)])[-average:]
        if len(recent) < average:
            continue
        model = recent[0] if average == 1 else average_models(recent)
        own = dice_per_case(model, store, store.split_indices("val"), cfg)
        ind = dice_per_case(model, ind_store, ind_idx, cfg)
        row = {"step": step, "val": float(np.nanmean(own)), "independent": float(np.nanmean(ind))}
        rows.append({**row, "val_cases": _nulls(own), "independent_cases": _nulls(ind)})
        n_ind = int(np.isfinite(ind).sum())
        print(f"step {step:5d}  validation ({len(own)} cases) {row['val']:.4f}  ", end="")
        print(f"independent ({n_ind} lesion cases) {row['independent']:.4f}", flush=True)
    return rows


def _nulls(values: list[float]) -> list[float | None]:
    """NaN -> None, so that the JSON written is standard (null)."""
    return [v if math.isfinite(v) else None for v in values]


def rule_checkpoints(rows: list[dict], key: str, steps: int) -> tuple[int, int] | None:
    """Row indices of the two checkpoints the plateau rule compares on curve `key`: the best before the last
    20 % of steps and the best in it (None when a part is empty)."""
    from clips_jax.experiments.plateau import LAST_FRACTION

    boundary = steps * (1 - LAST_FRACTION)
    before = [i for i, r in enumerate(rows) if r["step"] <= boundary and math.isfinite(r[key])]
    last = [i for i, r in enumerate(rows) if r["step"] > boundary and math.isfinite(r[key])]
    if not before or not last:
        return None
    return max(before, key=lambda i: rows[i][key]), max(last, key=lambda i: rows[i][key])


def report(rows: list[dict], steps: int) -> None:
    """Print, per case set, the plateau rule on its curve and the paired per-case changes (module docstring,
    point 4)."""
    from clips_jax.experiments.plateau import plateau_check

    for key in ("val", "independent"):
        rule = plateau_check([(r["step"], r[key]) for r in rows], steps)
        verdict = "plateaued" if rule["plateaued"] else f"not plateaued: {rule['reason']}"
        print(f"{key}: plateau rule gain {rule['gain']:+.4f} ({verdict})")
        pair = rule_checkpoints(rows, key, steps)
        if pair is None:
            continue
        boundary = max(i for i, r in enumerate(rows) if r["step"] <= rule["boundary_step"])
        for label, (i, j) in (("the rule's checkpoints", pair), ("across the boundary", (boundary, boundary + 1))):
            change = paired_change(rows[i][f"{key}_cases"], rows[j][f"{key}_cases"])
            print(f"  change of Dice per case, {label}, step {rows[i]['step']} to {rows[j]['step']}: {change}")


def report_kept(rows: list[dict]) -> None:
    """Print, per case set, the paired per-case change of Dice from the first kept checkpoint to each later one
    (what `--kept` reports instead of the rule, whose checkpoints may be gone). rows: `checkpoint_rows`' output,
    in step order."""
    for key in ("val", "independent"):
        for later in rows[1:]:
            change = paired_change(rows[0][f"{key}_cases"], later[f"{key}_cases"])
            print(f"{key}: change of Dice per case, step {rows[0]['step']} to {later['step']}: {change}")


def main(argv: list[str]) -> int:
    """Train, evaluate every checkpoint (`--kept`: a finished run's kept ones), print and write the comparison
    (module docstring). Returns 0, or 2 (usage printed) for a wrong number of arguments, a SEED that is not a
    whole number, a bad --average, or --raw with a config that keeps no weight average."""
    from clips_jax.fileio import write_text_atomic
    from clips_jax.trainer import ema_decay_of

    opts = [a for a in argv[1:] if a.startswith("--average=")]
    raw, kept = "--raw" in argv[1:], "--kept" in argv[1:]
    args = [a for a in argv[1:] if not a.startswith("--average=") and a not in ("--raw", "--kept")]
    average = opts[-1].split("=", 1)[1] if opts else "1"
    if len(args) not in (3, 4) or not args[2].isdigit() or not average.isdigit() or int(average) < 1:
        print(__doc__)
        return 2
    workdir, experiment, seed, average = Path(args[0]), args[1], int(args[2]), int(average)
    base = study_config(args[3] if len(args) == 4 else "curriculum_study")
    if raw and not ema_decay_of(base):
        print(
            "--raw: this config keeps no weight average (optim.ema_decay = 0): its checkpoints are the trained "
            f"weights\n{__doc__}"
        )
        return 2
    run_dir = workdir / "runs" / experiment / f"seed{seed}"
    cfg, store = train_run(base, experiment, seed, run_dir, train=not kept)
    ind_store, ind_idx = independent_cases(base)
    rows = checkpoint_rows(run_dir, cfg, store, ind_store, ind_idx, average, raw, kept)
    suffix = (f"_avg{average}" if average > 1 else "") + ("_raw" if raw else "") + ("_kept" if kept else "")
    out = workdir / f"late_gain_{experiment}_seed{seed}{suffix}.json"
    write_text_atomic(out, json.dumps(rows))
    if kept:
        report_kept(rows)
    else:
        report(rows, run_end(run_dir, cfg))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
