"""Did a training run plateau? The check every run of a curriculum comparison reports.

Why: a comparison of curricula is only about the curricula when every run has trained to the end of its
learning curve. A run stopped while its validation Dice still rises compares how fast curricula learn, not
where they end. The criterion (docs/experiments.md, "A powered, controlled study on phantoms"):

    a run has plateaued when the best validation Dice of its last 20 % of steps is no more than 0.01 above
    the best validation Dice before them, and it validated at least 5 times.

`plateau_check(curve, steps)` (defined in `clips_jax.convergence`, which the trainer's stop-at-plateau shares)
applies it to a validation curve [(step, Dice), ...]; `run_plateau(run_dir)` reads a run's curve from its
`metrics.jsonl`, or an archived run's `metrics.jsonl.gz` (`clips_jax.runs.read_metrics`, the "eval" rows; the
untrained model's step-0 validation is not counted) and its length: the step it stopped at when the trainer
stopped it at a plateau (summary.json), else its `config.json` steps. `plateau_lines` gives the section of the
comparison's results.md: per experiment, then all runs pooled (`pooled_plateau_lines`).
`clips_jax.experiments.compare_curricula` keeps one record per run, also in `WORKDIR/plateau.csv`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from clips_jax.convergence import (  # noqa: F401 - the criterion, re-exported (its users read it here)
    LAST_FRACTION,
    MIN_EVALS,
    TOLERANCE,
    end_step,
    plateau_check,
)

#: The columns of WORKDIR/plateau.csv (one row per run).
PLATEAU_COLUMNS = (
    "curriculum",
    "seed",
    "plateaued",
    "n_evals",
    "best_before",
    "best_last",
    "gain",
    "boundary_step",
    "n_last",
    "reason",
    "last_change",
)


def verdict(record: Mapping) -> bool | None:
    """A `plateau_check` record as True (plateaued), False (still improving) or None (the check could not judge
    the run: too few validations, or none before or in its last part)."""
    if record["plateaued"]:
        return True
    return False if str(record["reason"]).startswith("still improving") else None


def validation_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """[(step, val_dice), ...] of a run, from its metrics.jsonl or archived metrics.jsonl.gz
    (`clips_jax.trainer.read_metrics`, "eval" rows)."""
    from clips_jax.trainer import read_metrics

    return [(int(r["step"]), r.get("val_dice")) for r in read_metrics(run_dir, "eval")]


def run_end_step(run_dir: str | os.PathLike, steps: int) -> int:
    """The step a run folder's run ended at (int): the step its summary.json says the trainer stopped it at a
    plateau, else `steps`, its configured length (also without a readable summary.json)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return end_step(summary, int(steps))


def run_plateau(run_dir: str | os.PathLike, steps: int | None = None, **criterion) -> dict:
    """`plateau_check` of a run folder's validation curve over the run's length: `steps` (default: the run's
    `config.json` steps), or the step the run stopped at when its summary.json says it stopped at a plateau
    (`clips_jax.convergence.end_step`). `criterion`: last_fraction / tolerance / min_evals overrides.
    Returns: the `plateau_check` record plus "end_step" (int: the length it was judged over) and "stopped" (bool:
    the trainer stopped the run at a plateau before `steps`)."""
    if steps is None:
        steps = int(json.loads((Path(run_dir) / "config.json").read_text())["steps"])
    end = run_end_step(run_dir, int(steps))
    curve = [(s, d) for s, d in validation_curve(run_dir) if s <= end]  # no stale rows of a resume past its end
    return {**plateau_check(curve, end, **criterion), "end_step": end, "stopped": end < int(steps)}


def plateau_lines(records: Mapping[str, Mapping[int, Mapping]]) -> list[str]:
    """The "Plateau" section of results.md: per experiment how many runs plateaued, the mean gain of the last
    20 % over the best before, and each run that did not with its reason.

    Args: records: experiment -> seed -> `plateau_check` dict.
    """
    if not records:
        return []
    out = [
        "## Plateau",
        "",
        f"A run has plateaued when the best validation Dice of its last {100 * LAST_FRACTION:g} % of steps is at most "
        f"{TOLERANCE} above the best before, with at least {MIN_EVALS} validations "
        "(`clips_jax/experiments/plateau.py`; per run: plateau.csv).",
        "",
        "| experiment | runs plateaued | best val Dice before (mean) | gain of the last part (mean, max) |",
        "|---|---|---|---|",
    ]
    failures = []
    for name, by_seed in records.items():
        recs = [by_seed[k] for k in sorted(by_seed)]
        ok = sum(bool(r["plateaued"]) for r in recs)
        gains = [r["gain"] for r in recs if math.isfinite(r["gain"])]
        before = [r["best_before"] for r in recs if math.isfinite(r["best_before"])]
        mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
        out.append(
            f"| {name} | {ok}/{len(recs)} | {mean(before):.3f} | "
            + (f"{mean(gains):+.3f}, {max(gains):+.3f}" if gains else "—")
            + " |"
        )
        failures += [f"- {name} seed {k}: {r['reason']}" for k, r in sorted(by_seed.items()) if not r["plateaued"]]
    out.append("")
    if failures:
        out += ["Runs that did not plateau:", "", *failures, ""]
    else:
        out += ["Every run plateaued.", ""]
    return out + _stopped_lines(records) + pooled_plateau_lines(records)


