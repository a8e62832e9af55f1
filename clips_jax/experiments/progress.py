"""Where a long comparison stands: `clips-compare ... --status` (`run_states`, `status_lines`).

A powered curriculum study (docs/experiments.md) trains tens of runs over many hours, often as several
processes sharing one workdir and across work periods. `--status`, given the same flags as the study, answers
without training, evaluating or writing anything:

* which runs are finished (in the workdir, or only in the `--archive`, to be restored at the next start), which
  are training and at what step, which have not started, in the order the comparison trains them;
* whether each finished run plateaued (`plateau.py`: its validation Dice only);
* how much training time is left at the pace of the finished runs.

It shows no test metric on purpose: a study's comparisons are read once, when all its runs have finished, so
that nobody stops, extends or reruns a study on what its comparisons show halfway (docs/experiments.md, "The
9000-step study", for a study whose decisions were fixed before its runs finished).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from clips_jax.experiments import plateau
from clips_jax.experiments.compare_curricula import experiment_names, run_finished
from clips_jax.runs import read_metrics


def _wall_s(run_dir: Path) -> float | None:
    """summary.json's training time of the run's last part (seconds), None when unreadable."""
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_step(run_dir: Path) -> int:
    """The last training step a run logged (0 when it logged none)."""
    rows = read_metrics(run_dir, "train")
    return int(rows[-1]["step"]) if rows else 0


def run_state(workdir: Path, archive: Path | None, name: str, seed: int, steps: int) -> dict:
    """The state of one run of a comparison (`run_states` gives every run's).

    Returns {"experiment": name, "seed": seed, "state": "finished" | "training" | "not started", "where":
    "workdir" | "archive" | "" (where its records were read), "step": int (the last logged training step;
    `steps` when finished), "plateau": `plateau.run_plateau`'s record for a finished run, else None,
    "wall_s": float | None (a finished run's training time in seconds, summary.json)}."""
    rel = Path("runs") / name / f"seed{seed}"
    rec = {"experiment": name, "seed": seed, "state": "not started", "where": "", "step": 0}
    rec.update(plateau=None, wall_s=None)
    for where, root in (("workdir", workdir), ("archive", archive)):
        if root is not None and run_finished(root / rel, steps):
            rec.update(state="finished", where=where, step=int(steps), wall_s=_wall_s(root / rel))
            rec["plateau"] = plateau.run_plateau(root / rel, int(steps))
            return rec
    step = _last_step(workdir / rel)
    if step > 0 or (workdir / rel / "metrics.jsonl").is_file():
        rec.update(state="training", where="workdir", step=step)
    return rec


def run_states(
    workdir: str | os.PathLike,
    curricula: Sequence[str],
    seeds: int,
    steps: int,
    *,
    controls: bool = False,
    archive: str | os.PathLike = "",
) -> list[dict]:
    """Every run of a comparison (`experiment_names(curricula, controls)` x seeds 0..seeds-1), seed-major as
    `compare_curricula.run_comparison` trains them; each a `run_state` record. `steps`: the runs' training steps
    (the config's, as the comparison sets them). Reads only; a missing workdir gives runs that have not started.
    A "training" run is one with a metric log but no finished summary: it may be training now in another process,
    or be waiting for the next start to resume."""
    names = experiment_names(curricula, controls)
    arch = Path(archive) if archive else None
    return [run_state(Path(workdir), arch, n, s, int(steps)) for s in range(int(seeds)) for n in names]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _run_line(r: Mapping, steps: int) -> str:
    """One run's table row: experiment, seed, state, step, plateau verdict (gain), training time."""
    verdict, minutes = "", ""
    if r["plateau"] is not None:
        ok = plateau.verdict(r["plateau"])
        label = {True: "yes", False: "no", None: "cannot judge"}[ok]
        gain = r["plateau"]["gain"]
        verdict = f"{label} ({gain:+.3f})" if math.isfinite(gain) else label
    if r["wall_s"] is not None:
        minutes = f"{r['wall_s'] / 60:.0f}"
    state = r["state"] + (" (archive)" if r["where"] == "archive" else "")
    return f"| {r['experiment']} | {r['seed']} | {state} | {r['step']} / {steps} | {verdict} | {minutes} |"


def status_lines(records: Sequence[Mapping], steps: int) -> list[str]:
    """The `--status` report of `run_states` records: a table (one row per run) and a summary (runs finished,
    plateaued and not, the runs that failed the plateau check, the training time left at the finished runs'
    median pace). Markdown lines."""
    lines = [
        "| experiment | seed | state | step | plateaued (gain) | training, min |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_run_line(r, steps) for r in records]
    done = [r for r in records if r["state"] == "finished"]
    judged = [plateau.verdict(r["plateau"]) for r in done]
    failed = [f"{r['experiment']} seed {r['seed']}" for r, v in zip(done, judged) if v is False]
    lines += [
        "",
        f"- finished: {len(done)} of {len(records)} runs; training: "
        f"{sum(r['state'] == 'training' for r in records)}; not started: "
        f"{sum(r['state'] == 'not started' for r in records)}",
        f"- plateaued (`plateau.py`): {judged.count(True)} of {len(done)} finished runs"
        + (f"; still improving: {', '.join(failed)}" if failed else "")
        + (f"; cannot judge: {judged.count(None)}" if None in judged else ""),
    ]
    walls = [r["wall_s"] for r in done if r["wall_s"] is not None]
    if walls:
        pace = statistics.median(walls)
        left = sum((1 - r["step"] / steps) for r in records if r["state"] != "finished") * pace
        lines.append(
            f"- training time left: about {_hours(left)} of one process at the finished runs' median pace "
            f"({pace / 60:.0f} min per run; processes side by side share the machine's cores)"
        )
    return lines
