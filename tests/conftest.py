"""Shared pytest set-up.

* Four fake CPU devices (set before jax is imported) so data-parallel code is exercised on any machine.
* absl flags marked as parsed: grain worker processes read absl flags and crash otherwise.
* glibc's allocator left as it comes (`CLIPS_MALLOC=default`; tools called in-process would change it).
* Quiet absl logging (orbax logs ~50 INFO lines per save).
"""

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# The tools set glibc to keep freed memory (clips_jax.host_memory); many tests call a tool's main() in-process,
# which would switch the whole test worker for good. Tests run with glibc as it comes unless told otherwise.
os.environ.setdefault("CLIPS_MALLOC", "default")

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

# Persistent XLA compilation cache shared by all tests (and xdist workers) of a session: the many tiny
# training runs compile the same programs; reuse cuts minutes from the suite on a 2-core machine.
import pathlib  # noqa: E402

import jax  # noqa: E402

_cache = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"
_cache.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
