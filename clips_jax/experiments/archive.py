"""Carry a long comparison across machines: the small records of its finished runs, kept in an archive folder.

A curriculum study (`clips-compare`, docs/experiments.md) takes hours. Its workdir holds every run's
checkpoints (~8 MB each) and full metric logs (~0.9 MB each); when that folder may not survive (a scratch
disk wiped between jobs, a lent machine handed back), `clips-compare --archive DIR` keeps in DIR, as each run
finishes, only what the comparison reads from it, and the comparison's outputs when it ends:

    DIR/archive.json                          the comparison's settings (another comparison's are refused)
    DIR/runs/<experiment>/seed<k>/summary.json       the trainer's summary (its "steps" marks the run finished)
    DIR/runs/<experiment>/seed<k>/test_metrics.csv   the per-patient test metrics
    DIR/runs/<experiment>/seed<k>/metrics.jsonl.gz   the metric log without the training batches' case lists
                                                      and the sampling weights: "eval" rows whole (with their
                                                      per-case validation metrics), "train" rows' scalars,
                                                      "curriculum" rows' summaries
    DIR/runs/none/seed0/checkpoints/best/     the transfer teacher's model (when that curriculum is compared)
    DIR/results.md, results.csv, plateau.csv, hardness.csv, hardness.json, teacher_scores.csv,
        learning_curves.png, boxplots.png     (paths inside the current directory written relative to it)

When a comparison starts with `--archive`, the archived runs that its workdir lacks are copied in (`restore`),
so those runs count as finished and are skipped; results computed from them are those of an uninterrupted
comparison on the same kind of machine (the same test rows, validation curves and training losses). A run that
was not finished when the workdir was lost is trained again from its first step (its partial checkpoints are
not archived; the same config on the same machine gives the same run: docs/experiments.md, "Recorded results of
the default run"). A restored run folder holds only these records: it cannot serve as `--hardness run:DIR` or a
teacher's run (no config.json or checkpoint), except the transfer teacher's own.

Nothing in a run's records or in archive.json names a machine's path: the archive can be committed with the
study it records.
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
from clips_jax.runs import METRICS_GZ  # the run's metric log in the archive; runs.read_metrics reads it too

#: Files of a finished run copied as they are.
RUN_FILES = ("summary.json", "test_metrics.csv")
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
    """Copy an orbax checkpoint folder into `dst` (a folder being assembled), with the text of its commit
    markers (informational: orbax reads only that they exist) replaced by one that names no machine path."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for marker in dst.rglob(ORBAX_MARKER):
        marker.write_text("Checkpoint commit was successful (copied by clips_jax.experiments.archive)")


def _gzip_lines(rows: Sequence[Mapping], path: Path) -> None:
    """Write `rows` as JSON lines, gzipped with no file name or time in the header (the same rows give the
    same bytes)."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0))


def save_run(run_dir: str | os.PathLike, dest: str | os.PathLike, *, checkpoint: bool = False) -> bool:
    """Archive one finished run: `RUN_FILES`, the reduced metric log (`METRICS_GZ`) and, with `checkpoint`,
    its `checkpoints/best` folder when it has one. The run's archive folder is assembled aside and renamed into
    place (an archived run is complete or absent); an archived run is replaced.

    Args: run_dir: the run's workdir (a finished run: summary.json, test_metrics.csv, metrics.jsonl);
      dest: its folder in the archive (`DIR/runs/<experiment>/seed<k>`); checkpoint: also keep its model.
    Returns: whether a checkpoint was archived.
    Raises: ConfigError naming the file when the run lacks one of them.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    for name in (*RUN_FILES, "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: missing; only a finished, evaluated run can be archived")
    best = run_dir / "checkpoints" / "best"
    with atomic_dir(dest, overwrite=True) as tmp:
        _gzip_lines(reduce_metrics((run_dir / "metrics.jsonl").read_text().splitlines()), tmp / METRICS_GZ)
        for name in RUN_FILES:
            shutil.copyfile(run_dir / name, tmp / name)
        if checkpoint and best.is_dir():
            _copy_checkpoint(best, tmp / "checkpoints" / "best")
    return checkpoint and best.is_dir()


def has_checkpoint(dest: str | os.PathLike) -> bool:
    """Whether an archived run (`save_run`'s folder) keeps its model (`checkpoints/best`)."""
    return (Path(dest) / "checkpoints" / "best").is_dir()


