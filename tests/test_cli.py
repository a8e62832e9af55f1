"""The one command-line convention (`clips_jax.cli`): parsing, one-line errors, exit statuses."""

from __future__ import annotations

import pytest

from clips_jax import cli
from clips_jax.errors import ConfigError, DataError


def test_parse_zyx():
    assert cli.parse_zyx("96,96,96", "tile") == (96, 96, 96)
    assert cli.parse_zyx("128x96x96", "tile") == (128, 96, 96)
    assert cli.parse_zyx("16", "tile") == (16, 16, 16)
    assert cli.parse_zyx("3,2.04,2.04", "spacing", float) == (3.0, 2.04, 2.04)
    for bad in ("3,x", "3,", "", "a", "1,2", "0,1,1", "1,2,3,4", "-1"):
        with pytest.raises(cli.UsageError, match="--tile"):
            cli.parse_zyx(bad, "tile")


def _tool(raise_this=None, status=0):
    def define(fv):
        from absl import flags

        flags.DEFINE_integer("n", 1, "a number", flag_values=fv)

    def run(fv):
        if raise_this is not None:
            raise raise_this
        return status

    return define, run


@pytest.mark.parametrize(
    "exc, expect",
    [
        (None, 0),
        (ConfigError("bad setting"), 2),
        (cli.UsageError("x"), 2),
        (DataError("case c1: file.nii.gz is damaged\nre-export it"), 1),
    ],
)
def test_run_tool_statuses_and_one_line_errors(exc, expect, capsys):
    define, run = _tool(exc)
    assert cli.run_tool(["prog", "--n=3"], define, run, "Doc.\n\nExamples:\n  prog --n 3") == expect
    err = capsys.readouterr().err
    if exc is None:
        assert err == ""
    else:
        assert err.startswith("error: ") and err.count("\n") == 1


def test_run_tool_usage_help_and_returned_status(capsys):
    define, run = _tool(status=1)
    assert cli.run_tool(["prog", "--n=x"], define, run, "Doc.") == 2  # malformed flag
    assert cli.run_tool(["prog", "--nope"], define, run, "Doc.") == 2  # unknown flag
    assert cli.run_tool(["prog", "stray"], define, run, "Doc.") == 2  # stray argument
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and all(line.startswith("error: ") for line in err.splitlines())
    assert cli.run_tool(["prog", "--help"], define, run, "Doc.\n\nExamples:\n  prog --n 3") == 0
    out = capsys.readouterr().out
    assert "Examples" in out and "--n" in out
    assert cli.run_tool(["prog"], define, run, "Doc.") == 1  # what the command returns


def test_error_cuts_an_embedded_traceback(capsys):
    cli.error("flag --config=x: Error whilst parsing: Traceback (most recent call last):\n  File a\nValueError: bad")
    assert capsys.readouterr().err == "error: flag --config=x: Error whilst parsing: ValueError: bad\n"


def test_zyx_triple_checks_library_sizes():
    from clips_jax.checks import zyx_triple

    assert zyx_triple(4, "tile") == (4, 4, 4) and zyx_triple((128, 96, 96.0), "tile") == (128, 96, 96)
    for bad in (2.5, (96.7, 96, 96), True, (1, 2), "a", 0, (4, -1, 4)):
        with pytest.raises(ConfigError, match="tile"):
            zyx_triple(bad, "tile")
