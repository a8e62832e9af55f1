"""Provenance of prediction outputs: which software, which weights, which options, and what they may be used for.

`clips_jax.predict` puts `provenance(...)` into every output it writes: the JSON report (key "provenance"), a
visible line of the Markdown report, and the DICOM SEG (`clips_jax.data.dicom_seg`: series and content
description, ContentQualification RESEARCH, the algorithm identification's version and parameters). The weights
hash is computed once per weights directory when the networks are loaded (`predict.load_models`).
"""

from __future__ import annotations

import hashlib
import os
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
