"""Draw what each curriculum did over a real (short) training run on phantoms, for docs/curricula.md.

    .venv/bin/python scripts/curriculum_plots.py --out docs/img --workdir runs/curriculum_plots [--steps 60]

For each curriculum it trains the tiny U-Net of `clips_jax/configs/default.py:tiny` on tiny phantoms with the sampling
weights recomputed every 2 steps, then plots the logged rows (`kind="curriculum"` in metrics.jsonl: mass per
difficulty decile, effective number of cases, sigma) with `clips_jax.curricula.plot_curriculum`.
"""

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from clips_jax import curricula, trainer  # noqa: E402
from clips_jax.configs import default  # noqa: E402

CURRICULA = ["predefined_composite_root", "baby_step", "anti", "self_paced_hard", "exp3s", "cbs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--workdir", default="runs/curriculum_plots")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--curricula", default=",".join(CURRICULA))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.curricula.split(","):
        cfg = default.get_config("tiny")
        cfg.steps = args.steps
        cfg.quiet = True
        cfg.data.phantoms.cache = args.cache
        cfg.data.phantoms.cases = 12
        cfg.curriculum.name = name
        cfg.curriculum.steps_per_epoch = 2
        cfg.curriculum.stage_steps = 2
        cfg.eval.every_steps = 0
        cfg.eval.at_start = False
        cfg.checkpoint.every_steps = args.steps
        with cfg.unlocked():
            opts = {"grow_epochs": args.steps // 4} if name.startswith(("predefined", "anti", "baby")) else {}
            if name == "cbs":
                opts = {"sigma_every_epochs": 2}
            cfg.curriculum.options = opts
        wd = pathlib.Path(args.workdir) / name
        s = trainer.train_and_evaluate(cfg, wd)
        rows = trainer.read_metrics(wd, "curriculum")  # one row per stage: deciles, n_eff, sigma
        path = out / f"curriculum_{name}.png"
        curricula.plot_curriculum(rows, path)
        print(f"{name}: {s['steps']} steps, {s['wall_s']} s -> {path}")


if __name__ == "__main__":
    main()
