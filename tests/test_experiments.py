"""Tests of `clips_jax.experiments`: the statistics of the comparison against NumPy/SciPy and hand counts,
the preset table, and a tiny end-to-end comparison (2 curricula x 1 seed x 4 steps on tiny phantoms) with an
interruption and resume.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clips_jax import curricula
from clips_jax.curricula.smoothing import cbs_sigma
from clips_jax.errors import ConfigError
from clips_jax.experiments import compare_curricula as cc
from clips_jax.experiments import presets, results, statistics

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from clips_jax.configs import default as default_config  # noqa: E402

# ---- pure statistics -------------------------------------------------------------------------------------


def _row(case, dice, tp=1, fn=0, pred=1.0, true=2.0, fpv=0.5, nsd=0.5):
    return {
        "case": case,
        "dice": dice,
        "nsd": nsd,
        "a1_tp": tp,
        "a1_fn": fn,
        "tmtv_pred_ml": pred,
        "tmtv_true_ml": true,
        "fpv_ml": fpv,
    }


def _runs(dice_by_seed, err=None):
    """seed -> case_metrics-like rows for cases c0..; dice_by_seed: (n_runs, n_cases), NaN = lesion-free."""
    out = {}
    for k, dice in enumerate(np.asarray(dice_by_seed, float)):
        e = np.zeros_like(dice) if err is None else np.asarray(err, float)[k]
        out[k] = [_row(f"c{j}", d, pred=2.0 + e[j], true=2.0 if np.isfinite(d) else 0.0) for j, d in enumerate(dice)]
    return out


def test_summarise_rows_tests_holm_and_controls():
    rng = np.random.default_rng(0)
    n_cases, n_runs = 30, 4
    case = rng.normal(0.6, 0.15, n_cases)
    case[0] = np.nan  # a lesion-free case
    hardness = -np.nan_to_num(case, nan=np.nan)  # lower case effect = harder
    table = lambda shift=0.0, hard_shift=0.0: np.clip(  # noqa: E731
        case
        + shift
        + hard_shift * (hardness > np.nanquantile(hardness, 2 / 3))
        + rng.normal(0, 0.02, (n_runs, 1))
        + rng.normal(0, 0.03, (n_runs, n_cases)),
        0,
        1,
    )
    per_run = {
        "none": _runs(table()),
        "better": _runs(table(0.2)),
        "same": _runs(table()),
        "control_negative": _runs(table()),
        "control_positive": _runs(table(0.0, -0.3)),
    }
    ids = [f"c{j}" for j in range(n_cases)]
    rows, notes, design = cc.summarise(per_run, ids, hardness)
    assert tuple(rows[0]) == cc.RESULT_COLUMNS
    assert [(r["curriculum"], r["subset"]) for r in rows[:4]] == [
        ("none", "all"),
        ("none", "hard"),
        ("better", "all"),
        ("better", "hard"),
    ]
    by = {(r["curriculum"], r["subset"]): r for r in rows}
    assert by[("none", "all")]["role"] == "baseline" and math.isnan(by[("none", "all")]["dice_p"])
    assert by[("control_positive", "hard")]["role"] == "positive control"
    # the same numbers as the statistics module's own test, on the Dice table
    direct = {
        (r["curriculum"], r["subset"]): r
        for r in statistics.compare(
            {n: results.metric_table(v, ids, "dice") for n, v in per_run.items()}, "none", hardness
        )
    }
    for key in (("better", "all"), ("same", "hard")):
        assert by[key]["dice_diff"] == pytest.approx(direct[key]["diff"])
        assert by[key]["dice_p"] == pytest.approx(direct[key]["p"])
    assert by[("better", "all")]["dice_diff"] == pytest.approx(0.2, abs=0.03) and by[("better", "all")]["dice_p"] < 1e-3
    # Holm over the two curricula only (controls excluded): min(1, 2 * smaller p), then monotone
    ps = sorted([by[("better", "hard")]["dice_p"], by[("same", "hard")]["dice_p"]])
    holm = sorted([by[("better", "hard")]["dice_p_holm"], by[("same", "hard")]["dice_p_holm"]])
    assert holm[0] == pytest.approx(min(1, 2 * ps[0])) and holm[1] == pytest.approx(max(holm[0], min(1, ps[1])))
    assert math.isnan(by[("control_negative", "all")]["dice_p_holm"])
    # |TMTV error|: reported in ml with "smaller is better" undone (identical errors -> 0 difference)
    assert by[("better", "all")]["tmtv_abs_err_ml_diff"] == pytest.approx(0.0)
    assert design["hard_by"] == "hardness" and len(design["hard_cases"]) == math.ceil(29 / 3)
    assert design["mde"]["hard"]["dice"]["mde"] > design["mde"]["all"]["dice"]["mde"] > 0
    verdicts = results.control_verdicts(rows)
    assert any(v.startswith("positive control `control_positive`: as expected") for v in verdicts), verdicts
    assert any(v.startswith("negative control `control_negative`") for v in verdicts), verdicts
    md = cc.results_markdown(rows, notes, ["- header"], design, "a test hardness")
    assert "a test hardness" in md and "## Controls" in md and "## Minimal detectable effect" in md
    assert "per-case noise s.d." in md


def test_summarise_without_hardness_leaves_out_the_choosing_run():
    rng = np.random.default_rng(1)
    base = np.clip(rng.normal(0.6, 0.2, 12) + rng.normal(0, 0.05, (3, 12)), 0, 1)
    rows, notes, design = cc.summarise(
        {"none": _runs(base), "x": _runs(base[::-1])}, [f"c{j}" for j in range(12)], None
    )
    assert design["hard_by"] == "baseline run 0"
    hard = {f"c{j}" for j in np.argsort(base[0])[:4]}
    assert set(design["hard_cases"]) == hard
    by = {(r["curriculum"], r["subset"]): r for r in rows}
    assert by[("none", "hard")]["n_seeds"] == 2 and by[("x", "hard")]["n_seeds"] == 3


def test_hardness_sources(tmp_path):
    from clips_jax import trainer
    from clips_jax.data.store import CaseStore
    from clips_jax.experiments import hardness as hl

    cfg = _tiny(tmp_path / "cache")
    store = trainer.ensure_store(cfg, lambda _: None)
    raw = trainer.phantom_dirs(cfg)[0]
    test_idx = store.split_indices("test")
    h = hl.resolve("auto", store, tmp_path / "w1", phantom_raw=raw)
    assert h.spec == f"phantom:{raw.absolute()}"
    for i in test_idx:
        truth = json.loads((raw / store.ids[int(i)] / "truth.json").read_text())
        want = truth["difficulty"] if store.has_lesion[int(i)] else float("nan")
        np.testing.assert_equal(h.values[store.ids[int(i)]], want)
    assert hl.resolve("phantom", store, tmp_path / "w1", phantom_raw=raw).values == h.values  # reused
    with pytest.raises(ConfigError, match="fixed by"):
        hl.resolve("manifest:tmtv_ml", store, tmp_path / "w1")
    m = hl.resolve("manifest:tmtv_ml", CaseStore(store.cache_dir), tmp_path / "w2")
    lesion = [store.ids[int(i)] for i in test_idx if store.has_lesion[int(i)]]
    assert all(m.values[c] == -store.cases[store.ids.index(c)]["tmtv_ml"] for c in lesion)  # small TMTV = hard
    assert hl.resolve("auto", store, tmp_path / "w3").values is None  # not phantoms: the baseline's run 0
    (tmp_path / "h.csv").write_text("case,hardness\n" + "".join(f"{c},{k}\n" for k, c in enumerate(lesion)))
    assert hl.resolve(f"csv:{tmp_path / 'h.csv'}", store, tmp_path / "w4").values[lesion[-1]] == len(lesion) - 1
    for bad in ("nope", "run", "baseline:x"):
        with pytest.raises(ConfigError):
            hl.parse_spec(bad)


def test_seed_means_and_mean_sd():
    rows = [
        _row("a", 0.8, tp=2, fn=2, pred=5.0, true=3.0, fpv=1.0),
        _row("b", float("nan"), tp=0, fn=0, pred=4.0, true=0.0, fpv=3.0, nsd=float("nan")),
    ]
    m = cc.seed_means(rows)
    assert m["dice"] == pytest.approx(0.8)
    assert m["lesion_sensitivity"] == pytest.approx(0.5)  # 2 / (2 + 2); case b has no lesion
    assert m["tmtv_abs_err_ml"] == pytest.approx((2.0 + 4.0) / 2)
    assert m["fpv_ml"] == pytest.approx(2.0)
    assert cc.seed_means(rows, {"b"})["n_cases"] == 1
    mean, sd = cc.mean_sd([0.1, 0.4, float("nan"), 0.7])
    assert mean == pytest.approx(0.4) and sd == pytest.approx(np.std([0.1, 0.4, 0.7], ddof=1))
    assert math.isnan(cc.mean_sd([0.3])[1])
    # a lesion-free case with a false positive has Dice 0 in its metrics row (docs/metrics.md): the comparison's
    # Dice and NSD leave it out all the same (its false positive counts in the TMTV error and FP volume)
    fp_free = _row("c", 0.0, tp=0, fn=0, pred=1.5, true=0.0, fpv=1.5, nsd=0.0)
    v = results.case_summary_values(fp_free)
    assert math.isnan(v["dice"]) and math.isnan(v["nsd"]) and v["tmtv_abs_err_ml"] == pytest.approx(1.5)
    assert cc.seed_means([rows[0], fp_free])["dice"] == pytest.approx(0.8)


def test_settings_conflicts_ignores_added_keys():
    old = {"steps": 4, "model": {"channels": [4, 8]}}
    new = {"steps": 4, "model": {"channels": [4, 16], "new_option": True}}
    assert cc.settings_conflicts(old, new) == ["model.channels"]
    assert cc.settings_conflicts(old, {"steps": 4, "model": {"channels": [4, 8], "x": 1}}) == []


def test_soft_dice_loss_closed_form():
    p = np.zeros((4, 4, 4), np.float32)
    t = np.zeros((4, 4, 4), bool)
    t[0, 0, :2] = True
    p[0, 0, 0] = 1.0
    p[0, 0, 2] = 0.5
    # 1 - 2 * 1 / (1.5 + 2)
    assert cc.soft_dice_of_probs(p, t) == pytest.approx(1 - 2 / 3.5)
    assert math.isnan(cc.soft_dice_of_probs(p, np.zeros_like(t)))


def test_provenance_line_counts_runs_per_machine_and_commit():
    a = {
        "cpu": "CPU A",
        "cores": 2,
        "backend": "cpu",
        "versions": {"jax": "0.1"},
        "commit": "abcdef0123",
        "dirty": False,
    }
    b = dict(a, cpu="CPU B", dirty=True)
    line = cc.provenance_line({"none": {0: a, 1: a, 2: {}}, "random": {0: b, 1: a}})
    assert line == (
        "- trained on (each run's last training part): 3 runs CPU A, 2 cores, cpu, jax 0.1, commit abcdef0; 1 run "
        "not recorded (trained by code before summary.json recorded it); 1 run CPU B, 2 cores, cpu, jax 0.1, "
        "commit abcdef0 (modified)"
    )
    assert cc.provenance_line({"none": {0: dict(a, commit="")}}).endswith("no git commit")
    gpu = dict(a, backend="gpu", device_kind="NVIDIA H200", device_count=1)
    assert "1 run CPU A, 2 cores, gpu 1 x NVIDIA H200, jax 0.1" in cc.provenance_line({"none": {0: gpu}})
    assert cc.provenance_line({}).endswith(": no runs")


# ---- presets ---------------------------------------------------------------------------------------------


def test_presets_cover_every_family_and_build():
    families = {curricula.PRESETS[e.preset]["family"] for e in presets.EXPERIMENTS.values()}
    assert families == set(curricula.registry.FAMILIES)
    assert {"none", "anti", "random", "transfer_teacher", "cbs", "exp3s", "baby_step"} <= set(presets.EXPERIMENTS)
    assert presets.DEFAULT_CURRICULA[0] == presets.BASELINE
    assert set(presets.DEFAULT_CURRICULA) <= set(presets.EXPERIMENTS)
    default_families = {curricula.PRESETS[presets.EXPERIMENTS[n].preset]["family"] for n in presets.DEFAULT_CURRICULA}
    assert default_families == set(curricula.registry.FAMILIES)
    # every curriculum preset can be compared
    assert {e.preset for e in presets.EXPERIMENTS.values()} == set(curricula.PRESETS)
    for name, exp in presets.EXPERIMENTS.items():
        opts = presets.curriculum_options(name, steps=60, steps_per_epoch=10, seed=2)
        cur = curricula.get_curriculum(exp.preset, steps_per_epoch=10, **opts)
        assert cur is not None
        if exp.paced:  # every pacing reaches the whole training set within the run (at about half of it)
            merged = {**curricula.PRESETS[exp.preset], **opts}
            config_cls = curricula.registry.FAMILIES[merged["family"]][0]  # the family's own pacing defaults
            assert issubclass(config_cls, curricula.PacingConfig), name
            cfg = config_cls(
                **{k: v for k, v in merged.items() if k in config_cls.__dataclass_fields__}, steps_per_epoch=10
            )
            assert 0 < curricula.full_set_step(cfg) <= 60 * presets.GROW_FRACTION, name
    # pacing reaches the whole set at half the run: 30 steps = 3 epochs
    assert presets.curriculum_options("predefined", 60, 10, 0)["grow_epochs"] == pytest.approx(3.0)
    assert presets.curriculum_options("random", 60, 10, 7)["seed"] == 7
    cbs = presets.curriculum_options("cbs", 60, 10, 0)
    assert 1.0 * cbs["sigma_decay"] ** 3 == pytest.approx(presets.CBS_SIGMA_AT_GROW)
    with pytest.raises(ConfigError):
        presets.get_experiment("nope")


def test_cbs_sigma_falls_to_its_target_at_half_the_run_not_before():
    # The 3000-step runs of 2026-12-01 had sigma < 0.2 after 5 % of the run (decay 0.9 every epoch of 10 steps;
    # 11 % of the first study's 1500): smoothing must last until about GROW_FRACTION of the run, at any length.
    for steps in range(60, 40001, 10):
        opts = presets.curriculum_options("cbs", steps, 10, 0)
        decay, period = opts["sigma_decay"], opts["sigma_every_epochs"]
        grow_step = int(steps * presets.GROW_FRACTION)

        def sigma(step):
            return decay ** ((step // 10) // period)

        assert sigma(grow_step) <= presets.CBS_SIGMA_AT_GROW + 1e-6, steps
        assert sigma(int(0.8 * grow_step)) > presets.CBS_SIGMA_AT_GROW, steps
        if steps in (1500, 3000, 30000):  # the model's own schedule agrees; long runs keep the paper's decay
            assert float(cbs_sigma(grow_step, 1.0, decay, period, 10)) == pytest.approx(sigma(grow_step), rel=1e-5)
            assert decay == presets.CBS_PAPER_DECAY


def test_run_defaults_respect_command_line_config_keys():
    argv = [
        "prog",
        "--config.log_every=3",
        "--config.eval.at_start=true",
        "--steps=7",
        "--config",
        "x.py",
        "--noconfig.quiet",
        "--config.steps",
        "50",
    ]
    assert cc.config_keys_in_argv(argv) == {"log_every", "eval.at_start", "quiet", "steps"}
    keep = {"log_every", "eval.at_start"}
    cfg = default_config.get_config()
    cfg.log_every, cfg.eval.at_start = 3, True
    cc.apply_run_defaults(cfg, 7, overrides=True, keep=keep)
    assert cfg.log_every == 3 and cfg.eval.at_start is True  # the user's values win
    assert cfg.steps == 7 and cfg.eval.every_steps == math.ceil(7 / presets.EVALS_PER_RUN)
    cfg2 = default_config.get_config()
    cfg2.log_every, cfg2.eval.at_start = 3, True  # as in a config file: the experiment defaults replace them
    cc.apply_run_defaults(cfg2, 7, overrides=True)
    assert cfg2.log_every == presets.RUN_OVERRIDES["log_every"]
    assert cfg2.eval.at_start == presets.RUN_OVERRIDES["eval.at_start"]
    cfg3 = default_config.get_config()
    cfg3.steps = 50
    cc.apply_run_defaults(cfg3, 7, overrides=True, keep={"steps"})  # --config.steps=50 beats --steps=7
    assert cfg3.steps == 50 and cfg3.eval.every_steps == cfg3.checkpoint.every_steps == 25


def test_archive_keeps_what_the_comparison_reads(tmp_path):
    from clips_jax.experiments import archive

    run, dest, back = tmp_path / "run", tmp_path / "arch" / "runs" / "none" / "seed0", tmp_path / "back"
    rows = [
        {"kind": "curriculum", "step": 0, "n_eff": 3.0, "weights": [0.5, 0.25, 0.25]},
        {"kind": "train", "step": 1, "loss": 2.5, "lr": 0.1, "cases": ["a", "b"], "case_losses": [2.0, 3.0]},
        {"kind": "eval", "step": 1, "val_dice": 0.25, "cases": [{"id": "a", "dice": 0.25}]},
        {"kind": "other", "step": 1},
    ]
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with pytest.raises(ConfigError, match="summary.json: missing"):
        archive.save_run(run, dest)
    (run / "summary.json").write_text('{"steps": 1}')
    (run / "test_metrics.csv").write_text("case,dice\na,0.5\n")
    assert archive.save_run(run, dest, checkpoint=True) is False  # no checkpoints/best in this run
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.jsonl.gz", "summary.json", "test_metrics.csv"]
    first = (dest / "metrics.jsonl.gz").read_bytes()
    archive.save_run(run, dest)
    assert (dest / "metrics.jsonl.gz").read_bytes() == first  # the same run gives the same bytes
    assert b"tmp" not in first[:64]  # no temporary file name in the gzip header
    wanted = [("none", 0), ("cbs", 0), ("none", 1)]
    assert archive.restore(tmp_path / "arch", back, wanted, needs_checkpoint=[("none", 0)]) == []  # no model
    assert archive.restore(tmp_path / "arch", back, wanted) == ["none/seed0"]
    got = [json.loads(line) for line in (back / "runs/none/seed0/metrics.jsonl").read_text().splitlines()]
    assert got == [
        {"kind": "curriculum", "step": 0, "n_eff": 3.0},
        {"kind": "train", "step": 1, "loss": 2.5, "lr": 0.1},
        rows[2],
    ]
    assert (back / "runs/none/seed0/test_metrics.csv").read_text() == "case,dice\na,0.5\n"
    assert archive.restore(tmp_path / "arch", back, wanted) == []  # a run folder there is left as it is


# ---- end to end ------------------------------------------------------------------------------------------


def _tiny(cache, **debug):
    cfg = default_config.get_config("tiny")
    cfg.data.phantoms.cache = str(cache)
    cfg.num_devices = 1
    cfg.quiet = True
    cfg.eval.at_start = False
    cc.apply_run_defaults(cfg, 4)
    for k, v in debug.items():
        cfg.debug[k] = v
    return cfg


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_interrupt_and_resume(tmp_path, monkeypatch):
    cache, wd = tmp_path / "cache", tmp_path / "exp"
    names = ["none", "transfer_teacher"]
    logs = []

    # 1. the baseline alone, to completion
    out1 = cc.run_comparison(_tiny(cache), wd, ["none"], seeds=1, log=logs.append)
    assert out1["runs"] == {"none": {0: "trained"}}
    base_run = wd / "runs" / "none" / "seed0"
    stamps = {p: p.stat().st_mtime_ns for p in (base_run / "summary.json", base_run / "test_metrics.csv")}

    # 2. both curricula, the transfer-teacher run interrupted after 2 of its 4 steps
    with pytest.raises(SystemExit):
        cc.run_comparison(_tiny(cache, stop_after_steps=2), wd, names, seeds=1, log=logs.append)
    tt_run = wd / "runs" / "transfer_teacher" / "seed0"
    assert not (tt_run / "summary.json").exists()
    assert (tt_run / "checkpoints" / "last").is_dir()

    # 3. re-run: the baseline is skipped (files untouched), the interrupted run resumes and finishes
    logs.clear()
    out = cc.run_comparison(_tiny(cache), wd, names, seeds=1, log=logs.append)
    assert out["runs"] == {"none": {0: "skipped"}, "transfer_teacher": {0: "trained"}}
    assert any("none seed 0] finished earlier: skipped" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    summary = json.loads((tt_run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["start_step"] == 2

    # teacher scores: in the comparison's own store (no copy), under the baseline run's teacher id, which the
    # transfer-teacher run reads; for the training lesion cases, in [0, 1]
    from clips_jax.data.store import CaseStore

    tt_cfg = json.loads((tt_run / "config.json").read_text())
    store = CaseStore(tt_cfg["data"]["store"])
    tid = tt_cfg["data"]["teacher"]
    assert not (wd / "teacher_store").exists() and store.default_teacher != tid
    assert store.teachers[tid]["source"] == base_run.absolute().as_posix()
    losses = store.teacher_losses(tid)
    scored = [losses[store.ids[i]] for i in store.split_indices("train") if store.has_lesion[i]]
    assert scored and all(0.0 <= s <= 1.0 for s in scored)
    csv_rows = _read_csv(wd / "teacher_scores.csv")
    assert {r["case"] for r in csv_rows} == {store.ids[i] for i in store.split_indices("train")}

    # results.csv: columns, and means recomputed from the per-run test CSVs
    rows = _read_csv(wd / "results.csv")
    assert tuple(rows[0]) == cc.RESULT_COLUMNS
    assert [(r["curriculum"], r["subset"]) for r in rows] == [
        ("none", "all"),
        ("none", "hard"),
        ("transfer_teacher", "all"),
        ("transfer_teacher", "hard"),
    ]
    per_case = {n: _read_csv(wd / "runs" / n / "seed0" / "test_metrics.csv") for n in names}
    for r in rows:
        if r["subset"] != "all":
            continue
        cases = per_case[r["curriculum"]]
        dice = [float(c["dice"]) for c in cases if float(c["tmtv_true_ml"]) > 0]
        err = [abs(float(c["tmtv_pred_ml"]) - float(c["tmtv_true_ml"])) for c in cases]
        fpv = [float(c["fpv_ml"]) for c in cases]
        assert int(r["n_cases"]) == len(cases) > 0
        assert float(r["dice_mean"]) == pytest.approx(np.mean(dice), rel=1e-5, abs=1e-6)
        assert float(r["tmtv_abs_err_ml_mean"]) == pytest.approx(np.mean(err), rel=1e-5, abs=1e-6)
        assert float(r["fpv_ml_mean"]) == pytest.approx(np.mean(fpv), rel=1e-5, abs=1e-6)
        assert r["dice_sd"] == "nan"  # one seed
    tt_all = [r for r in rows if r["curriculum"] == "transfer_teacher" and r["subset"] == "all"][0]
    d = [
        float(a["dice"]) - float(b["dice"])
        for a, b in zip(per_case["transfer_teacher"], per_case["none"])
        if float(b["tmtv_true_ml"]) > 0
    ]
    assert float(tt_all["dice_diff"]) == pytest.approx(np.mean(d), abs=1e-6)
    assert tt_all["dice_p"] == "nan"  # one run per arm: no run variance, no test
    # the hard cases were fixed before the runs, from the phantoms' latent difficulty
    assert out["hardness"].startswith("phantom:") and (wd / "hardness.csv").is_file()
    assert "latent difficulty" in (wd / "results.md").read_text()
    for f in ("results.md", "learning_curves.png", "boxplots.png"):
        assert (wd / f).stat().st_size > 0
    assert "transfer_teacher" in (wd / "results.md").read_text()
    # every run says whether it plateaued (a 4-step run validates twice: too few for the check)
    plat = _read_csv(wd / "plateau.csv")
    assert [(r["curriculum"], r["seed"], r["plateaued"]) for r in plat] == [
        ("none", "0", "0"),
        ("transfer_teacher", "0", "0"),
    ]
    assert "need >= 5" in plat[0]["reason"] and "## Plateau" in (wd / "results.md").read_text()
    # and where the runs were trained (each run's summary.json provenance)
    from clips_jax.provenance import run_provenance

    here = run_provenance()
    assert (
        f"- trained on (each run's last training part): 2 runs {here['cpu']}, {here['cores']} cores, cpu, "
        f"jax {here['versions']['jax']}" in (wd / "results.md").read_text()
    )

    # --noresume refuses an existing experiment (nothing deleted)
    with pytest.raises(ConfigError, match="noresume"):
        cc.run_comparison(_tiny(cache), wd, names, seeds=1, resume=False, log=logs.append)
    assert (base_run / "summary.json").is_file()

    # --archive: the finished runs' small records (and the teacher's model) survive the loss of the workdir and
    # of the phantom cache; a fresh workdir restores them, skips both runs and gives the same results
    arch = tmp_path / "archive"
    monkeypatch.chdir(tmp_path)  # paths inside the current folder are written relative to it in the archive
    out = cc.run_comparison(_tiny(cache), wd, names, seeds=1, archive=arch, log=logs.append)
    assert out["runs"] == {"none": {0: "skipped"}, "transfer_teacher": {0: "skipped"}}
    assert (arch / "runs/none/seed0/checkpoints/best").is_dir()
    assert not (arch / "runs/transfer_teacher/seed0/checkpoints").exists()
    assert (arch / "results.csv").is_file() and (arch / "runs/none/seed0/metrics.jsonl.gz").is_file()
    assert "phantom:cache/" in (arch / "hardness.json").read_text()
    for f in arch.rglob("*"):  # no machine path (orbax's markers name their folder; results.md the store)
        assert not f.is_file() or str(tmp_path).encode() not in f.read_bytes(), f
    logs.clear()
    wd2 = tmp_path / "exp_fresh"
    out2 = cc.run_comparison(_tiny(tmp_path / "cache_fresh"), wd2, names, seeds=1, archive=arch, log=logs.append)
    assert out2["runs"] == {"none": {0: "skipped"}, "transfer_teacher": {0: "skipped"}}
    assert any("restored 2 finished run(s)" in line for line in logs)
    for f in ("results.csv", "plateau.csv"):
        assert _read_csv(wd2 / f) == _read_csv(wd / f), f
    # an archive of other settings is refused before anything runs
    other = _tiny(cache)
    other.optim.lr = 0.5
    with pytest.raises(ConfigError, match="other settings.*optim.lr"):
        cc.run_comparison(other, tmp_path / "exp_other", names, seeds=1, archive=arch, log=logs.append)


# ---- the absl entry point ----------------------------------------------------------------------------------

# Runs the module's real flag definitions and `main`, with `run_comparison` replaced by a recorder, so the
# command line -> config -> run_comparison wiring is checked without training.
_ENTRY_DRIVER = """
import json
import sys
from clips_jax.experiments import compare_curricula as cc

