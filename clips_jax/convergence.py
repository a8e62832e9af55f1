"""When has a training run stopped improving? The plateau criterion, in one place.

    a run has plateaued when the best validation Dice of its last 20 % of steps is no more than 0.01 above
    the best validation Dice before them, and it validated at least 5 times.

Why: a comparison of curricula is only about the curricula when every run has trained to the end of its
learning curve (docs/experiments.md, "A powered, controlled study on phantoms"). Two users of the rule:

* the comparison judges each finished run by it (`clips_jax.experiments.plateau`: the per-run check, the
  results.md section and plateau.csv);
* the trainer can stop a run by it (`stop_due`, config group `stop_at_plateau`): at a validation step, once the
  run is past `after_steps` and the rule holds with enough validations in the last 20 %, the run ends there, so
  it plateaued by the same rule the comparison applies afterwards.

A run's length for the rule is the step it ended at (`end_step`): its configured `steps`, or the step it stopped
at. Pure Python; no clips_jax imports (the trainer and the experiments both use it).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

#: The last fraction of the steps whose best validation is compared with the best before it.
LAST_FRACTION = 0.2

#: How much the best validation Dice of the last fraction may exceed the best before (Dice units).
TOLERANCE = 0.01

#: Validations (after step 0) a run needs for the check to pass.
MIN_EVALS = 5


def plateau_check(
    curve: Sequence[tuple[int, float]],
    steps: int,
    *,
    last_fraction: float = LAST_FRACTION,
    tolerance: float = TOLERANCE,
    min_evals: int = MIN_EVALS,
) -> dict:
    """Apply the plateau criterion (module docstring) to one validation curve.

    Args:
      curve: (step, validation Dice) pairs; steps <= 0 (the untrained model) and non-finite Dice are ignored.
      steps: the run's number of training steps (> 0).
      last_fraction, tolerance, min_evals: the criterion's parameters.
    Returns:
      {"plateaued": bool, "n_evals": validations counted, "boundary_step": steps * (1 - last_fraction)
      (validations after it are "last"; "n_last" of them), "best_before", "best_last": the best Dice of each
      part (NaN when the part is empty), "gain": best_last - best_before, "reason": "" when plateaued, else why not,
      "last_change": the last validation's Dice minus the one before it (NaN with fewer than 2): how much the
      validation Dice still moves between checkpoints at the end of the run, to set a single run's gain against}.
    """
    if int(steps) <= 0:
        raise ValueError(f"plateau_check: steps={steps} must be > 0")
    boundary = float(steps) * (1.0 - float(last_fraction))
    pts = sorted((int(s), float(d)) for s, d in curve if int(s) > 0 and d is not None and math.isfinite(float(d)))
    before = [d for s, d in pts if s <= boundary]
    last = [d for s, d in pts if s > boundary]
    best_before = max(before) if before else float("nan")
    best_last = max(last) if last else float("nan")
    gain = best_last - best_before
    if len(pts) < int(min_evals):
        reason = f"{len(pts)} validations (need >= {int(min_evals)})"
    elif not before or not last:
        reason = f"no validation {'before' if not before else 'in the last'} {100 * last_fraction:g} % of the steps"
    elif gain > float(tolerance):
        reason = f"still improving: best of the last {100 * last_fraction:g} % is {gain:+.3f} above the best before"
    else:
        reason = ""
    return {
        "plateaued": reason == "",
        "n_evals": len(pts),
        "boundary_step": boundary,
        "best_before": best_before,
        "best_last": best_last,
        "gain": gain,
        "n_last": len(last),
        "reason": reason,
        "last_change": pts[-1][1] - pts[-2][1] if len(pts) >= 2 else float("nan"),
    }


def stop_due(
    curve: Sequence[tuple[int, float]], step: int, *, after_steps: int, min_last_evals: int, steps: int
) -> bool:
    """Whether a run that has just validated at `step` should stop there (config group `stop_at_plateau`).

    Args:
      curve: the run's (step, validation Dice) pairs so far; points after `step` are ignored.
      step: the training step just completed (1-based: the state after `step` updates).
      after_steps: no stop before this step (e.g. the step at which every curriculum's pacing has reached the whole
        training set, so no run is judged while its curriculum still grows its data).
      min_last_evals: validations the last 20 % of [0, step] must hold (>= 1): how long the run must have
        stayed flat; with validations every p steps the run has been flat for at least (min_last_evals - 1) * p.
      steps: the run's configured length; a run at `steps` ends anyway and is not "stopped".
    Returns: True when `step` < `steps`, `step` >= `after_steps`, the last point of `curve` is a finite Dice at
      `step`, and `plateau_check(curve, step)` holds with at least `min_last_evals` validations in its last part.
    """
    pts = [(int(s), float(d)) for s, d in curve if 0 < int(s) <= int(step) and d is not None and math.isfinite(d)]
    if not pts or max(s for s, _ in pts) != int(step) or not int(after_steps) <= int(step) < int(steps):
        return False
    rec = plateau_check(pts, int(step))
    return bool(rec["plateaued"]) and rec["n_last"] >= max(1, int(min_last_evals))


def can_stop(steps: int, every_steps: int, *, after_steps: int, min_last_evals: int) -> bool:
    """Whether `stop_due` can ever stop a run of `steps` steps validated every `every_steps` steps: does a flat
    validation curve stop at some validation step before `steps`? (False: the settings can never stop a run,
    e.g. `after_steps` >= `steps`, or too few validations for the rule's 5 or for `min_last_evals`.)"""
    if int(every_steps) <= 0:
        return False
    flat = [(s, 0.5) for s in range(int(every_steps), int(steps), int(every_steps))]
    return any(stop_due(flat, s, after_steps=after_steps, min_last_evals=min_last_evals, steps=steps) for s, _ in flat)


def end_step(summary: Mapping, steps: int) -> int:
    """The step a finished run ended at: `summary["stopped_at_plateau"]` (the trainer's summary.json) when the
    run stopped early, else `steps` (its configured length)."""
    stopped = summary.get("stopped_at_plateau")
    return int(stopped) if stopped is not None else int(steps)
