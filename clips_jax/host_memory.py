"""How this process's C allocator (glibc malloc) treats large blocks: reuse freed memory instead of unmapping it.

Why: XLA's CPU backend allocates each compiled call's outputs and temporaries with `malloc`, and glibc maps every
block above 32 MB fresh from the kernel and unmaps it on `free` (its mmap threshold; see `man 3 mallopt`). A
training step or a batch of 128x96x96x5 crops then page-faults (the kernel zeroes) tens of megabytes on every
call. Telling glibc to serve large blocks from its heap and to keep freed memory (`M_MMAP_MAX = 0`,
`M_TRIM_THRESHOLD = 2**31 - 1`) lets the next call reuse the same pages. Measured on the 2-core development VM
(BENCHMARKS.md, "Host memory reuse"): device-path batches of 2 x 128x96x96 crops 43 -> 80 crops/s, a
whole-body tiled pass 15.1 -> 11.8 s; the default job's small training step does not change (its buffers are
far below 32 MB). What it costs: freed memory stays with the process (the measured peak did not grow); the
batch loop (`clips_jax.batch.for_each_case`) hands it back between cases (`release_freed`). Limits: glibc still
maps blocks above 64 MiB that a non-main thread allocates (its per-thread arenas are 64 MiB heaps), so those
are not reused; the gains above were measured as they are.

The command-line tools set it at start (`clips_jax.cli.run_tool`); `CLIPS_MALLOC=default` leaves glibc as it is.
Elsewhere (a notebook, your own script) call `configure_from_env()` or `keep_freed_memory()` yourself. Processes
without glibc (macOS, musl) are left alone. The numbers computed do not change, only where memory comes from.
"""

from __future__ import annotations

import ctypes
import os

from clips_jax.errors import ConfigError

MALLOC_ENV = "CLIPS_MALLOC"
MALLOC_MODES = ("keep", "default")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_TRIM_THRESHOLD = 2**31 - 1


def _libc_function(name: str):
    """The C library's function `name` (from the libc already loaded in this process), or None where absent."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _mallopt():
    """glibc's `mallopt(int param, int value) -> int` (1 = accepted), or None where the C library lacks it."""
    fn = _libc_function("mallopt")
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int)
        fn.restype = ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep freed memory for reuse (no unmapping or trimming;
    see the module docstring for the limit in threads).

    Applies to the whole process from now on (blocks already allocated are unaffected) and cannot be undone
    (glibc's adaptive thresholds stay off). Returns True when glibc accepted both settings, False where there
    is no glibc `mallopt` (nothing changed).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD))


def release_freed() -> bool:
    """Give the heap's free memory back to the system now (glibc `malloc_trim(0)`); the batch loop calls it
    before each case, so that under `keep` one large study's freed memory is not held through the next.
    Returns whether glibc released anything (False also where there is no glibc)."""
    fn = _libc_function("malloc_trim")
    if fn is None:
        return False
    fn.argtypes = (ctypes.c_size_t,)
    fn.restype = ctypes.c_int
    return bool(fn(0))


def configure_from_env(environ=None) -> str:
    """Apply `CLIPS_MALLOC` (`keep`, the default when unset or empty, or `default`) to this process.

    Returns the mode applied ("keep" or "default"; "default" also where glibc is absent).
    Raises: ConfigError if the variable holds another value.
    """
    value = (os.environ if environ is None else environ).get(MALLOC_ENV, "").strip().lower() or "keep"
    if value not in MALLOC_MODES:
        raise ConfigError(f"{MALLOC_ENV}={value!r}: expected one of {', '.join(MALLOC_MODES)} (unset = keep)")
    if value == "keep" and keep_freed_memory():
        return "keep"
    return "default"