def recorder(cfg, workdir, curricula, seeds, data, resume, controls, hardness, archive):
    print("CALL " + json.dumps({"steps": cfg.steps, "eval_every": cfg.eval.every_steps,
        "ckpt_every": cfg.checkpoint.every_steps, "log_every": cfg.log_every, "eval_at_start": cfg.eval.at_start,
        "batch": cfg.data.batch_size, "quiet": cfg.quiet, "workdir": str(workdir), "curricula": list(curricula),
        "seeds": seeds, "data": data, "resume": resume, "controls": controls, "hardness": hardness,
        "archive": archive}))

cc.run_comparison = recorder
sys.exit(cc.main(sys.argv))
"""


def _entry(args, driver=True):
    cmd = (
        [sys.executable, "-c", _ENTRY_DRIVER]
        if driver
        else [sys.executable, "-m", "clips_jax.experiments.compare_curricula"]
    )
    r = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("CALL ")]
    return r, calls


def test_command_line_reaches_run_comparison(tmp_path):
    wd = str(tmp_path / "exp")
    r, calls = _entry(
        [
            "--curricula",
            "none,cbs",
            "--seeds",
            "2",
            "--workdir",
            wd,
            "--steps",
            "40",
            "--config.data.batch_size=3",
            "--config.eval.every_steps=7",
            "--noresume",
            "--data",
            "some/store",
            "--controls",
            "--hardness",
            "manifest:tmtv_ml",
            "--archive",
            "results/study",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert len(calls) == 1
    c = calls[0]
    assert (c["curricula"], c["seeds"], c["workdir"], c["data"], c["resume"]) == (
        ["none", "cbs"],
        2,
        wd,
        "some/store",
        False,
    )
    assert c["steps"] == 40 and c["quiet"] is True
    assert c["controls"] is True and c["hardness"] == "manifest:tmtv_ml" and c["archive"] == "results/study"
    assert c["batch"] == 3 and c["eval_every"] == 7  # --config.KEY wins
    assert c["ckpt_every"] == math.ceil(40 / presets.EVALS_PER_RUN)  # experiment default
    assert c["log_every"] == presets.RUN_OVERRIDES["log_every"]
    assert c["eval_at_start"] == presets.RUN_OVERRIDES["eval.at_start"]

    # --steps 0 --noexperiment_defaults: the config file's own settings
    base = default_config.get_config()
    r, calls = _entry(["--workdir", wd, "--steps", "0", "--noexperiment_defaults"])
    assert r.returncode == 0, r.stderr
    c = calls[0]
    assert c["curricula"] == list(presets.DEFAULT_CURRICULA) and c["seeds"] == 3 and c["resume"] is True
    assert c["controls"] is False and c["hardness"] == "auto" and c["archive"] == ""
    assert (c["steps"], c["eval_every"], c["ckpt_every"], c["log_every"], c["batch"]) == (
        base.steps,
        base.eval.every_steps,
        base.checkpoint.every_steps,
        base.log_every,
        base.data.batch_size,
    )


def test_command_line_errors_are_clear(tmp_path):
    wd = tmp_path / "exp"
    r, _ = _entry(["--curricula", "none,nosuch", "--workdir", str(wd)], driver=False)
    assert r.returncode == 2  # a usage error (README, "Command-line convention")
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert "unknown experiment 'nosuch'" in r.stderr and "transfer_teacher" in r.stderr
    assert not wd.exists()  # nothing written
    r, _ = _entry(["--workdir", str(wd), "stray"], driver=False)
    assert r.returncode != 0 and "stray" in r.stderr


def test_a_finished_run_of_other_curriculum_settings_is_refused_not_counted(tmp_path):
    # A preset changed after a run finished (CBS's schedule did): the run must not be counted under the new one.
    base = default_config.get_config("tiny")
    cfg = cc.run_config(base, "cbs", 0, tmp_path / "store")
    run = tmp_path / "runs" / "cbs" / "seed0"
    run.mkdir(parents=True)
    summary = {"steps": int(cfg.steps), "curriculum": "cbs"}
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=r"none logged"):  # no recorded settings and no sigma logged for a cbs run
        cc.check_run_curriculum(run, cfg)
    from clips_jax import trainer

    settings = trainer.curriculum_settings(cfg.curriculum)
    (run / "summary.json").write_text(json.dumps({**summary, "curriculum_settings": settings}))
    cc.check_run_curriculum(run, cfg)  # the same settings pass
    old = {**settings, "options": {**settings["options"], "sigma_every_epochs": 1, "sigma_decay": 0.5}}
    (run / "summary.json").write_text(json.dumps({**summary, "curriculum_settings": old}))
    with pytest.raises(ConfigError, match=r"cbs/seed0.*other curriculum settings \(options"):
        cc.check_run_curriculum(run, cfg)
    # an option set on one side only counts as the family default it stands for (cbs: 0.9 every 5 epochs)
    partial = {**settings, "options": {}}
    (run / "summary.json").write_text(json.dumps({**summary, "curriculum_settings": partial}))
    with pytest.raises(ConfigError, match=r"other curriculum settings \(options"):
        cc.check_run_curriculum(run, cfg)
    # a workdir run without the summary key is checked against its config.json
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.json").write_text(json.dumps({"curriculum": old}))
    with pytest.raises(ConfigError, match="remove the run folder"):
        cc.check_run_curriculum(run, cfg)
    # an archived run with neither record: its logged sigma (logged step k ran at step k - 1) is checked
    (run / "config.json").unlink()
    cur = curricula.get_curriculum("cbs", **curricula.options_from_config(cfg))
    for schedule, ok in ((lambda k: float(cur.sigma(None, k - 1)), True), (lambda k: 0.5 ** ((k - 1) // 2), False)):
        rows = [{"kind": "train", "step": k, "loss": 1.0, "sigma": schedule(k)} for k in range(1, cfg.steps + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if ok:
            cc.check_run_curriculum(run, cfg)
        else:
            with pytest.raises(ConfigError, match=r"smoothing sigma at step \d+: logged"):
                cc.check_run_curriculum(run, cfg)
    # and the comparison calls the check before it skips a finished run
    runner = cc._Runner(base, tmp_path, store=None, log=lambda line: None)
    with pytest.raises(ConfigError, match="other curriculum settings"):
        runner.train("cbs", 0, tmp_path / "store")


def test_plateaued_only_sensitivity_leaves_out_the_runs_that_had_not_plateaued():
    rng = np.random.default_rng(3)
    n_cases, n_runs = 24, 4
    case = rng.normal(0.6, 0.15, n_cases)
    hardness = -case
    hard = hardness >= np.sort(hardness)[-8]  # the 8 hardest (ceil(24 / 3))

    def table(hard_gain=(0.0, 0.0, 0.0, 0.0)):  # per-run gain on the hard cases only
        gain = np.asarray(hard_gain)[:, None] * hard[None, :]
        return np.clip(case + gain + rng.normal(0, 0.01, (n_runs, 1)) + rng.normal(0, 0.02, (n_runs, n_cases)), 0, 1)

    # "late" gains (on the hard cases) only through its one run that had not plateaued; "lost" keeps one run
    per_run = {n: _runs(table()) for n in ("none", "same", "lost")}
    per_run["late"] = _runs(table((0, 0, 0, 0.3)))
    per_run["hardgain"] = _runs(table((0.15,) * 4))  # a real gain on the hard cases, all runs plateaued
    ids = [f"c{j}" for j in range(n_cases)]
    every = {n: {k: True for k in range(n_runs)} for n in per_run}
    assert results.plateaued_only_lines(per_run, every, ids, hardness) == []
    flags = {**every, "late": {0: True, 1: True, 2: True, 3: False}, "lost": {0: True, 1: False, 2: False, 3: False}}
    md = "\n".join(results.plateaued_only_lines(per_run, flags, ids, hardness))
    assert "## Sensitivity: plateaued runs only" in md and "without the 4 run(s) that had not plateaued" in md
    cols = {x.split("|")[1].strip(): [c.strip() for c in x.split("|")[2:-1]] for x in md.splitlines() if x[:2] == "| "}
    assert cols["late"][1] == "3 of 4" and cols["lost"][1] == "1 of 4" and cols["lost"][3] == "—"  # 1 run: no test
    rows, _, _ = cc.summarise(per_run, ids, hardness)
    full = {r["subset"]: r["dice_diff"] for r in rows if r["curriculum"] == "late"}
    assert full["hard"] == pytest.approx(0.075, abs=0.02) and full["all"] == pytest.approx(0.025, abs=0.01)
    assert abs(float(cols["late"][2].split()[0])) < 0.02 and abs(float(cols["late"][4].split()[0])) < 0.02
    hg_hard, hg_all = float(cols["hardgain"][2].split()[0]), float(cols["hardgain"][4].split()[0])
    assert hg_hard == pytest.approx(0.15, abs=0.03) and hg_all == pytest.approx(0.05, abs=0.015)  # columns in place
    # Holm over the same 4 curricula as the main tables, "lost" (no test) counting as p = 1
    raw = [float(cols[n][3].split()[0]) for n in ("same", "late", "hardgain")] + [1.0]
    holm_late = float(cols["late"][3].split("(")[1].rstrip(")"))
    assert holm_late == pytest.approx(statistics.holm(raw)[1], rel=0.02, abs=2e-3)
    assert holm_late > statistics.holm(raw[:3])[1] * 1.2  # a family shrunk to the tested 3 would adjust less
    assert cols["none"][1:] == ["4 of 4", "—", "—", "—", "—"]
    section = lambda f, h=hardness: "".join(results.plateaued_only_lines(per_run, f, ids, h))  # noqa: E731
    assert "Not computed (no hardness fixed before the runs)." in section(flags, None)
    assert "could not judge 1 run(s)" in section({**flags, "same": {0: None, 1: True, 2: True, 3: True}})
    assert "1 plateaued baseline run(s), need 2" in section({**flags, "none": {0: True, 1: False, 2: False, 3: False}})
