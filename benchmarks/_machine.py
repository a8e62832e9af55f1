"""Machine facts printed by every benchmark script (so each result states where it was measured)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from clips_jax.provenance import cpu_model  # noqa: F401  (re-exported; imports no JAX, see its module)


def status_gib(key: str) -> float | None:
    """A memory line of /proc/self/status (e.g. "VmHWM", "VmRSS") in GiB (2^30 bytes), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (VmHWM, else getrusage's ru_maxrss in KiB on Linux)."""
    v = status_gib("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load_avg() -> str:
    """The 1/5/15-minute load averages as a string ("n/a" where the OS has none)."""
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def portable_command(script: str, args: list[str]) -> str:
    """The command line as a reader would type it: `python <script relative to the repository> ARGS`, with
    every absolute path argument (an output file, a cache folder) reduced to its last component, so a
    recorded result names no folder of the machine it ran on."""
    import shlex

    repo = Path(__file__).resolve().parents[1]
    script_path = Path(script).resolve()
    shown = script_path.relative_to(repo).as_posix() if script_path.is_relative_to(repo) else script_path.name

    def clean(a: str) -> str:
        key, eq, value = a.partition("=") if a.startswith("--") and "=" in a else ("", "", a)
        value = Path(value).name if value.startswith("/") else value
        return f"{key}{eq}{value}" if eq else value

    return " ".join(shlex.quote(clean(a)) for a in ["python", shown, *args])
