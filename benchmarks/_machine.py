"""Machine facts printed by every benchmark script (so each result states where it was measured)."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
