"""The one batch loop of the batch commands: run a step per case, report a failing case and carry on.

`prepare` (studies -> case store), `stage_a` (stage-A maps), `teacher` (teacher losses), `predict` (studies ->
masks and reports) and the evaluation all walk a list of cases where one bad case must not stop the others
(DESIGN.md, "Conventions"). They share this loop, so every command prints the same lines:

    [k/n] <case>: <what the step said>          one line per case done (or skipped, when it says why)
    [k/n] <case>: FAILED, skipped (<error>)     one line per failure; the loop goes on with the next case

and ends with the same failure list (`Outcomes.failure_lines`). The error text is the exception's first line;
errors a user can cause (`clips_jax.errors.ClipsError`) already name the file or case and what to do, so they
are shown as they are, anything else is prefixed with its type (it is likely a bug: the type helps the report).

A leaf module: it imports nothing of `clips_jax` but the errors, so every layer (data, cascade, evaluation,
experiments, commands) can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import NamedTuple

from clips_jax import host_memory
from clips_jax.errors import ClipsError


class Outcome(NamedTuple):
    """What one step did to its case: `skipped` (nothing to do, e.g. already done) and a one-line `message`
    for the log ("" = log nothing for this case)."""

    skipped: bool
    message: str


def done(message: str = "") -> Outcome:
    """The step did its work; `message` (one line, e.g. "ok, 12 lesions") is logged after the case's prefix."""
    return Outcome(False, message)


def skipped(message: str = "") -> Outcome:
    """The step had nothing to do (e.g. outputs already there); `message` says why ("" = silent skip)."""
    return Outcome(True, message)


def error_line(e: BaseException) -> str:
    """One line for a failed case: a `ClipsError`'s own first line, else "<Type>: <first line>"."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, ClipsError) and first:
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@dataclasses.dataclass
class Outcomes:
    """The ids of a batch by fate, in the order they were run: `done`, `skipped`, and `failed` (id -> error
    line); `total` = number of cases the batch was given."""

    total: int = 0
    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def failure_lines(self) -> list[str]:
        """ "  failed <id>: <error>" for each failed case (the end-of-run list), [] when none failed."""
        return [f"  failed {cid}: {msg}" for cid, msg in self.failed.items()]

    def log_summary(self, log: Callable[[str], None], headline: str) -> None:
        """Send the end of a run to `log`: the one-line `headline`, then `failure_lines`."""
        log(headline)
        for line in self.failure_lines():
            log(line)

    def as_summary(self, done_key: str) -> dict:
        """The summary dict the store commands return: {done_key: done ids, "skipped": ids, "failed": ids,
        "errors": id -> error line, "total": n}."""
        failed = dict(self.failed)
        return {
            done_key: list(self.done),
            "skipped": list(self.skipped),
            "failed": list(failed),
            "errors": failed,
            "total": self.total,
        }


def for_each_case(
    ids: Iterable[str],
    step: Callable[[str], Outcome | None],
    *,
    log: Callable[[str], None] | None = print,
    on_failure: Callable[[str, str], None] | None = None,
    after_each: Callable[[str, Outcome], None] | None = None,
) -> Outcomes:
    """Run `step(case_id)` for every id, logging one line per case; a failing case is reported, not raised.

    Args:
      ids: case (or study) ids, in run order (str, unique: ValueError otherwise).
      step: does one case; returns `done(msg)`, `skipped(msg)` or None (= `done()`). Any exception it raises
        (Exception, not KeyboardInterrupt/SystemExit) marks the case failed and the loop goes on.
      log: one-line progress sink (None = silent): "[k/n] <id>: <msg>" for outcomes with a message and
        "[k/n] <id>: FAILED, skipped (<error line>)" for failures.
      on_failure: optional `on_failure(case_id, error_line)` called for each failure (e.g. to fill a caller's
        dict as it goes).
      after_each: optional `after_each(case_id, outcome)` called after each case that did not fail, outside
        the failure handling: its exceptions stop the batch (e.g. a results file that cannot be written is not
        one case's problem).
    Returns:
      `Outcomes` (ids by fate, `failed` id -> `error_line`).
    """
    ids = [str(i) for i in ids]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"for_each_case: ids must be unique; repeated: {repeated[:5]}")
    out = Outcomes(total=len(ids))
    say = log if log is not None else (lambda _line: None)
    for k, cid in enumerate(ids):
        prefix = f"[{k + 1}/{len(ids)}] {cid}"
        host_memory.release_freed()  # one case's freed memory is not held through the next (CLIPS_MALLOC=keep)
        try:
            result = step(cid) or done()
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch; reported below
            msg = error_line(e)
            out.failed[cid] = msg
            say(f"{prefix}: FAILED, skipped ({msg})")
            if on_failure is not None:
                on_failure(cid, msg)
            continue
        (out.skipped if result.skipped else out.done).append(cid)
        if result.message:
            say(f"{prefix}: {result.message}")
        if after_each is not None:
            after_each(cid, result)
    return out
