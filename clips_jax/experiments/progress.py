"""Where a long comparison stands: `clips-compare ... --status` (`check_settings`, `run_states`, `status_lines`).

A powered curriculum study (docs/experiments.md) trains tens of runs over many hours, often as several
processes sharing one workdir and across work periods. `--status`, given the same flags as the study, answers
without training, evaluating or writing anything:

* which runs are finished (in the workdir, or only in the `--archive`, to be restored at the next start), which
  are started (a metric log but no finished summary: training now in some process, or waiting for the next
  start to resume) and at what step, which have not started, in the order the comparison trains them;
* whether each finished run plateaued (`plateau.py`, which reads its validation Dice);
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

from clips_jax.errors import ConfigError
from clips_jax.experiments import archive as archive_lib
from clips_jax.experiments import plateau
from clips_jax.experiments.compare_curricula import (
    _settings_key,
    experiment_names,
    recorded_conflicts,
    run_finished,
    run_order,
    teacher_runs,
)


def check_settings(cfg, workdir: str | os.PathLike, archive: str | os.PathLike = "") -> None:
    """Refuse to report on a workdir or archive recorded with settings other than `cfg`'s (the run config as
    the comparison sets it: steps, schedule, data, ...): the report would judge its runs against the wrong
    length. Reads `workdir/experiment.json` and `archive/archive.json` when they exist; writes nothing.
    Raises: ConfigError naming the file and the differing keys."""
    key = _settings_key(cfg)
    files = [Path(workdir) / "experiment.json"] + ([Path(archive) / "archive.json"] if archive else [])
    for path in files:
        diff = recorded_conflicts(path, key)
        if diff:
            raise ConfigError(
                f"{path}: recorded with other settings ({', '.join(diff[:5])}); give --status the study's own "
                "flags (--config, --steps and any --config.KEY=... it was started with)"
            )


def _summary(run_dir: Path) -> dict:
    """A run's summary.json ({} when unreadable)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _last_step(run_dir: Path) -> int:
    """The last training step in a run's metrics.jsonl (0 without one). The log may be being appended to by
    another process: lines that do not parse (a half-written last line) are skipped."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            return int(row["step"])
    return 0


def _finished_record(rec: dict, run_dir: Path, where: str, steps: int) -> dict:
    """`rec` filled in for a finished run read from `run_dir` ("workdir" or "archive")."""
    summary = _summary(run_dir)
    plat = plateau.run_plateau(run_dir, int(steps))
    rec.update(state="finished", where=where, step=plat["end_step"], plateau=plat, stopped=plat["stopped"])
    rec.update(wall_s=summary.get("wall_s"), start_step=int(summary.get("start_step", 0)))
    return rec


def run_state(workdir: Path, archive: Path | None, name: str, seed: int, steps: int, model: bool = False) -> dict:
    """The state of one run of a comparison (`run_states` gives every run's); reads only.

    Args: workdir, archive: the comparison's folders (archive None: none); name, seed: the run; steps: its
      training steps; model: the run is the transfer teacher's, restored from the archive only with its model.
    Returns: {"experiment": name, "seed": seed, "state": "finished" | "started" | "not started", "where":
      "workdir" | "archive" | "" (where its records were read: an archived run is restored at the next start),
      "step": int (the last logged training step; when finished, `steps` or the step it stopped at by
      `stop_at_plateau`: `plateau.run_end_step`), "stopped": bool (finished before `steps` at a plateau),
      "plateau": `plateau.run_plateau`'s record for a finished run, else None, "wall_s": float | None
      (summary.json: the training time in seconds of the process that finished the run), "start_step": int (the
      step that process started from: 0 unless the run was resumed)}."""
    rec = {"experiment": name, "seed": seed, "state": "not started", "where": "", "step": 0, "plateau": None}
    rec.update(wall_s=None, start_step=0, stopped=False)
    run_dir = archive_lib.run_path(workdir, name, seed)
    if run_finished(run_dir, steps):
        return _finished_record(rec, run_dir, "workdir", steps)
    src = archive_lib.run_path(archive, name, seed) if archive is not None else None
    if src is not None and archive_lib.restorable(archive, workdir, name, seed, model) and run_finished(src, steps):
        return _finished_record(rec, src, "archive", steps)
    if (run_dir / "metrics.jsonl").is_file():
        rec.update(state="started", where="workdir", step=min(_last_step(run_dir), int(steps)))
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
    """Every run of a comparison (`experiment_names(curricula, controls)` x seeds 0..seeds-1) in the order it
    trains them (`run_order`); each a `run_state` record. `steps`: the runs' training steps (the config's, as
    the comparison sets them). Reads only; a missing workdir gives runs that have not started."""
    names = experiment_names(curricula, controls)
    arch = Path(archive) if archive else None
    teacher = set(teacher_runs(names))
    return [run_state(Path(workdir), arch, n, k, int(steps), (n, k) in teacher) for n, k in run_order(names, seeds)]


def _run_line(r: Mapping, steps: int) -> str:
    """One run's table row: experiment, seed, state, step, plateau verdict (gain), training time."""
    verdict, minutes = "", ""
    if r["plateau"] is not None:
        label = {True: "yes", False: "no", None: "cannot judge"}[plateau.verdict(r["plateau"])]
        gain = r["plateau"]["gain"]
        verdict = f"{label} ({gain:+.3f})" if math.isfinite(gain) else label
    if r["wall_s"] is not None:
        minutes = f"{r['wall_s'] / 60:.0f}" + (f" (from step {r['start_step']})" if r["start_step"] else "")
    state = r["state"] + (" (archive)" if r["where"] == "archive" else "") + (" (at a plateau)" if r["stopped"] else "")
    return f"| {r['experiment']} | {r['seed']} | {state} | {r['step']} / {steps} | {verdict} | {minutes} |"


