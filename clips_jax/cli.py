"""Shared plumbing of the command-line tools (predict, stage_a, teacher): absl flags without global state.

Each tool defines `define_flags(fv)` and `run_from_flags(fv) -> exit status`. `run_tool` parses argv into a
private `absl.flags.FlagValues`, so a tool can be called in-process (tests) without defining global flags, and
prints usage for -h/--help (exit 0) or a one-line error for bad flags (exit 2).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def run_tool(argv: Sequence[str], define_flags: Callable, run_from_flags: Callable, doc: str | None) -> int:
    """Parse `argv` (argv[0] = program name) with the tool's flags and run it; return the exit status."""
    from absl import flags

    if not flags.FLAGS.is_parsed():  # libraries that read global absl flags (grain) must not crash
        flags.FLAGS.mark_as_parsed()
    fv = flags.FlagValues()
    define_flags(fv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in list(argv)[1:]):
        print(doc or "")
        print("flags:\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        fv(list(argv))
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_from_flags(fv)
