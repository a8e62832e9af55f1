"""The one command-line convention of CLIPS-JAX: every command parses, reports and exits the same way.

Every command (`clips-train`, `clips-predict`, ... or `python -m <module>`; the README lists them) is a module
with `define_flags(fv)`, `run_from_flags(fv) -> exit status` and a docstring whose "Examples" show real
command lines, and a `main(argv=None)` that calls `run_tool`. The convention, documented once in the README
("Command-line convention"):

- flags: absl flags in a private `absl.flags.FlagValues` (so a command can also be called in-process, as the
  tests do, without global state); `--flag=value` or `--flag value`; booleans `--flag` / `--noflag`;
  a Z,Y,X triple is written `z,y,x` (or `zxyxx`) and read by `parse_zyx`;
- `-h` / `--help`: the module docstring (with its examples) and the flags, on stdout, exit 0;
- errors: ONE line `error: <what went wrong, which file or case, what to do>` on stderr, no traceback;
  warnings (input accepted with a change, e.g. slices resampled) one `warning: ...` line each;
- exit status: 0 success; 1 an input error (a file, case or study that cannot be used: `DataError`,
  `WeightsError`, or a batch command where some cases failed); 2 a usage error (unknown or malformed flag,
  contradictory or invalid settings: absl's `flags.Error`, `ConfigError`, `UsageError`).

Only the command-line modules parse flags or print; the library below raises `clips_jax.errors` exceptions.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Callable, Sequence

from clips_jax import host_memory
from clips_jax.errors import ClipsError, ConfigError

EXIT_OK = 0
EXIT_INPUT = 1
"""A file, case or study could not be used (or some cases of a batch failed)."""
EXIT_USAGE = 2
"""The command line or the settings are wrong."""

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


class UsageError(ClipsError):
    """The command line itself is wrong (e.g. a missing required flag, stray arguments): exit 2."""


def error(message: object) -> None:
    """Print `error: <message>` as one line on stderr (newlines folded; an embedded traceback, as absl's
    config-flag errors carry, is cut down to its last line: the exception itself)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in str(message):
        head = str(message).split("Traceback (most recent call last)")[0].strip()
        lines = [head, lines[-1]] if head else [lines[-1]]
    text = " ".join(lines)
    print(f"error: {text}", file=sys.stderr)


def parse_zyx(text: str, name: str, kind: type = int) -> tuple:
    """`"z,y,x"` (or `"ZxYxX"`, or one value for all three axes) -> a (z, y, x) tuple of `kind` (int or float).

    Args: text: the flag's value; name: the flag's name, for the message; kind: int (voxels) or float (mm).
    Raises: UsageError naming the flag when the value is not 1 or 3 positive numbers.
    """
    parts = re.split(r"[,x]", str(text).strip())
    try:
        vals = [kind(p) for p in parts]  # an empty part ("3,", "3,x") is an error too
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(v <= 0 for v in vals):
        unit = "voxels" if kind is int else "mm"
        raise UsageError(
            f"--{name}={text!r}: expected three positive {kind.__name__} values z,y,x ({unit}), "
            f"e.g. --{name}={'96,96,96' if kind is int else '6,6,6'}"
        )
    return tuple(vals)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `warning: ...` line on stderr (the commands' face of `DataWarning` and the like)."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file)


def exit_status(exc: BaseException) -> int:
    """The exit status of an error under the convention: 2 for usage/config errors, 1 for the rest."""
    from absl import flags

    if isinstance(exc, (flags.Error, ConfigError, UsageError)):
        return EXIT_USAGE
    return EXIT_INPUT


def define_study_flags(fv) -> None:
    """The flags of every command that reads studies (predict, prepare, export), defined once on `fv`:
    `--allow_partial_ct` and `--skip_damaged` (`clips_jax.data.dicom.read_dicom_study`). `study_options(fv)`
    reads them back as keyword arguments of `clips_jax.data.study.load_study`."""
    from absl import flags

    flags.DEFINE_boolean(
        "allow_partial_ct",
        False,
        "accept a DICOM CT covering less than 90 % of the PET's axial extent (uncovered PET slices get air; "
        "a warning names the study and the report records the coverage)",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "skip_damaged",
        False,
        "leave out DICOM files that cannot be read (truncated, damaged) with a warning naming each, instead of "
        "stopping at the first; a slice so missing inside a series is still an error",
        flag_values=fv,
    )


def study_options(fv) -> dict[str, bool]:
    """{"allow_partial_ct", "skip_damaged"} from flags defined by `define_study_flags`."""
    return {"allow_partial_ct": bool(fv["allow_partial_ct"].value), "skip_damaged": bool(fv["skip_damaged"].value)}


def run_tool(argv: Sequence[str] | None, define_flags: Callable, run_from_flags: Callable, doc: str | None) -> int:
    """Parse `argv` (argv[0] = program name; None = sys.argv) with the command's flags and run it.

    Before running, sets this process's allocator from `CLIPS_MALLOC` (`clips_jax.host_memory`: by default
    freed memory is reused, which makes XLA's CPU calls faster).
    Returns the exit status (never raises for a user error): help -> 0; a flag error, `ConfigError` or
    `UsageError` -> one `error:` line, 2; any other `ClipsError` -> one `error:` line, 1; otherwise what
    `run_from_flags` returns.
    """
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    if not flags.FLAGS.is_parsed():  # libraries that read global absl flags (grain) must not crash
        flags.FLAGS.mark_as_parsed()
    fv = flags.FlagValues()
    define_flags(fv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        print((doc or "").strip() + "\n")
        print("flags:\n" + fv.get_help(include_special_flags=False))
        return EXIT_OK
    try:
        warnings.showwarning = _show_warning
        rest = fv(argv)
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments {rest[1:]}; every input is a --flag (see --help)")
        host_memory.configure_from_env()
        return int(run_from_flags(fv) or 0)
    except (flags.Error, ClipsError) as e:
        error(e)
        return exit_status(e)
