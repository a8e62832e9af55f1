"""Is a study run's late validation gain real, or the noise of its small validation split?

    .venv/bin/python scripts/plateau_late_gain.py WORKDIR EXPERIMENT SEED [CONFIG]

e.g. `scripts/plateau_late_gain.py runs/late_gain none 3` (CONFIG default `curriculum_study`, a file of
`clips_jax/configs/`, optionally `name:variant`). Why: the plateau rule (`clips_jax/experiments/plateau.py`)
reads each run's validation Dice on the study's 12 validation cases. When a run "still improves" in its last
20 % of steps, that gain may be real learning or the noise of 12 cases; a larger validation split would only
cure the second. This script tells them apart for one run:

1. trains the run (EXPERIMENT, SEED) as the comparison trains it (`compare_curricula.run_config` over the
   config with `apply_run_defaults(cfg, 0, True)`, i.e. `--steps 0`), but keeps every checkpoint; a run
   finished earlier in WORKDIR/runs/EXPERIMENT/seedSEED is not trained again (an interrupted one resumes);
2. builds an independent phantom cohort: the same generator and settings with phantom seed
   `INDEPENDENT_SEED` (cases the study never saw), whose test and validation lesion cases (52 for the study
   config) are the independent set;
3. evaluates every kept checkpoint on the run's own validation split and on the independent set (the
   trainer's validation: `clips_jax.trainer.evaluate_cases`, Dice per lesion case);
4. prints, per checkpoint, both mean Dice; the plateau rule on both curves; and the paired per-case change
   of Dice from the last checkpoint before the run's last 20 % to the first one in it, with its standard
   error and 95 % t interval over cases (the unit is the case: one run, so this says nothing about seeds).

Writes WORKDIR/late_gain_EXPERIMENT_seedSEED.json (per checkpoint: step, both means, the per-case Dice).
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


def train_run(base, experiment: str, seed: int, run_dir: Path):
    """Train (or resume) one run of the comparison in `run_dir`; returns (its config, the study's store)."""
    from clips_jax import trainer
    from clips_jax.experiments import compare_curricula as cc

    store = trainer.ensure_store(base, print)
    cfg = cc.run_config(base, experiment, seed, store.cache_dir.absolute())
    if not cc.run_finished(run_dir, cfg.steps):
        trainer.train_and_evaluate(cfg, run_dir)
    return cfg, store


def independent_cases(base):
    """(store, indices) of the independent set: test + validation cases of the cohort with phantom seed
    INDEPENDENT_SEED (lesion-free ones have no Dice and are left out of the means)."""
    from clips_jax import trainer

    other = base.copy_and_resolve_references()
    with other.unlocked():
        other.data.phantoms.seed = INDEPENDENT_SEED
    store = trainer.ensure_store(other, print)
    return store, np.concatenate([store.split_indices("test"), store.split_indices("val")])


def checkpoint_model(run_dir: Path, cfg, step: int):
    """The model of checkpoint `step` of `run_dir/checkpoints/last` (parameters only)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from clips_jax import trainer
    from clips_jax.model.checkpoint import abstract_arrays

    model, trainable = trainer.build_training_model(cfg)
    graphdef, params, rest = nnx.split(model, trainable, ...)
    target = abstract_arrays({"params": params, "rest": rest}, sharding=NamedSharding(trainer.make_mesh(1), P()))
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    st = ocp.CheckpointManager(run_dir / "checkpoints" / "last").restore(step, args=ocp.args.Composite(state=args))
    return nnx.merge(graphdef, jax.device_get(st.state["params"]), jax.device_get(st.state["rest"]))


def dice_per_case(model, store, indices, cfg) -> list[float]:
    """Dice of each case (NaN for lesion-free ones), by the trainer's validation."""
    from clips_jax import trainer

    return [float(r["dice"]) for r in trainer.evaluate_cases(model, store, indices, cfg)["cases"]]


def paired_change(before: list[float], after: list[float]) -> str:
    """Mean per-case change after - before over cases with a Dice in both, its s.e. and 95 % t interval."""
    from scipy import stats

    d = np.asarray(after) - np.asarray(before)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return f"not estimable ({d.size} case(s) with a Dice at both steps)"
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(stats.t.ppf(0.975, d.size - 1)) * se
    return f"{d.mean():+.4f} (s.e. {se:.4f}, 95 % CI {d.mean() - half:+.4f} to {d.mean() + half:+.4f}, {d.size} cases)"


def checkpoint_rows(run_dir: Path, cfg, store, ind_store, ind_idx) -> list[dict]:
    """Per kept checkpoint: {"step", "val" / "independent": mean Dice, "val_cases" / "independent_cases": per
    case}; printed as they come."""
    import orbax.checkpoint as ocp

    rows = []
    for step in sorted(ocp.CheckpointManager(run_dir / "checkpoints" / "last").all_steps()):
        model = checkpoint_model(run_dir, cfg, step)
        own = dice_per_case(model, store, store.split_indices("val"), cfg)
        ind = dice_per_case(model, ind_store, ind_idx, cfg)
        row = {"step": step, "val": float(np.nanmean(own)), "independent": float(np.nanmean(ind))}
        rows.append({**row, "val_cases": own, "independent_cases": ind})
        n_ind = int(np.isfinite(ind).sum())
        print(f"step {step:5d}  validation ({len(own)} cases) {row['val']:.4f}  ", end="")
        print(f"independent ({n_ind} lesion cases) {row['independent']:.4f}", flush=True)
    return rows


def report(rows: list[dict], steps: int) -> None:
    """Print the plateau rule on both curves and the paired change across the last 20 %'s boundary."""
    from clips_jax.experiments.plateau import LAST_FRACTION, plateau_check

    before = [i for i, r in enumerate(rows) if r["step"] <= steps * (1 - LAST_FRACTION)]
    for key in ("val", "independent"):
        rule = plateau_check([(r["step"], r[key]) for r in rows], steps)
        verdict = "plateaued" if rule["plateaued"] else f"not plateaued: {rule['reason']}"
        print(f"{key}: plateau rule gain {rule['gain']:+.4f} ({verdict})")
        if before and before[-1] + 1 < len(rows):
            a, b = rows[before[-1]], rows[before[-1] + 1]
            change = paired_change(a[f"{key}_cases"], b[f"{key}_cases"])
            print(f"  change of Dice per case from step {a['step']} to {b['step']}: {change}")


def main(argv: list[str]) -> int:
    """Train, evaluate every checkpoint, print and write the comparison (module docstring). Returns 0, or 2
    (usage printed) for a wrong number of arguments."""
    if len(argv) not in (4, 5):
        print(__doc__)
        return 2
    workdir, experiment, seed = Path(argv[1]), argv[2], int(argv[3])
    base = study_config(argv[4] if len(argv) == 5 else "curriculum_study")
    run_dir = workdir / "runs" / experiment / f"seed{seed}"
    cfg, store = train_run(base, experiment, seed, run_dir)
    ind_store, ind_idx = independent_cases(base)
    rows = checkpoint_rows(run_dir, cfg, store, ind_store, ind_idx)
    out = workdir / f"late_gain_{experiment}_seed{seed}.json"
    out.write_text(json.dumps(rows))
    report(rows, int(cfg.steps))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
