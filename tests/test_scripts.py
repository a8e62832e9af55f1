"""The maintenance scripts of scripts/: on small fabricated records, and plateau_late_gain.py on a tiny run it
trains (10 steps)."""

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_curricula_in_study_reads_archived_stage_rows(tmp_path, capsys):
    cis = _load("curricula_in_study")
    run = tmp_path / "runs" / "exp3s" / "seed0"
    run.mkdir(parents=True)
    rows = [{"kind": "train", "step": 1, "loss": 1.0}]
    for stage in range(8):  # bucket 4 (hardest) in the first half, bucket 0 in the second
        mass = [0.0] * 10
        mass[9 if stage < 4 else 0] = 0.7
        rows.append(
            {"kind": "curriculum", "step": 10 * stage, "stage": stage, "decile_mass": mass, "n_eff": 20.0 + stage}
            | {"n_support": 30 + stage, "sigma": 0.0}
        )
    rows.append({**rows[-1], "n_support": 99})  # a resumed run logs its last stage again: the later row counts
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cis.main(["prog", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exp3s (seed 0, 8 stages)" in out
    assert "0% step     0  support  30" in out and "100% step    70  support  99" in out
    assert "10% step    10  support  31" in out  # the first stage at or after 10 % of the last stage's step
    assert "hard30 0.70" in out and "easy30 0.70" in out
    assert "[[0, 0, 0, 0, 2], [0, 0, 0, 0, 2], [2, 0, 0, 0, 0], [2, 0, 0, 0, 0]]" in out
    assert cis.main(["prog", str(tmp_path / "nothing")]) == 1


def _fake_run(root, name, seed, evals: dict, steps: int, stopped: int | None, gz: bool = True):
    """A finished run's records: summary.json and its validation rows {step: Dice} (gzip as in an archive)."""
    run = root / "runs" / name / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": steps, "stopped_at_plateau": stopped}))
    text = "".join(json.dumps({"kind": "eval", "step": s, "val_dice": d}) + "\n" for s, d in evals.items())
    if gz:
        (run / "metrics.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (run / "metrics.jsonl").write_text(text)


def test_stop_continuation_flags_runs_their_continuation_would_have_improved(tmp_path, capsys):
    sc = _load("stop_continuation")
    stop, long = tmp_path / "stop", tmp_path / "long"
    # the stopped runs validate every 100 steps and stop at 600 of 900; the long runs validate every 300
    curve = {100: 0.5, 200: 0.6, 300: 0.7, 400: 0.7, 500: 0.71, 600: 0.69}
    for name in ("none", "cbs", "random", "transfer_teacher"):
        _fake_run(stop, name, 0, curve, 900, 600)
    _fake_run(stop, "anti", 0, {300 * k: 0.5 for k in range(1, 4)}, 900, None, gz=False)
    later = {"none": 0.725, "cbs": 0.715, "random": 0.75, "transfer_teacher": 0.9, "anti": 0.6}
    for name, last in later.items():
        shared = {300: 0.7, 600: 0.65 if name == "random" else 0.69}
        _fake_run(long, name, 0, {**shared, 900: last}, 900, None)
    rec = sc.compare(stop / "runs/none/seed0", long / "runs/none/seed0")
    assert rec["end"] == 600 and rec["best"] == 0.71 and rec["shared"] == 2 and rec["max_diff"] == 0
    assert rec["later"] == 0.725 and abs(rec["gain"] - 0.015) < 1e-12 and rec["too_early"]
    assert sc.compare(stop / "runs/cbs/seed0", long / "runs/cbs/seed0")["too_early"] is False  # +0.005
    assert sc.compare(stop / "runs/none/seed0", None)["too_early"] is None
    assert sc.main(["prog", str(stop), str(long)]) == 0
    out = capsys.readouterr().out
    assert "| none | 0 | 600 | 0.7100 | 2, 0 | 0.7250 | +0.0150 | yes |" in out
    assert "| cbs | 0 | 600 | 0.7100 | 2, 0 | 0.7150 | +0.0050 | no |" in out
    assert "| transfer_teacher | 0 | 600 |" in out and "not judged (no continuation)" in out
    assert "| anti | 0 | 900 |" in out and "trained all its steps" in out
    assert "- judged: 3 stopped runs with a continuation; stopped too early: 2 (none seed 0, random seed 0)" in out
    assert "differ from the stopped run's: 1 (random seed 0)" in out
    assert sc.main(["prog", str(tmp_path / "nothing"), str(long)]) == 1


def test_paired_change_gives_the_mean_se_and_t_interval():
    from scipy import stats

    plg = _load("plateau_late_gain")
    before = [0.5, 0.6, float("nan"), 0.7, 0.4]
    after = [0.6, 0.6, 0.9, 0.75, 0.5]  # the NaN case (lesion-free) is left out
    d = [0.1, 0.0, 0.05, 0.1]
    se = stats.tstd(d) / 2
    half = stats.t.ppf(0.975, 3) * se
    text = plg.paired_change(before, after)
    assert text.startswith(f"{sum(d) / 4:+.4f} (s.e. {se:.4f}, 95 % CI {sum(d) / 4 - half:+.4f} to ")
    assert text.endswith(f"{sum(d) / 4 + half:+.4f}, 4 cases)")
    assert plg.paired_change([0.5, float("nan")], [0.6, 0.7]).startswith("not estimable (1 case")


TINY_STUDY = """
import importlib.util
from clips_jax.configs import default_path

_spec = importlib.util.spec_from_file_location("clips_default_config", default_path())
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    c = _default.get_config("tiny")
    c.steps = 10
    c.num_devices = 1
    c.eval.every_steps = 2
    c.checkpoint.every_steps = 2
    c.data.phantoms.cache = CACHE
    return c
"""


def test_plateau_late_gain_evaluates_every_checkpoint_on_both_sets(tmp_path, capsys):
    """A tiny run (5 validations): every kept checkpoint is evaluated again, on the run's validation split
    (the same Dice the trainer logged while training) and on a cohort of another phantom seed."""
    import shutil

    import numpy as np
    import pytest

    from clips_jax.data.store import CaseStore
    from clips_jax.errors import ConfigError
    from clips_jax.runs import read_config, read_metrics

    plg = _load("plateau_late_gain")
    cfg_file = tmp_path / "tiny_study.py"
    cfg_file.write_text(TINY_STUDY.replace("CACHE", repr(str(tmp_path / "cache"))))
    work = tmp_path / "work"
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((work / "late_gain_none_seed0.json").read_text())
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    logged = {r["step"]: r["val_dice"] for r in read_metrics(work / "runs" / "none" / "seed0", "eval")}
    (other,) = (tmp_path / "cache").glob("store_*_s1_*")  # the independent cohort's store (phantom seed 1)
    other = CaseStore(other)
    n_other = len(other.split_indices("test")) + len(other.split_indices("val"))
    for r in rows:
        assert abs(r["val"] - logged[r["step"]]) < 1e-5  # the restored checkpoint is the model validated
        assert len(r["independent_cases"]) == n_other
        ind = np.array(r["independent_cases"], dtype=float)  # null (lesion-free) -> NaN
        assert np.isfinite(ind).any() and r["independent"] == pytest.approx(np.nanmean(ind))
    run_dir = work / "runs" / "none" / "seed0"
    cfg = read_config(run_dir)
    last = plg.checkpoint_model(run_dir, cfg, 10)
    idx = np.concatenate([other.split_indices("test"), other.split_indices("val")])
    expected = [None if d != d else d for d in plg.dice_per_case(last, other, idx, cfg)]  # NaN -> None
    assert rows[-1]["independent_cases"] == pytest.approx(expected)  # the seed-1 cases, test then validation
    i, j = plg.rule_checkpoints(rows, "val", 10)
    assert rows[i]["step"] <= 8 < rows[j]["step"] and rows[i]["val"] == max(r["val"] for r in rows[:4])
    change = plg.paired_change(rows[i]["val_cases"], rows[j]["val_cases"])
    assert f"the rule's checkpoints, step {rows[i]['step']} to {rows[j]['step']}: {change}" in out
    assert "val: plateau rule gain" in out and "independent: plateau rule gain" in out
    assert "across the boundary, step 8 to 10" in out
    log = work / "runs" / "none" / "seed0" / "metrics.jsonl"
    n_lines = len(log.read_text().splitlines())
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file)]) == 0
    assert len(log.read_text().splitlines()) == n_lines  # finished: not trained again
    again = json.loads((work / "late_gain_none_seed0.json").read_text())
    assert [(r["step"], r["val"]) for r in again] == [(r["step"], r["val"]) for r in rows]
    # --average=2: from the second validation step on, the mean weights of that checkpoint and the one before
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file), "--average=2"]) == 0
    avg = json.loads((work / "late_gain_none_seed0_avg2.json").read_text())
    assert [r["step"] for r in avg] == [4, 6, 8, 10]
    pair = plg.average_models([plg.checkpoint_model(run_dir, cfg, s) for s in (2, 4)])
    own = CaseStore(cfg.data.store)  # the run's store (its validation split)
    assert avg[0]["val"] == pytest.approx(np.nanmean(plg.dice_per_case(pair, own, own.split_indices("val"), cfg)))
    assert plg.main(["prog", str(work), "none", "0", "--average=0"]) == 2
    with pytest.raises(ConfigError, match=r"no checkpoint of step 3 \(kept: \[2, 4, 6, 8, 10\]\)"):
        plg.checkpoint_model(run_dir, cfg, 3)  # clips_jax.runs.load_run_model(..., "last", step=3)
    shutil.rmtree(work / "runs" / "none" / "seed0" / "checkpoints" / "last" / "4")  # as a clips-compare workdir
    with pytest.raises(ConfigError, match=r"no checkpoint of validation step\(s\) \[4\]"):
        plg.main(["prog", str(work), "none", "0", str(cfg_file)])
    # --kept: the checkpoints a clips-compare workdir kept, nothing trained; first kept one -> each later one
    capsys.readouterr()
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file), "--kept"]) == 0
    out = capsys.readouterr().out
    kept = json.loads((work / "late_gain_none_seed0_kept.json").read_text())
    assert [r["step"] for r in kept] == [2, 6, 8, 10] and len(log.read_text().splitlines()) == n_lines
    assert [(r["step"], r["val"]) for r in kept] == [(r["step"], r["val"]) for r in rows if r["step"] != 4]
    change = plg.paired_change(kept[0]["independent_cases"], kept[-1]["independent_cases"])
    assert f"independent: change of Dice per case, step 2 to 10: {change}" in out and "plateau rule" not in out
    (run_dir / "summary.json").rename(run_dir / "summary.json.bak")  # as an unfinished run
    with pytest.raises(ConfigError, match="not a finished run of 10 steps"):
        plg.main(["prog", str(work), "none", "0", str(cfg_file), "--kept"])
    assert plg.main(["prog", str(work)]) == 2 and plg.main(["prog", str(work), "none", "x"]) == 2
    base = plg.study_config(str(cfg_file))
    with base.unlocked():
        base.data.store = str(tmp_path / "a_store")
    with pytest.raises(ConfigError, match="built-in phantoms"):
        plg.independent_cases(base)


