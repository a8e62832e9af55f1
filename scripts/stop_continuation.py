"""Did runs stopped at a plateau stop too early? Each against its fixed-length continuation.

    .venv/bin/python scripts/stop_continuation.py STOP_RUNS LONG_RUNS [TOLERANCE]

e.g. `scripts/stop_continuation.py docs/results/curriculum_study_stop docs/results/curriculum_study_9000`.

A run of `--config curriculum_study:stop` trains exactly as the first part of the `curriculum_study:long9000`
run of the same experiment and seed (same cap, schedules and seed; validating and checkpointing more often and
stopping do not change training: docs/training.md, point 9), so the long run shows what the stopped run would
have done had it gone on. Not for transfer_teacher: its teacher scores come from the baseline's best-validation
checkpoint, which the two designs may choose differently; its runs are listed but not judged.

STOP_RUNS and LONG_RUNS are comparison workdirs or `--archive` folders (`runs/<experiment>/seed<k>/` with
summary.json and metrics.jsonl[.gz]). Per finished run of STOP_RUNS, read from validation rows only (no test
metric):

- end: the step it ended at (`stopped_at_plateau`, else its `steps`);
- best: its best validation Dice up to `end`;
- shared: how many validation steps up to `end` both runs logged, and the largest |difference| of their Dice
  there (0 when the long run is the continuation it should be);
- later: the long run's best validation Dice after `end`, and gain = later - best;
- too early: gain > TOLERANCE (default 0.01, the per-run plateau rule's tolerance): by the rule's own measure the
  run would still have improved.

Prints a markdown table and a summary; writes nothing. Exit status 0, or 1 when STOP_RUNS holds no finished run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from clips_jax.convergence import TOLERANCE
from clips_jax.experiments.plateau import run_end_step, validation_curve

#: Experiments whose stopped runs are not continuations of their long runs (module docstring).
NOT_CONTINUATIONS = ("transfer_teacher",)


def finished_runs(root: Path) -> dict[tuple[str, int], Path]:
    """{(experiment, seed): run folder} of the runs under `root/runs` that have a summary.json."""
    out = {}
    for summary in sorted(root.glob("runs/*/seed*/summary.json")):
        run = summary.parent
        out[(run.parent.name, int(run.name.removeprefix("seed")))] = run
    return out


def _finite(curve):
    """The (step, Dice) pairs of a trained model (step > 0) with a finite Dice."""
    return [(s, d) for s, d in curve if s > 0 and d is not None and math.isfinite(d)]


def compare(stop_run: Path, long_run: Path | None, tolerance: float = TOLERANCE) -> dict:
    """One stopped run against its continuation (module docstring). Returns {"end", "stopped" (bool), "best",
    "shared" (int), "max_diff", "later", "gain", "too_early" (bool | None: None when not judged)}; NaN where a
    value is not defined (no long run, or no validation after `end`)."""
    steps = int(json.loads((stop_run / "summary.json").read_text())["steps"])
    end = run_end_step(stop_run, steps)
    mine = dict(_finite(validation_curve(stop_run)))
    mine = {s: d for s, d in mine.items() if s <= end}
    best = max(mine.values(), default=float("nan"))
    rec = {"end": end, "stopped": end < steps, "best": best, "shared": 0, "max_diff": float("nan")}
    rec.update(later=float("nan"), gain=float("nan"), too_early=None)
    if long_run is None:
        return rec
    theirs = dict(_finite(validation_curve(long_run)))
    shared = sorted(set(mine) & set(theirs))
    if shared:
        rec.update(shared=len(shared), max_diff=max(abs(mine[s] - theirs[s]) for s in shared))
    after = [d for s, d in theirs.items() if s > end]
    if after:
        later = max(after)
        rec.update(later=later, gain=later - best, too_early=bool(later - best > tolerance))
    return rec


def report(stop_root: Path, long_root: Path, tolerance: float = TOLERANCE) -> list[str]:
    """The table and summary lines for every finished run of `stop_root` (module docstring)."""
    long_runs = finished_runs(long_root)
    lines = [
        f"| experiment | seed | end | best val Dice | shared validations, max abs diff | continuation's best after "
        f"end | gain | stopped too early (> {tolerance}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    judged, early, differ = 0, [], []
    for (name, seed), run in finished_runs(stop_root).items():
        rec = compare(run, long_runs.get((name, seed)), tolerance)
        if name in NOT_CONTINUATIONS:
            verdict = "not judged (no continuation)"
        elif not rec["stopped"]:
            verdict = "trained all its steps"
        elif rec["too_early"] is None:
            verdict = "no continuation found"
        else:
            judged += 1
            verdict = "yes" if rec["too_early"] else "no"
            if rec["too_early"]:
                early.append(f"{name} seed {seed}")
            if not rec["max_diff"] == 0:
                differ.append(f"{name} seed {seed}")
        lines.append(
            f"| {name} | {seed} | {rec['end']} | {rec['best']:.4f} | {rec['shared']}, {rec['max_diff']:.2g} | "
            f"{rec['later']:.4f} | {rec['gain']:+.4f} | {verdict} |"
        )
    lines += [
        "",
        f"- judged: {judged} stopped runs with a continuation; stopped too early: {len(early)}"
        + (f" ({', '.join(early)})" if early else ""),
        f"- continuations whose shared validations differ from the stopped run's: {len(differ)}"
        + (f" ({', '.join(differ)}): not the same training, their gains are not a continuation's" if differ else ""),
    ]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__)
        return 2
    stop_root, long_root = Path(argv[1]), Path(argv[2])
    tolerance = float(argv[3]) if len(argv) == 4 else TOLERANCE
    if not finished_runs(stop_root):
        print(f"{stop_root}: no finished run (runs/<experiment>/seed<k>/summary.json)")
        return 1
    print("\n".join(report(stop_root, long_root, tolerance)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