def _stopped_lines(records: Mapping[str, Mapping[int, Mapping]]) -> list[str]:
    """A paragraph on the runs the trainer stopped at a plateau (`stop_at_plateau`; `run_plateau`'s "stopped"),
    or [] when none was: how many, and at which steps. They pass the rule by construction: it is what stopped
    them."""
    recs = [r for by_seed in records.values() for r in by_seed.values()]
    ends = sorted(int(r["end_step"]) for r in recs if r.get("stopped"))
    if not ends:
        return []
    median = statistics.median(ends)
    return [
        f"{len(ends)} of the {len(recs)} runs were stopped at a plateau by the trainer (`stop_at_plateau`), at steps "
        f"{ends[0]} to {ends[-1]} (median {median:g}); they plateaued by construction, since this rule stopped them "
        "(judged over the steps they trained). The other runs trained their full length and were judged over it.",
        "",
    ]


def pooled_plateau_lines(records: Mapping[str, Mapping[int, Mapping]]) -> list[str]:
    """One paragraph on all runs together (results.md, after the per-experiment table), or [] with < 2 seeds.

    A run's gain is one difference of validation maxima, so a few runs cross the tolerance by chance when the
    validation Dice still moves between checkpoints at the end of training; at a true plateau the gain tends to
    be negative (the best of the last validations against the best of more before). This paragraph gives what
    the per-run verdicts cannot: how many runs lost ground, the mean and median gain, a 95 % t interval for the
    mean gain over seeds (the gains are first averaged within each seed, because the runs of one seed share
    their initialisation; it mixes the experiments, so it describes the design, not one curriculum), and the
    s.d. over runs of each run's last checkpoint-to-checkpoint change (`last_change`), the scale a single run's
    gain compares with, and the share of runs called still improving against the share a noise-only plateau
    of that wobble would give (`_wobble_sentence`).

    Args: records: experiment -> seed -> `plateau_check` dict.
    """
    import numpy as np
    from scipy import stats

    recs = [r for by_seed in records.values() for r in by_seed.values()]
    by_seed: dict[int, list[float]] = {}
    for by in records.values():
        for k, r in by.items():
            if math.isfinite(r["gain"]):
                by_seed.setdefault(int(k), []).append(float(r["gain"]))
    if len(by_seed) < 2:
        return []
    gains = np.array([g for v in by_seed.values() for g in v])
    seed_means = np.array([np.mean(v) for v in by_seed.values()])
    half = stats.t.ppf(0.975, seed_means.size - 1) * seed_means.std(ddof=1) / math.sqrt(seed_means.size)
    lo, hi = seed_means.mean() - half, seed_means.mean() + half
    ok = sum(bool(r["plateaued"]) for r in recs)
    verdict = (
        f"below the tolerance ({TOLERANCE}): the mean gain of the last part is smaller than the tolerance"
        if hi < TOLERANCE
        else f"not below the tolerance ({TOLERANCE}): a mean gain above it is not excluded, the runs may be too short"
    )
    changes = np.array([r.get("last_change", float("nan")) for r in recs], float)
    changes = changes[np.isfinite(changes)]
    jitter = (
        f" Between each run's last two validations the validation Dice changed by {changes.std(ddof=1):.3f} "
        f"(s.d. over {changes.size} runs; mean {changes.mean():+.3f}): a single run's gain that exceeds the "
        "tolerance by about that much is comparable to the checkpoint-to-checkpoint change at the end of training."
        + _wobble_sentence(recs, float(changes.std(ddof=1)))
        if changes.size >= 2
        else ""
    )
    return [
        f"All {len(recs)} runs together: {ok} plateaued; {int((gains < 0).sum())} of the {gains.size} runs with a "
        f"measured gain lost ground (a negative gain) in their last {100 * LAST_FRACTION:g} %. "
        f"The gain is {gains.mean():+.3f} on average "
        f"(median {np.median(gains):+.3f}); the 95 % t interval of the mean gain over the {seed_means.size} seeds "
        f"(gains averaged within each seed first) is {lo:+.3f} to {hi:+.3f}, {verdict}.{jitter}",
        "",
    ]