def test_average_models_means_float_weights_and_keeps_other_leaves():
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    plg = _load("plateau_late_gain")

    class Tiny(nnx.Module):
        def __init__(self, seed: int):
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
            self.count = nnx.Variable(jnp.array(seed, jnp.int32))

    models = [Tiny(0), Tiny(1), Tiny(2)]
    avg = plg.average_models(models)
    want = np.mean([np.asarray(m.lin.kernel[...]) for m in models], axis=0)
    np.testing.assert_allclose(np.asarray(avg.lin.kernel[...]), want, rtol=1e-6)
    assert avg.lin.kernel[...].dtype == models[0].lin.kernel[...].dtype
    assert int(avg.count[...]) == 2  # not averaged: the last model's


def test_plateau_late_gain_raw_evaluates_the_trained_weights_of_an_averaging_run(tmp_path, capsys):
    """With a config that keeps a weight average, the default rows are the average the trainer validated and
    `--raw` rows the trained weights of the same checkpoints; `--raw` without an average is refused."""
    import numpy as np
    import pytest

    from clips_jax.data.store import CaseStore
    from clips_jax.runs import load_run_model, read_config, read_metrics

    plg = _load("plateau_late_gain")
    plain_file = tmp_path / "tiny_study.py"
    plain_file.write_text(TINY_STUDY.replace("CACHE", repr(str(tmp_path / "cache"))))
    assert plg.main(["prog", str(tmp_path / "w0"), "none", "0", str(plain_file), "--raw"]) == 2
    assert "keeps no weight average" in capsys.readouterr().out
    cfg_file = tmp_path / "tiny_ema.py"
    cfg_file.write_text(plain_file.read_text().replace("    return c", "    c.optim.ema_decay = 0.5\n    return c"))
    work = tmp_path / "work"
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file)]) == 0
    assert plg.main(["prog", str(work), "none", "0", str(cfg_file), "--raw"]) == 0
    avg = json.loads((work / "late_gain_none_seed0.json").read_text())
    raw = json.loads((work / "late_gain_none_seed0_raw.json").read_text())
    run_dir = work / "runs" / "none" / "seed0"
    logged = {r["step"]: r["val_dice"] for r in read_metrics(run_dir, "eval")}
    assert [r["step"] for r in avg] == [r["step"] for r in raw] == sorted(logged) == [2, 4, 6, 8, 10]
    for r in avg:
        assert abs(r["val"] - logged[r["step"]]) < 1e-5  # the trainer validated the average
    assert any(a["independent_cases"] != r["independent_cases"] for a, r in zip(avg, raw))  # other weights
    cfg = read_config(run_dir)
    model, info = load_run_model(run_dir, "last", config=cfg, step=10, raw=True)
    assert info["weights"] == "trained"
    own = CaseStore(cfg.data.store)
    assert raw[-1]["val"] == pytest.approx(np.nanmean(plg.dice_per_case(model, own, own.split_indices("val"), cfg)))
