"""The allocator setting of the command-line tools (`clips_jax.host_memory`, `CLIPS_MALLOC`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clips_jax import cli, host_memory
from clips_jax.errors import ConfigError

GLIBC = sys.platform.startswith("linux") and host_memory._mallopt() is not None

# Allocates and frees a 64 MiB array six times under the given CLIPS_MALLOC and prints the minor page faults
# of the last five (the kernel zeroing fresh pages): glibc maps such a block anew each time unless told to keep.
_FAULTS = """
import resource, numpy as np
from clips_jax import host_memory
mode = host_memory.configure_from_env()
a = np.ones(8 * 2**20); del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(8 * 2**20); del a
print(mode, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def _faults(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["CLIPS_MALLOC"] = mode
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc mallopt only (Linux with glibc)")
def test_keep_reuses_freed_large_blocks_default_does_not():
    keep_mode, keep_faults = _faults("keep")
    default_mode, default_faults = _faults("default")
    assert (keep_mode, default_mode) == ("keep", "default")
    assert keep_faults < 8, keep_faults  # the freed 64 MiB are reused: no fresh pages
    assert default_faults >= 4 * max(keep_faults, 4), default_faults  # glibc as it comes maps 64 MiB anew each time


_RELEASE = """
import numpy as np
from clips_jax import host_memory
host_memory.keep_freed_memory()
page = 4096
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
a = np.ones(32 * 2**20); del a  # 256 MiB touched, freed, kept by the heap
kept = rss()
host_memory.release_freed()
print(kept, rss())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc malloc_trim only (Linux with glibc)")
def test_release_freed_gives_kept_memory_back():
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True)
    kept, after = map(float, out.stdout.split())
    assert kept - after > 200, (kept, after)  # MiB


def test_configure_from_env_values(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert host_memory.configure_from_env({}) == "keep"
    assert host_memory.configure_from_env({"CLIPS_MALLOC": " Keep "}) == "keep"
    assert host_memory.configure_from_env({"CLIPS_MALLOC": "default"}) == "default"
    assert len(calls) == 2  # "default" leaves glibc alone
    with pytest.raises(ConfigError, match="CLIPS_MALLOC='jemalloc'"):
        host_memory.configure_from_env({"CLIPS_MALLOC": "jemalloc"})


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host_memory, "_mallopt", lambda: None)
    assert host_memory.keep_freed_memory() is False
    assert host_memory.configure_from_env({}) == "default"


def test_run_tool_applies_the_setting_and_reports_a_bad_value(monkeypatch, capsys):
    def define(fv):
        from absl import flags

        flags.DEFINE_integer("n", 1, "a number", flag_values=fv)

    applied = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: applied.append(1) or True)
    monkeypatch.delenv("CLIPS_MALLOC", raising=False)
    assert cli.run_tool(["prog"], define, lambda fv: 0, "doc") == 0
    assert applied == [1]
    monkeypatch.setenv("CLIPS_MALLOC", "sometimes")
    assert cli.run_tool(["prog"], define, lambda fv: 0, "doc") == 2
    assert "CLIPS_MALLOC='sometimes'" in capsys.readouterr().err
