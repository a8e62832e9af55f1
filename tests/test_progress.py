"""`clips-compare --status` (clips_jax/experiments/progress.py): where a comparison stands, read from its run
folders and archive without training or writing anything."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clips_jax.configs import default as default_config
from clips_jax.errors import ConfigError
from clips_jax.experiments import compare_curricula as cc
from clips_jax.experiments import progress
from clips_jax.runs import read_metrics

REPO = Path(__file__).resolve().parent.parent
STEPS = 1000


def _log(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _evals(dice_per_100_steps):
    """Validation rows at steps 100, 200, ... with the given Dice."""
    return [{"kind": "eval", "step": 100 * (k + 1), "val_dice": d} for k, d in enumerate(dice_per_100_steps)]


def _finished(run_dir: Path, evals, wall_s: float, gz: bool = False) -> None:
    """A finished run's records: summary.json with the steps, and its metric log (gzip as in an archive)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": STEPS, "wall_s": wall_s}))
    rows = [{"kind": "train", "step": s, "loss": 1.0} for s in (1, STEPS)] + evals
    if gz:
        (run_dir / "metrics.jsonl.gz").write_bytes(gzip.compress(_log(rows).encode()))
    else:
        (run_dir / "metrics.jsonl").write_text(_log(rows))


def _study(tmp_path):
    """A comparison of none and cbs, 2 seeds: none seed 0 finished and flat, cbs seed 0 finished and still
    rising, none seed 1 only in the archive (flat), cbs seed 1 started (step 250 logged twice, as after a
    resume, and a half-written last line, as while another process appends) and also in the archive (which the
    comparison would not restore over the started folder)."""
    wd, arch = tmp_path / "wd", tmp_path / "archive"
    flat = [0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.69, 0.7]
    _finished(wd / "runs/none/seed0", _evals(flat), wall_s=600)
    _finished(wd / "runs/cbs/seed0", _evals([0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.64, 0.66, 0.7, 0.74]), wall_s=900)
    _finished(arch / "runs/none/seed1", _evals(flat), wall_s=700, gz=True)
    _finished(arch / "runs/cbs/seed1", _evals(flat), wall_s=700, gz=True)
    started = wd / "runs/cbs/seed1"
    started.mkdir(parents=True)
    rows = _log([{"kind": "train", "step": s, "loss": 1.0} for s in (1, 250, 250)])
    (started / "metrics.jsonl").write_text(rows + '{"kind": "train", "st')
    return wd, arch


def test_each_run_is_finished_started_or_not_started_in_training_order(tmp_path):
    wd, arch = _study(tmp_path)
    recs = progress.run_states(wd, ["cbs", "none"], 2, STEPS, archive=arch)
    # seed-major, the baseline first, as run_comparison trains them
    assert [(r["experiment"], r["seed"]) for r in recs] == [("none", 0), ("cbs", 0), ("none", 1), ("cbs", 1)]
    assert [(r["state"], r["where"], r["step"]) for r in recs] == [
        ("finished", "workdir", STEPS),
        ("finished", "workdir", STEPS),
        ("finished", "archive", STEPS),
        ("started", "workdir", 250),
    ]
    assert [r["plateau"] and r["plateau"]["plateaued"] for r in recs] == [True, False, True, None]
    assert abs(recs[1]["plateau"]["gain"] - (0.74 - 0.66)) < 1e-9  # best after step 800 minus best before
    assert [r["wall_s"] for r in recs] == [600, 900, 700, None]
    # without the archive, its run has not started; in a longer study no run is finished
    assert progress.run_states(wd, ["none"], 2, STEPS)[1]["state"] == "not started"
    assert {r["state"] for r in progress.run_states(wd, ["none", "cbs"], 1, 2 * STEPS)} == {"started"}


def test_the_teachers_archived_run_counts_only_with_its_model(tmp_path):
    """The comparison restores the transfer teacher's run (the baseline's seed 0) only with its model; without
    it that run is trained again, so it is not reported as finished."""
    arch, empty = tmp_path / "archive", tmp_path / "wd"
    _finished(arch / "runs/none/seed0", _evals([0.5] * 10), wall_s=1, gz=True)
    assert progress.run_states(empty, ["none"], 1, STEPS, archive=arch)[0]["state"] == "finished"
    assert progress.run_states(empty, ["none", "transfer_teacher"], 1, STEPS, archive=arch)[0]["state"] == (
        "not started"
    )
    (arch / "runs/none/seed0/checkpoints/best/10").mkdir(parents=True)
    assert progress.run_states(empty, ["none", "transfer_teacher"], 1, STEPS, archive=arch)[0]["state"] == ("finished")