def noise_only_failure_rate(
    n_before: int,
    n_last: int,
    change_sd: float,
    *,
    tolerance: float = TOLERANCE,
    n_sim: int = 20000,
    seed: int = 0,
) -> float:
    """How often the per-run rule would call a run "still improving" if it had truly plateaued and its validation
    Dice only wobbled from checkpoint to checkpoint: the fraction of `n_sim` simulated runs whose best of
    `n_last` validations exceeds the best of `n_before` by more than `tolerance`, each validation being one
    plateau value plus independent normal noise of s.d. change_sd / sqrt(2) (so that the change between two
    validations has s.d. `change_sd`, Dice units).

    A reference for the pooled paragraph, not a test: it treats the checkpoint-to-checkpoint change at the end
    of the runs as pure noise (real late learning in that change makes the rate an overestimate) and the
    validations as independent (successive checkpoints of one run are correlated, which it ignores; that can
    move the rate either way). The validations of `n_before` are all taken to be at the plateau; in a real run
    the early ones are below it, which makes the rule's "best before" lower and its false alarms more frequent
    than this rate says (`_wobble_sentence` therefore gives a range). For n_before = n_last = 1 the rate
    converges to 1 - Phi(tolerance / change_sd) (Monte Carlo s.e. about 0.003 at n_sim = 20000).
    Deterministic in `seed`. Returns a float in [0, 1].
    """
    import numpy as np

    if n_before < 1 or n_last < 1 or not change_sd >= 0:
        raise ValueError(
            f"noise_only_failure_rate: need n_before, n_last >= 1 and change_sd >= 0 (got "
            f"{n_before}, {n_last}, {change_sd})"
        )
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, change_sd / math.sqrt(2.0), size=(int(n_sim), int(n_before) + int(n_last)))
    gain = noise[:, n_before:].max(axis=1) - noise[:, :n_before].max(axis=1)
    return float(np.mean(gain > tolerance))


def _pct(rate: float) -> str:
    """A share in [0, 1] as "12 %" (or "< 1 %")."""
    return "< 1 %" if 0 < rate < 0.005 else f"{100 * rate:.0f} %"


def _wobble_sentence(recs: Sequence[Mapping], change_sd: float) -> str:
    """The pooled paragraph's reference (`noise_only_failure_rate`, averaged over the judged runs with each
    run's own numbers of validations) against the share of runs the rule called still improving; "" when no
    judged run records `n_last`.

    Which validations before the last part were already at the plateau is unknown, so the reference is a range:
    from as many validations just before the last part as in it (a plateau reached late: the higher rate) to
    every validation before it (a plateau from the first validation on: the lower rate)."""
    judged = [r for r in recs if verdict(r) is not None and "n_last" in r]
    if not judged:
        return ""
    rate = functools.cache(lambda n_before, n_last: noise_only_failure_rate(n_before, n_last, change_sd))
    counts = [(int(r["n_evals"]) - int(r["n_last"]), int(r["n_last"])) for r in judged]
    low = sum(rate(b, n) for b, n in counts) / len(counts)
    high = sum(rate(min(b, n), n) for b, n in counts) / len(counts)
    failed = sum(verdict(r) is False for r in judged)
    return (
        " If every run had truly plateaued and its validation Dice only wobbled by that much, independently "
        f"from checkpoint to checkpoint, the rule would call about {_pct(low)} to {_pct(high)} of the runs still "
        "improving (all validations before the last part at the plateau, or only as many as in it; "
        f"`plateau.noise_only_failure_rate`, a rough reference); it called {failed} of {len(judged)} "
        f"({_pct(failed / len(judged))})."
    )


def plateau_csv(records: Mapping[str, Mapping[int, Mapping]]) -> str:
    """WORKDIR/plateau.csv text: PLATEAU_COLUMNS, one row per (experiment, seed)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PLATEAU_COLUMNS)
    for name, by_seed in records.items():
        for k in sorted(by_seed):
            r = by_seed[k]
            num = lambda v: "nan" if not math.isfinite(v) else f"{v:.6g}"  # noqa: E731
            w.writerow(
                [name, k, int(bool(r["plateaued"])), r["n_evals"], num(r["best_before"]), num(r["best_last"])]
                + [num(r["gain"]), f"{r['boundary_step']:g}", r.get("n_last", ""), r["reason"]]
                + [num(r.get("last_change", float("nan")))]
            )
    return buf.getvalue()
