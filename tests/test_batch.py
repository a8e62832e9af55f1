"""Tests of the one batch loop (`clips_jax.batch`): outcomes by fate, the log lines, failures carried over."""

import pytest

from clips_jax import batch
from clips_jax.errors import DataError


def step(cid: str):
    if cid == "bad":
        raise DataError("bad: SUV.nii.gz is truncated; export it again\nsecond line")
    if cid == "bug":
        raise KeyError("x")
    if cid == "old":
        return batch.skipped("outputs exist")
    if cid == "quiet":
        return None
    return batch.done(f"ok {cid}")


def test_for_each_case_reports_and_carries_on():
    lines, failures = [], []
    out = batch.for_each_case(
        ["a", "bad", "old", "bug", "quiet"], step, log=lines.append, on_failure=lambda c, m: failures.append(c)
    )
    assert out.total == 5 and out.done == ["a", "quiet"] and out.skipped == ["old"]
    assert out.failed == {"bad": "bad: SUV.nii.gz is truncated; export it again", "bug": "KeyError: 'x'"}
    assert failures == ["bad", "bug"]
    assert lines == [
        "[1/5] a: ok a",
        "[2/5] bad: FAILED, skipped (bad: SUV.nii.gz is truncated; export it again)",
        "[3/5] old: outputs exist",
        "[4/5] bug: FAILED, skipped (KeyError: 'x')",
    ]
    assert out.failure_lines() == [
        "  failed bad: bad: SUV.nii.gz is truncated; export it again",
        "  failed bug: KeyError: 'x'",
    ]


def test_after_each_errors_stop_the_batch_and_interrupts_are_not_swallowed():
    seen = []

    def after(cid, outcome):
        seen.append((cid, outcome.skipped))
        if cid == "old":
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        batch.for_each_case(["a", "bad", "old", "b"], step, log=None, after_each=after)
    assert seen == [("a", False), ("old", True)]

    def interrupted(_cid):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.for_each_case(["a"], interrupted, log=None)


def test_repeated_ids_are_refused():
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        batch.for_each_case(["a", "b", "a"], step, log=None)