def _time_left_line(records: Sequence[Mapping], steps: int) -> str:
    """The training time left: the unfinished steps at the median pace of the finished runs (a resumed run's
    pace from the steps its last process trained; a run stopped at a plateau from the steps it trained). Runs
    that may stop at a plateau make it an upper bound, said so once a finished run has stopped early."""
    paces = [
        r["wall_s"] / (r["step"] - r["start_step"])
        for r in records
        if r["state"] == "finished" and r["wall_s"] is not None and r["start_step"] < r["step"]
    ]
    if not paces:
        return "- training time left: not known until a run has finished"
    pace = statistics.median(paces)  # seconds per step
    left = sum(steps - r["step"] for r in records if r["state"] != "finished") * pace
    return (
        f"- training time left: about {left / 3600:.1f} h of process time at the finished runs' median pace "
        f"({pace * steps / 60:.0f} min per run, at the pace of the processes that trained them); with N such "
        "processes side by side about 1/N of it elapses"
        + (
            "; an upper bound, since runs stop at a plateau before their last step"
            if any(r["stopped"] for r in records)
            else ""
        )
    )


def status_lines(records: Sequence[Mapping], steps: int) -> list[str]:
    """The `--status` report of `run_states` records: a table (one row per run) and a summary (runs finished,
    plateaued and not, the runs that failed the plateau check, the training time left). Markdown lines."""
    lines = [
        "| experiment | seed | state | step | plateaued (validation Dice gain) | training, min |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_run_line(r, steps) for r in records]
    done = [r for r in records if r["state"] == "finished"]
    judged = [plateau.verdict(r["plateau"]) for r in done]
    failed = [f"{r['experiment']} seed {r['seed']}" for r, v in zip(done, judged) if v is False]
    count = {s: sum(r["state"] == s for r in records) for s in ("started", "not started")}
    lines += [
        "",
        f"- finished: {len(done)} of {len(records)} runs; started: {count['started']}; not started: "
        f"{count['not started']}",
        f"- plateaued (`plateau.py`): {judged.count(True)} of {len(done)} finished runs"
        + (f"; still improving: {', '.join(failed)}" if failed else "")
        + (f"; cannot judge: {judged.count(None)}" if None in judged else ""),
        _time_left_line(records, steps),
    ]
    return lines
