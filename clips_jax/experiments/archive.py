"""Carry a long comparison across machines: the small records of its finished runs, kept in an archive folder.

A curriculum study (`clips-compare`, docs/experiments.md) takes hours. Its workdir holds every run's
checkpoints (~8 MB each) and full metric logs (~0.9 MB each); when that folder may not survive (a scratch
disk wiped between jobs, a lent machine handed back), `clips-compare --archive DIR` keeps in DIR, as each run
finishes, only what the comparison reads from it, and the comparison's outputs when it ends:

    DIR/archive.json                          the comparison's settings (another comparison's are refused)
    DIR/runs/<experiment>/seed<k>/summary.json       the trainer's summary (its "steps" marks the run finished)
    DIR/runs/<experiment>/seed<k>/test_metrics.csv   the per-patient test metrics
    DIR/runs/<experiment>/seed<k>/metrics.jsonl.gz   the metric log without its per-case detail: "eval" rows
                                                      whole, "train" rows' scalars, "curriculum" rows' summaries
    DIR/runs/none/seed0/checkpoints/best/     the transfer teacher's model (only when that curriculum is compared)
    DIR/results.md, results.csv, plateau.csv, hardness.csv, teacher_scores.csv, learning_curves.png, boxplots.png

When a comparison starts with `--archive`, the records of archived runs that its workdir lacks are copied in
(`restore`), so those runs count as finished and are skipped; results computed from them are those of an
uninterrupted comparison (the same test rows, validation curves and training losses). A run that was not
finished when the workdir was lost is trained again from its first step (its partial checkpoints are not
archived; the same config gives the same run: docs/experiments.md, "Recorded results of the default run").

Nothing here names a machine's path: the archive can be committed with the study it records.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from clips_jax.errors import ConfigError
from clips_jax.fileio import atomic_dir, atomic_path, write_text_atomic

#: Files of a finished run copied as they are.
RUN_FILES = ("summary.json", "test_metrics.csv")
#: The run's metric log in the archive (gzip of the reduced JSON lines).
METRICS_GZ = "metrics.jsonl.gz"
#: Scalar fields kept from "train" rows (the learning curves read "loss"; the rest is cheap context).
TRAIN_FIELDS = ("kind", "step", "loss", "grad_norm", "finite", "lr", "sigma")
#: Per-case lists dropped from "curriculum" rows (the per-case sampling weights: 1-2 kB per stage).
CURRICULUM_DROP = ("weights",)
#: Workdir-level outputs of a comparison kept in the archive when it ends.
OUTPUTS = (
    "results.md",
    "results.csv",
    "plateau.csv",
    "hardness.csv",
    "hardness.json",
    "teacher_scores.csv",
    "learning_curves.png",
    "boxplots.png",
)


def reduce_metrics(lines: Iterable[str]) -> list[dict]:
    """The rows of a run's metrics.jsonl that the archive keeps: "eval" rows whole, "train" rows' scalar
    fields (`TRAIN_FIELDS`), "curriculum" rows without their per-case weights, other kinds dropped.

    Args: lines: the lines of `metrics.jsonl` (JSON objects; blank lines ignored).
    Returns: the reduced rows, in order.
    """
    out = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        kind = row.get("kind")
        if kind == "eval":
            out.append(row)
        elif kind == "train":
            out.append({k: row[k] for k in TRAIN_FIELDS if k in row})
        elif kind == "curriculum":
            out.append({k: v for k, v in row.items() if k not in CURRICULUM_DROP})
    return out


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


#: orbax's marker files in a checkpoint; their text names the folder the checkpoint was written to.
ORBAX_MARKER = "commit_success.txt"


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy an orbax checkpoint folder atomically, with the text of its commit markers (informational: orbax
    reads only that they exist) replaced by one that names no machine path."""
    with atomic_dir(dst, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for marker in tmp.rglob(ORBAX_MARKER):
            marker.write_text("Checkpoint commit was successful (copied by clips_jax.experiments.archive)")


def save_run(run_dir: str | os.PathLike, dest: str | os.PathLike, *, checkpoint: bool = False) -> None:
    """Archive one finished run: `RUN_FILES`, the reduced metric log (`METRICS_GZ`) and, with `checkpoint`,
    its `checkpoints/best` folder (`_copy_checkpoint`). Each file is written atomically; summary.json last, so
    an archived run whose summary is present is complete.

    Args: run_dir: the run's workdir (a finished run: summary.json, test_metrics.csv, metrics.jsonl);
      dest: its folder in the archive (`DIR/runs/<experiment>/seed<k>`).
    Raises: ConfigError naming the file when the run lacks one of them.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    for name in (*RUN_FILES, "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: missing; only a finished, evaluated run can be archived")
    rows = reduce_metrics((run_dir / "metrics.jsonl").read_text().splitlines())
    with atomic_path(dest / METRICS_GZ) as tmp:
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime 0: the same run gives the same bytes
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    if checkpoint:
        _copy_checkpoint(run_dir / "checkpoints" / "best", dest / "checkpoints" / "best")
    _copy_file(run_dir / "test_metrics.csv", dest / "test_metrics.csv")
    _copy_file(run_dir / "summary.json", dest / "summary.json")


def restore_run(src: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Copy an archived run (`save_run`'s folder) into an empty or unfinished run folder: its files, its
    metric log as `metrics.jsonl`, its checkpoint if archived. summary.json is written last."""
    src, run_dir = Path(src), Path(run_dir)
    with gzip.open(src / METRICS_GZ, "rt") as f:
        write_text_atomic(run_dir / "metrics.jsonl", f.read())
    if (src / "checkpoints" / "best").is_dir():
        _copy_checkpoint(src / "checkpoints" / "best", run_dir / "checkpoints" / "best")
    _copy_file(src / "test_metrics.csv", run_dir / "test_metrics.csv")
    _copy_file(src / "summary.json", run_dir / "summary.json")


def open_archive(archive: str | os.PathLike, settings: Mapping, conflicts: Callable[[Mapping, Mapping], list]) -> Path:
    """Create `archive/archive.json` with `settings`, or check that an existing one has the same.

    Args: archive: the archive folder; settings: what identifies the comparison (config settings key, store
      name, curricula, seeds, hardness); conflicts: (old, new) -> differing keys (`settings_conflicts`).
    Returns: the archive folder as a Path.
    Raises: ConfigError when the archive holds another comparison (results of different settings must not mix).
    """
    archive = Path(archive)
    path = archive / "archive.json"
    if path.is_file():
        old = json.loads(path.read_text())
        old_key, new_key = json.loads(old.get("settings_key", "{}")), json.loads(settings["settings_key"])
        diff = conflicts(old_key, new_key) + [k for k in ("store",) if old.get(k) != settings.get(k)]
        if diff:
            raise ConfigError(
                f"{path}: this archive holds a comparison with other settings ({', '.join(diff[:5])}); use "
                "another --archive folder (results of different settings must not be mixed)"
            )
    write_text_atomic(path, json.dumps(dict(settings), indent=1, sort_keys=True) + "\n")
    return archive


def restore(archive: str | os.PathLike, workdir: str | os.PathLike, names: Sequence[str], seeds: int) -> list[str]:
    """Copy into `workdir/runs/` every archived run of `names` x seeds 0..`seeds`-1 that the workdir has not
    finished (no summary.json there). Returns the "<experiment>/seed<k>" restored."""
    archive, workdir = Path(archive), Path(workdir)
    done = []
    for name in names:
        for seed in range(int(seeds)):
            rel = Path(name) / f"seed{seed}"
            src, dst = archive / "runs" / rel, workdir / "runs" / rel
            if (src / "summary.json").is_file() and not (dst / "summary.json").is_file():
                restore_run(src, dst)
                done.append(rel.as_posix())
    return done


def save_outputs(workdir: str | os.PathLike, archive: str | os.PathLike) -> list[str]:
    """Copy the comparison's outputs (`OUTPUTS`, those present) from `workdir` into `archive`; returns their
    names."""
    workdir, archive = Path(workdir), Path(archive)
    saved = [n for n in OUTPUTS if (workdir / n).is_file()]
    for n in saved:
        _copy_file(workdir / n, archive / n)
    return saved
