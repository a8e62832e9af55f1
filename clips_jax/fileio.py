"""Atomic file and directory writes (outputs are either complete or absent, never half-written), the
exclusive file lock that lets processes of one machine share a folder they write, and `safe_id`, the
file-name-safe form of a study's name that outputs are named by.

Usage:
    with atomic_path("out/case_SEG.nii.gz") as tmp:     # tmp is a sibling temporary path
        nib.save(img, tmp)                               # renamed onto the target only on success
    with atomic_dir("out/ckpt") as tmp_dir:              # a whole directory, renamed at the end
        ...
    write_text_atomic("out/doc.json", json.dumps(json_safe(doc), allow_nan=False))   # strict JSON
    with exclusive_lock("cache/.store.lock"):           # one process at a time builds what others then reuse
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds.

    The temporary name keeps the target's suffixes (e.g. `.nii.gz`) so writers that infer the format from
    the extension work. On any exception the temporary file is removed and `target` is left untouched.
    The file's permissions follow the umask, as for a file made by `open()`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(target.parent, f".{target.name}.", f".tmp{''.join(target.suffixes)}", directory=False)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; move it onto `target` if the block succeeds.

    If `target` exists and `overwrite` is False, FileExistsError is raised before anything is written.
    With `overwrite`, the old directory is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another output or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target.parent, f".{target.name}.", ".tmp", directory=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, error: Callable[[str, OSError], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock (`fcntl.flock`) on the file `path` (created if missing, mode 0666 less
    the umask; never removed) for the duration of the block, waiting while another process holds it.

    For processes of one machine that share a folder: the lock is advisory (only code that takes it waits) and a
    network file system may not serialise it across machines. When the file cannot be opened (stage "open",
    e.g. a read-only folder) or locked (stage "lock", e.g. ENOLCK on a file system without locks), raises
    `error(stage, oserror)` (default: the OSError itself)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if error is None:
            raise
        raise error("open", e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if error is None:
                raise
            raise error("lock", e) from e
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _new_temp(parent: Path, prefix: str, suffix: str, *, directory: bool) -> Path:
    """A new, uniquely named file (mode 0666) or directory (0777) in `parent`, made as `open()` / `mkdir()`
    would: the kernel applies the umask and any default ACL (mkstemp / mkdtemp would give 0600 / 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name for {prefix}*{suffix}")


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(v: Any) -> Any:
    """A strict-JSON copy of `v` (for `json.dumps(..., allow_nan=False)`), recursively.

    Dicts stay dicts (a key JSON cannot take, e.g. a NumPy integer, becomes `str(key)`); tuples and lists become
    lists; NumPy / JAX scalars and arrays become Python numbers / nested lists; NaN and +-inf become None.
    Anything else is returned as it is.
    """
    if isinstance(v, dict):
        return {_json_key(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.generic, np.ndarray)) or (hasattr(v, "__array__") and hasattr(v, "dtype")):  # JAX too
        v = np.asarray(v).tolist()
        return json_safe(v) if isinstance(v, list) else _finite_or_none(v)
    return _finite_or_none(v)


def _json_key(k: Any) -> Any:
    return k if k is None or isinstance(k, (str, int, float, bool)) else str(k)


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def safe_id(name: str) -> str:
    """A file-name-safe id from a folder or study name: characters other than letters, digits, '.', '-', '_'
    become '_', leading and trailing '.' and '_' are dropped ("study" when nothing is left)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "study"
