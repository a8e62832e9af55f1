"""Provenance: what produced a result.

Prediction outputs (which software, which weights, which options, and what they may be used for):
`clips_jax.predict` puts `provenance(...)` into every output it writes: the JSON report (key "provenance"), a
visible line of the Markdown report, and the DICOM SEG (`clips_jax.data.dicom_seg`: series and content
description, ContentQualification RESEARCH, the algorithm identification's version and parameters). The weights
hash is computed once per weights directory when the networks are loaded (`predict.load_models`).

Training runs and benchmarks (where and with which code they ran): `run_provenance()` (machine, backend,
versions, git commit) goes into each run's summary.json (`clips_jax.trainer`), and a curriculum comparison's
results.md counts its runs per machine and commit. `cpu_model()` is also the benchmarks' machine line. This
module imports no JAX at load time, so a benchmark can still choose its platform (JAX_PLATFORMS) after
importing it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESEARCH_NOTICE = "research use only, not for clinical decisions"
"""The intended-use statement every prediction output carries."""

_CHUNK = 1 << 20


def weights_sha256(weights_dir: str | os.PathLike) -> str:
    """SHA-256 (64 hex digits) of the files of a weights directory, as stored.

    Every regular file below `weights_dir` (symbolic links to files and folders followed; names starting with
    "." left out: hidden files and the temporary folders of interrupted atomic writes) in sorted order of its
    relative POSIX path contributes `path`, a NUL byte, its size in bytes (decimal), a NUL byte and its content,
    so the hash changes when a file is renamed, added, removed or altered, and not when the directory is copied
    elsewhere. Saving the same parameters again gives another hash (orbax records timestamps in its metadata).
    """
    root = Path(weights_dir)
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode("utf-8") + b"\0" + str(path.stat().st_size).encode("ascii") + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def provenance(*, software_version: str, weights_sha256: str | None, options: Mapping[str, Any]) -> dict:
    """The provenance record of one prediction (JSON-friendly).

    Args:
      software_version: the CLIPS-JAX version (`clips_jax.__version__`).
      weights_sha256: `weights_sha256` of the weights directory, or None for networks built in memory.
      options: the options that shaped the result (as the report's "options").
    Returns:
      {"software": "CLIPS-JAX <version>", "software_version", "weights_sha256", "options", "notice":
       RESEARCH_NOTICE}.
    """
    return {
        "software": f"CLIPS-JAX {software_version}",
        "software_version": str(software_version),
        "weights_sha256": weights_sha256,
        "options": dict(options),
        "notice": RESEARCH_NOTICE,
    }


# ---------------------------------------------------------------------------------------------------------
# Training runs and benchmarks: machine and code
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("model name", Linux), else `platform.processor()` or the
    architecture (e.g. "x86_64")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(src: Path, *args: str) -> subprocess.CompletedProcess:
    """`git -C src --no-optional-locks ARGS` (never takes the index lock a concurrent commit needs), with the
    caller's GIT_DIR / GIT_WORK_TREE / GIT_INDEX_FILE dropped so that git finds the checkout of `src` itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    cmd = ["git", "-C", str(src), "--no-optional-locks", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=env)


@functools.cache
def _code_commit() -> tuple[tuple[str, Any], ...]:
    src = Path(__file__).resolve().parent
    try:
        if _git(src, "ls-files", "--error-unmatch", "--", Path(__file__).name).returncode != 0:
            return ()  # not a tracked source file: an installed wheel (even one inside a checkout) or no git
        head = _git(src, "rev-parse", "HEAD")
        diff = _git(src, "status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return ()
    if head.returncode != 0 or diff.returncode != 0:
        return ()
    return (("commit", head.stdout.strip()), ("dirty", bool(diff.stdout.strip())))


def code_commit() -> dict:
    """The git commit of this package's source when it runs from a git checkout: {"commit": 40 hex digits,
    "dirty": True when the package's tracked files differ from it (documents and results elsewhere in the
    checkout do not count)}; {} for an installed wheel, outside a checkout or without git.

    Asked once per process and cached: the training and comparison commands ask at their start, soon after
    their code was imported, so a commit made while a long comparison runs is not credited with the code it
    had loaded. (A module the process imports later is read from whatever is on disk then.)"""
    return dict(_code_commit())


def run_provenance() -> dict:
    """Where and with which code a computation ran (JSON-friendly): {"cpu": `cpu_model()`, "cores": logical
    CPUs, "platform": OS string (no host name), "python": version, "backend": JAX platform ("cpu", "gpu",
    "tpu"), "device_kind", "device_count", "versions": {clips_jax, jax, jaxlib, numpy, flax, optax}, plus
    `code_commit()`'s "commit" and "dirty" from a git checkout}.

    Each training run's summary.json records it for the process that trained its last part (a run resumed
    elsewhere names the machine that finished it). Runs of one config and seed were observed to reproduce bit
    for bit on one machine and commit, and not across machines and commits (docs/experiments.md, *What the
    study could detect*), so a comparison says where its runs were trained."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    from clips_jax import __version__

    d = jax.devices()[0]
    versions = {"clips_jax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    versions |= {"numpy": np.__version__, "flax": flax.__version__, "optax": optax.__version__}
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "versions": versions,
        **code_commit(),
    }