def test_the_report_counts_runs_names_failures_and_the_time_left(tmp_path):
    wd, arch = _study(tmp_path)
    resumed = wd / "runs/none/seed2"
    _finished(resumed, _evals([0.5] * 10), wall_s=240)
    (resumed / "summary.json").write_text(json.dumps({"steps": STEPS, "wall_s": 240, "start_step": 500}))
    recs = progress.run_states(wd, ["none", "cbs"], 3, STEPS, archive=arch)
    text = "\n".join(progress.status_lines(recs, STEPS))
    assert "| cbs | 0 | finished | 1000 / 1000 | no (+0.080) | 15 |" in text
    assert "| none | 1 | finished (archive) | 1000 / 1000 | yes (+0.000) | 12 |" in text
    assert "| none | 2 | finished | 1000 / 1000 | yes (+0.000) | 4 (from step 500) |" in text
    assert "| cbs | 1 | started | 250 / 1000 |  |  |" in text
    assert "- finished: 4 of 6 runs; started: 1; not started: 1" in text
    assert "- plateaued (`plateau.py`): 3 of 4 finished runs; still improving: cbs seed 0" in text
    # paces 0.6, 0.9, 0.7 and 240 s / 500 steps = 0.48 s per step: median 0.65; left 750 + 1000 steps: 1137.5 s
    assert "about 0.3 h of process time" in text and "(11 min per run," in text
    assert "test" not in text.lower()  # no test metric is shown
    assert progress.status_lines([], STEPS)[-1] == "- training time left: not known until a run has finished"


def test_a_run_stopped_at_a_plateau_is_finished_at_its_stop_step(tmp_path):
    wd = tmp_path / "wd"
    stopped = wd / "runs/none/seed0"
    _finished(stopped, _evals([0.5, 0.6, 0.7, 0.7, 0.7, 0.7]), wall_s=300)
    (stopped / "summary.json").write_text(json.dumps({"steps": STEPS, "wall_s": 300, "stopped_at_plateau": 600}))
    rec = progress.run_states(wd, ["none"], 1, STEPS)[0]
    # judged over its 600 steps (over 1000 it would have no validation in its last 20 %)
    assert rec["state"] == "finished" and rec["step"] == 600 and rec["stopped"] and rec["plateau"]["plateaued"]
    text = "\n".join(progress.status_lines([rec], STEPS))
    assert "| none | 0 | finished (at a plateau) | 600 / 1000 | yes (+0.000) | 5 |" in text
    # its pace is 300 s / 600 steps; nothing is left, and the estimate says runs may stop early
    assert "(8 min per run," in text and "an upper bound" in text


def test_read_metrics_reads_an_archived_log(tmp_path):
    _finished(tmp_path / "run", _evals([0.1, 0.2]), wall_s=1, gz=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "eval")] == [100, 200]


def test_a_workdir_of_other_settings_is_refused(tmp_path):
    """Reported against the wrong steps, finished runs would show as started: --status refuses flags that
    differ from those the workdir (or archive) recorded, naming the file and the keys."""
    cfg = default_config.get_config()
    cc.apply_run_defaults(cfg, STEPS)
    (tmp_path / "experiment.json").write_text(json.dumps({"settings_key": cc._settings_key(cfg)}))
    progress.check_settings(cfg, tmp_path)
    progress.check_settings(cfg, tmp_path / "missing", tmp_path / "no_archive")  # nothing recorded: nothing to refuse
    cc.apply_run_defaults(cfg, 2 * STEPS)
    with pytest.raises(ConfigError, match=r"experiment.json: recorded with other settings \(.*steps"):
        progress.check_settings(cfg, tmp_path)


def _tree(root: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_status_flag_reports_and_writes_nothing(tmp_path):
    wd, arch = _study(tmp_path)
    before = _tree(tmp_path)
    for workdir in (wd, tmp_path / "no_such_workdir"):
        args = ["--curricula", "none,cbs", "--seeds", "2", "--workdir", str(workdir), "--archive", str(arch)]
        args += ["--config", "default", "--steps", str(STEPS), "--status"]
        r = subprocess.run(
            [sys.executable, "-m", "clips_jax.experiments.compare_curricula", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert _tree(tmp_path) == before
    # the missing workdir: only the archive's two runs, which the next start would restore
    assert "- finished: 2 of 4 runs; started: 0; not started: 2" in r.stdout
