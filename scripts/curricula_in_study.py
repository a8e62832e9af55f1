"""What each curriculum did inside a comparison's own runs, read back from their metric logs.

    .venv/bin/python scripts/curricula_in_study.py docs/results/curriculum_study_3000 [SEED]

`scripts/curricula_in_loop.py` shows each curriculum in short tiny runs; schedules that depend on the run
length (pacing, CBS's sigma, the bandit's eta: `clips_jax.experiments.presets.curriculum_options`) can only be
checked at a study's own length, in its own runs. This reads the "curriculum" rows (one per sampling stage)
of `RUNS/runs/<experiment>/seed<SEED>/metrics.jsonl[.gz]` (a comparison's workdir or its `--archive` folder;
SEED default 0; a stage logged twice, by a resumed run, counts once) and prints per experiment, at fractions
of the run (the first stage at or after that fraction of the last stage's step):

- support: training cases with non-zero sampling weight (of all training cases, lesion-free ones included);
- n_eff: effective number of cases 1 / sum(w^2);
- easy30 / hard30: sampling mass on the easiest / hardest three difficulty deciles of the lesion cases
  (uniform sampling: about 0.22 each on the phantom study, lesion-free cases taking the rest);
- sigma: CBS's smoothing width (voxels; 0 for curricula without smoothing);

and, for a bandit that draws one difficulty bucket per stage (Exp3.S in "bucket" mode), how often each of the
5 buckets (easiest first) was drawn in each quarter of the run. What to expect is in the module docstring of
`scripts/curricula_in_loop.py` and in docs/curricula.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from clips_jax.runs import read_metrics

FRACTIONS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0)


def curriculum_rows(run: Path) -> list[dict]:
    """The "curriculum" rows of a run's metrics.jsonl (workdir) or metrics.jsonl.gz (archive), in step order, the
    last row per step (`clips_jax.runs.read_metrics`)."""
    return read_metrics(run, "curriculum")


def stage_table(rows: list[dict]) -> list[str]:
    """One line per fraction f of the run: the first stage row at or after step f * (last stage's step)."""
    lines, last = [], rows[-1]["step"]
    for f in FRACTIONS:
        r = next(r for r in rows if r["step"] >= f * last)
        mass = r["decile_mass"]
        lines.append(
            f"  {f:4.0%} step {r['step']:5d}  support {r['n_support']:3d}  n_eff {r['n_eff']:5.1f}  "
            f"easy30 {sum(mass[:3]):.2f}  hard30 {sum(mass[-3:]):.2f}  sigma {r.get('sigma', 0.0):.3f}"
        )
    return lines


def bucket_draws(rows: list[dict], buckets: int = 5) -> list[list[int]]:
    """Per quarter of the run (by step; every stage counted once), how many stages drew each difficulty bucket
    (the bucket of the decile holding the most mass; meaningful only for a curriculum that samples one bucket
    per stage)."""
    last = rows[-1]["step"] + 1
    out = [[0] * buckets for _ in range(4)]
    for r in rows:
        bucket = int(np.argmax(r["decile_mass"])) * buckets // len(r["decile_mass"])
        out[min(3, 4 * r["step"] // last)][bucket] += 1
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    root, seed = Path(argv[1]), int(argv[2]) if len(argv) > 2 else 0
    runs = root / "runs"
    if not runs.is_dir():
        print(f"{root}: no runs/ folder; give a comparison's workdir or its --archive folder", file=sys.stderr)
        return 1
    for exp in sorted(p.name for p in runs.iterdir() if p.is_dir()):
        rows = curriculum_rows(runs / exp / f"seed{seed}")
        if not rows:
            continue
        print(f"{exp} (seed {seed}, {len(rows)} stages)")
        print("\n".join(stage_table(rows)))
        if exp.startswith("exp3s"):
            print("  bucket draws per quarter (easiest bucket first):", bucket_draws(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
