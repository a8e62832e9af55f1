"""Each curriculum inside the real training loop, read back from the run's own records (not the function alone).

    .venv/bin/python scripts/curricula_in_loop.py [WORKDIR]      # ~10 min on 2 CPU cores (tiny phantoms)

Trains the tiny built-in config (`default:tiny`, here with 20 phantoms) for 40 steps in stages of 4 with each
curriculum below (the options a comparison gives it, `presets.curriculum_options`) and prints, per stage, what
the run's `metrics.jsonl` "curriculum" rows say (support, effective count, mass on the easiest and hardest
difficulty halves) and, from the last checkpoint, the curriculum state. What
each paper describes, and what to look for:

- predefined (Bengio et al. 2009; root pacing of Platanios et al. 2019): easy cases first, the support grows
  with the pacing until it covers every case;
- anti: the same pacing from the hard end;
- self-paced (Kumar et al. 2010, hard regulariser): only cases whose (moving-average) loss is below the
  threshold are drawn, the threshold grows, so the selected cases have the lower losses;
- Exp3.S (Graves et al. 2017): one bandit round per finished stage (t = finished stages), the policy moves
  towards the buckets with larger prediction gain;
- curriculum by smoothing (Sinha et al. 2020): sigma decays stepwise from sigma0.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

STEPS, STAGE_STEPS, CASES = 40, 4, 20


def _run(name: str, workdir: Path, cache: Path) -> Path:
    """Train experiment `name` (`presets.EXPERIMENTS`: its preset and the options a comparison gives it)."""
    import ml_collections

    from clips_jax import trainer
    from clips_jax.configs import default
    from clips_jax.experiments import presets

    cfg = default.get_config("tiny")
    cfg.data.phantoms.cache = str(cache)
    cfg.data.phantoms.cases = CASES
    cfg.quiet = True
    cfg.num_devices = 1
    cfg.steps = STEPS
    cfg.curriculum.name = presets.EXPERIMENTS[name].preset
    cfg.curriculum.stage_steps = STAGE_STEPS
    cfg.curriculum.steps_per_epoch = STAGE_STEPS
    opts = presets.curriculum_options(name, STEPS, STAGE_STEPS, 0, stage_steps=STAGE_STEPS)
    cfg.curriculum.options = ml_collections.ConfigDict(opts)
    cfg.eval.every_steps = 0
    cfg.eval.at_start = False
    cfg.checkpoint.every_steps = STEPS
    run = workdir / name
    trainer.train_and_evaluate(cfg, run)
    return run


def _state(run: Path):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((run / "checkpoints" / "last").absolute())
    return mgr.restore(mgr.latest_step(), args=ocp.args.Composite(curriculum=ocp.args.StandardRestore())).curriculum


def main() -> int:
    from clips_jax import runs

    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="curricula_in_loop_"))
    cache = workdir / "cache"
    for name in ("predefined", "anti", "self_paced_hard", "exp3s", "cbs"):
        run = _run(name, workdir, cache)
        print(f"== {name}")
        for r in runs.read_metrics(run, "curriculum"):
            m = np.asarray(r["decile_mass"])
            print(
                f"  stage {r['stage']}: support {r['n_support']}, n_eff {r['n_eff']:.2f}, easy half "
                f"{m[:5].sum():.2f}, hard half {m[5:].sum():.2f}, lesion-free {r['negative_mass']:.2f}"
            )
        train = runs.read_metrics(run, "train")
        state = _state(run)
        if name == "cbs":
            print("  sigma by step:", [round(float(t["sigma"]), 3) for t in train])
        if name == "exp3s":
            print(
                f"  bandit rounds t = {int(state['t'])} (finished stages: {STEPS // STAGE_STEPS - 1} before the last)"
                f", policy over buckets: {np.round(np.asarray(state['pi']), 3).tolist()}"
            )
        if name == "self_paced_hard":
            losses = np.asarray(state["losses"])
            last = runs.read_metrics(run, "curriculum")[-1]
            print("  moving-average losses per case:", np.round(losses, 3).tolist())
            print("  last stage's weights per case: ", np.round(np.asarray(last["weights"]), 3).tolist())
    print(f"runs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