def restore_run(src: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Copy an archived run (`save_run`'s folder) to `run_dir`, which must not exist: its files, its metric log
    as `metrics.jsonl`, its checkpoint if archived. The folder is assembled aside and renamed into place, so a
    crash leaves no half-restored run.

    Args: src: the archived run's folder; run_dir: the run's folder in the workdir.
    Raises: FileExistsError if `run_dir` exists (an unfinished run there resumes from its own checkpoint).
    """
    src, run_dir = Path(src), Path(run_dir)
    with atomic_dir(run_dir) as tmp:
        (tmp / "metrics.jsonl").write_bytes(gzip.decompress((src / METRICS_GZ).read_bytes()))
        for name in RUN_FILES:
            shutil.copyfile(src / name, tmp / name)
        if has_checkpoint(src):
            _copy_checkpoint(src / "checkpoints" / "best", tmp / "checkpoints" / "best")


def _identity(settings: Mapping) -> dict:
    return {k: settings[k] for k in ("settings_key", "store", "store_cases") if k in settings}


def open_archive(archive: str | os.PathLike, settings: Mapping, conflicts: Callable[[Mapping, Mapping], list]) -> Path:
    """Create `archive/archive.json` with `settings`, or check that an existing one has the same.

    Args: archive: the archive folder; settings: what identifies the comparison: "settings_key" (the config
      as JSON, `compare_curricula._settings_key`), "store" (the case store's folder name), "store_cases" (a
      fingerprint of its cases and splits); conflicts: (old, new) config dicts -> differing keys
      (`compare_curricula.settings_conflicts`). Keys missing on one side are not compared.
    Returns: the archive folder as a Path.
    Raises: ConfigError when the archive holds another comparison (results of different settings must not mix).
    """
    archive = Path(archive)
    path = archive / "archive.json"
    new = _identity(settings)
    if path.is_file():
        old = _identity(json.loads(path.read_text()))
        diff = conflicts(json.loads(old.get("settings_key", "{}")), json.loads(new["settings_key"]))
        diff += [k for k in ("store", "store_cases") if k in old and k in new and old[k] != new[k]]
        if diff:
            raise ConfigError(
                f"{path}: this archive holds a comparison with other settings ({', '.join(diff[:5])}); use "
                "another --archive folder (results of different settings must not be mixed)"
            )
        new = {**old, **new}
    write_text_atomic(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
    return archive


def run_path(root: str | os.PathLike, experiment: str, seed: int) -> Path:
    """`root/runs/<experiment>/seed<k>`: a run's folder in a comparison's workdir or in its archive."""
    return Path(root) / "runs" / experiment / f"seed{int(seed)}"


def restorable(archive: str | os.PathLike, workdir: str | os.PathLike, experiment: str, seed: int, model: bool) -> bool:
    """Whether `restore` would copy this run into the workdir: it is archived (summary.json), the workdir has no
    folder for it (finished or not), and, when `model` (the transfer teacher's run), its model is archived too."""
    src = run_path(archive, experiment, seed)
    if not (src / "summary.json").is_file() or run_path(workdir, experiment, seed).exists():
        return False
    return has_checkpoint(src) or not model


def restore(
    archive: str | os.PathLike,
    workdir: str | os.PathLike,
    runs: Iterable[tuple[str, int]],
    needs_checkpoint: Iterable[tuple[str, int]] = (),
) -> list[str]:
    """Copy into `workdir/runs/` the archived runs that the workdir does not have at all.

    Args: archive: the archive folder; workdir: the comparison's workdir; runs: (experiment, seed) pairs
      wanted; needs_checkpoint: pairs restored only when their model was archived too (the transfer teacher's
      run: restored without it, it would count as finished with no model to score with; left out, it is
      trained again).
    Returns: the "<experiment>/seed<k>" restored. A run folder already in the workdir, finished or not, is
      left as it is (an unfinished one resumes from its own checkpoint).
    """
    needs = {(n, int(k)) for n, k in needs_checkpoint}
    done = []
    for name, seed in dict.fromkeys((n, int(k)) for n, k in runs):
        if restorable(archive, workdir, name, seed, model=(name, seed) in needs):
            restore_run(run_path(archive, name, seed), run_path(workdir, name, seed))
            done.append(f"{name}/seed{seed}")
    return done


#: Files among OUTPUTS whose text may name paths (made relative to the current directory in the archive).
_TEXT_OUTPUTS = (".md", ".csv", ".json")


def save_outputs(workdir: str | os.PathLike, archive: str | os.PathLike) -> list[str]:
    """Copy the comparison's outputs (`OUTPUTS`, those present) from `workdir` into `archive`, with absolute
    paths inside the current directory written relative to it in the text ones.

    Args: workdir: the comparison's workdir; archive: the archive folder.
    Returns: the names copied.
    """
    workdir, archive = Path(workdir), Path(archive)
    saved = [n for n in OUTPUTS if (workdir / n).is_file()]
    cwd = Path.cwd().absolute().as_posix().rstrip("/") + "/"
    for n in saved:
        if n.endswith(_TEXT_OUTPUTS) and cwd != "/":
            write_text_atomic(archive / n, (workdir / n).read_text().replace(cwd, ""))
        else:
            _copy_file(workdir / n, archive / n)
    return saved
