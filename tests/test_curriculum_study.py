"""Tests of the curriculum study's pieces: the phantom cohort's explicit split (`clips_jax.data.cohort`), the
study config (`clips_jax/configs/curriculum_study.py`) and the plateau check (`clips_jax.experiments.plateau`)
that every run of a comparison reports."""

import json
import math
import pathlib
import random

import numpy as np
import pytest

from clips_jax.configs import config_path, names
from clips_jax.data import cohort
from clips_jax.errors import ConfigError
from clips_jax.experiments import plateau

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load(spec: str):
    import importlib.util

    path, _, variant = config_path(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("study_cfg_under_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(variant)


def _truths(n_lesion: int, n_free: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out = {f"L{i:03d}": {"difficulty": rng.random(), "n_lesions": 1 + i % 5, "tmtv_ml": 10.0} for i in range(n_lesion)}
    out.update({f"F{i:03d}": {"difficulty": rng.random(), "n_lesions": 0, "tmtv_ml": 0.0} for i in range(n_free)})
    return out


# ---- the cohort's split ---------------------------------------------------------------------------------


def test_study_split_counts_partition_and_determinism():
    truths = _truths(100, 25)
    split = cohort.study_split(truths, test_lesion_cases=40, test_free_cases=8, val_cases=12)
    ids = [c for s in cohort.SPLITS for c in split[s]]
    assert sorted(ids) == sorted(truths) and len(ids) == len(set(ids))  # a partition
    les = lambda s: [c for c in split[s] if truths[c]["n_lesions"] > 0]  # noqa: E731
    assert len(les("test")) == 40 and len(split["test"]) == 48
    assert len(les("val")) == 12 == len(split["val"])
    assert len(les("train")) == 48 and len(split["train"]) == 48 + 17
    # no random numbers: the same truths in another order give the same split
    shuffled = dict(random.Random(1).sample(sorted(truths.items()), len(truths)))
    assert cohort.study_split(shuffled, test_lesion_cases=40, test_free_cases=8, val_cases=12) == split


def test_study_split_is_stratified_by_difficulty():
    truths = _truths(120, 0, seed=3)
    split = cohort.study_split(truths, test_lesion_cases=40, test_free_cases=0, val_cases=20)
    order = sorted(truths, key=lambda c: (truths[c]["difficulty"], c))
    # in every sixth of the difficulty order each split holds its share (test 1/3, val 1/6, train 1/2) +- 1
    for k in range(6):
        block = set(order[20 * k : 20 * (k + 1)])
        counts = {s: len(block & set(split[s])) for s in cohort.SPLITS}
        assert abs(counts["test"] - 20 / 3) <= 1 and abs(counts["val"] - 20 / 6) <= 1
        assert abs(counts["train"] - 10) <= 1
    summary = cohort.split_summary(split, truths)
    assert summary["train"]["hard_lesion"] >= 18  # the training split keeps its hard tail (u >= 2/3)
    assert summary["test"]["hard_lesion"] >= 12


def test_study_split_refuses_a_cohort_too_small():
    with pytest.raises(ConfigError, match="generate more phantoms"):
        cohort.study_split(_truths(53, 10), test_lesion_cases=40, test_free_cases=8, val_cases=12)
    with pytest.raises(ConfigError, match="lesion-free"):
        cohort.study_split(_truths(80, 3), test_lesion_cases=40, test_free_cases=8, val_cases=12)
    with pytest.raises(ConfigError):
        cohort.study_split(_truths(80, 10), test_lesion_cases=0)


def test_split_setting_json_file_and_store_tag(tmp_path):
    import ml_collections

    ph = ml_collections.ConfigDict({"split": ""})
    assert cohort.split_tag(ph) == "" and cohort.phantom_split(ph, tmp_path, []) is None
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    ph.split = str(f)
    assert cohort.phantom_split(ph, tmp_path, ["a", "b", "c"]) == {"train": ["a"], "val": ["b"], "test": ["c"]}
    assert cohort.split_tag(ph).startswith("_split") and len(cohort.split_tag(ph)) == len("_split") + 8
    ph.split = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="not 'study'"):
        cohort.split_tag(ph)


def test_the_training_command_sets_the_phantom_split_from_the_command_line(monkeypatch):
    """`clips-train` locks its config, so a setting docs/data.md describes must exist in the default config."""
    from absl import flags

    from clips_jax import train

    def parse(*args):
        argv = train.resolve_config_args(["clips-train", "--config=default", *args])
        monkeypatch.setattr("sys.argv", argv)  # ml_collections reads the overrides from sys.argv, as the command does
        fv = flags.FlagValues()
        train.define_flags(fv)
        fv(argv)
        return fv.config.data.phantoms

    assert cohort.split_tag(parse("--config.data.phantoms.split=study", "--config.data.phantoms.val_cases=6")) == (
        "_study40+8v6"
    )
    assert cohort.split_tag(parse()) == ""  # the default store keeps prepare's seeded split


@pytest.fixture(scope="module")
def study_truths():
    """The truths of the study config's phantoms, generated in memory (~0.1 s each on the 2-core VM)."""
    from clips_jax.data.phantoms import case_id, case_seed, make_phantom

    ph = _load("curriculum_study").data.phantoms
    return {case_id(ph.seed, i): make_phantom(case_seed(ph.seed, i), ph.size).truth for i in range(int(ph.cases))}


def test_the_study_cohort_meets_the_counts(study_truths):
    ph = _load("curriculum_study").data.phantoms
    split = cohort.study_split(study_truths, **cohort.study_counts(ph))
    s = cohort.split_summary(split, study_truths)
    assert s["test"]["lesion"] >= 40 and s["test"]["lesion_free"] >= 1
    assert s["val"]["lesion"] >= 10
    assert s["train"]["lesion"] >= 40 and s["train"]["hard_lesion"] >= 15  # a real hard tail
    # the hard training cases really are the small ones (median TMTV of hard < half that of easy)
    assert s["train"]["median_tmtv_ml_hard"] < 0.5 * s["train"]["median_tmtv_ml_easy"]
    # the test split's hard third (ceil(40/3) = 14 cases by latent difficulty) is available
    assert s["test"]["hard_lesion"] >= math.ceil(40 / 3)
    assert cohort.study_split(study_truths, **cohort.study_counts(ph)) == split


# ---- the study config -----------------------------------------------------------------------------------


def test_study_config_loads_by_name_and_makes_sense():
    from clips_jax.trainer import phantom_dirs

    assert "curriculum_study" in names()
    c = _load("curriculum_study")
    base = _load("default")
    assert c.steps > 0 and c.eval.every_steps > 0 and c.steps % c.eval.every_steps == 0
    evals = c.steps // c.eval.every_steps
    assert evals >= plateau.MIN_EVALS
    last = [s for s in range(c.eval.every_steps, c.steps + 1, c.eval.every_steps) if s > 0.8 * c.steps]
    assert len(last) >= 1 and evals - len(last) >= 1  # validations on both sides of the plateau boundary
    assert c.checkpoint.every_steps == c.eval.every_steps and not c.eval.at_start
    assert c.data.phantoms.split == "study" and cohort.study_counts(c.data.phantoms)["test_lesion_cases"] >= 40
    # the default small U-Net and patch, annealed to 0 over the run (one cosine period)
    assert tuple(c.model.channels) == tuple(base.model.channels) and tuple(c.data.patch_shape) == (32, 32, 32)
    assert c.optim.restart_steps == 0 and c.model.kind == "unet"
    assert phantom_dirs(c)[1].name.endswith("_study40+8v12")
    with pytest.raises(ValueError, match="unknown variant"):
        _load("curriculum_study:nope")


def test_the_first_study_variant_differs_only_in_length():
    """`curriculum_study:first` reproduces the first recorded study: half the steps, validated twice as often,
    every other setting the same (so its archive's settings still match)."""
    c, first = _load("curriculum_study").to_dict(), _load("curriculum_study:first").to_dict()
    assert (first["steps"], first["eval"]["every_steps"], first["checkpoint"]["every_steps"]) == (1500, 150, 150)
    assert c["steps"] == 2 * first["steps"] and c["eval"]["every_steps"] == 2 * first["eval"]["every_steps"]
    for d in (c, first):
        d.pop("steps"), d["eval"].pop("every_steps"), d["checkpoint"].pop("every_steps")
    assert c == first


def test_the_pilot_variants_differ_only_by_the_weight_average_and_length():
    """`curriculum_study:ema` is the study config plus a weight average; `:long` and `:long9000` are that with runs
    twice and three times as long, validated 10 times each."""
    c, ema, long, long9 = (_load(f"curriculum_study{v}").to_dict() for v in ("", ":ema", ":long", ":long9000"))
    assert c["optim"]["ema_decay"] == 0 and ema["optim"]["ema_decay"] == long["optim"]["ema_decay"] > 0.99
    assert long9["optim"]["ema_decay"] == ema["optim"]["ema_decay"]
    assert (long["steps"], long["eval"]["every_steps"], long["checkpoint"]["every_steps"]) == (6000, 600, 600)
    assert (long9["steps"], long9["eval"]["every_steps"], long9["checkpoint"]["every_steps"]) == (9000, 900, 900)
    for d in (c, ema, long, long9):
        d["optim"].pop("ema_decay")
        d.pop("steps"), d["eval"].pop("every_steps"), d["checkpoint"].pop("every_steps")
    assert c == ema == long == long9
    assert not c["stop_at_plateau"]["enabled"]


def test_the_stop_variant_is_long9000_validated_every_300_steps_and_stopped_at_a_plateau():
    """`curriculum_study:stop` trains as `:long9000` (same cap, schedule, curricula) and differs only in how often
    it validates and checkpoints and in ending a run at a plateau, not before every curriculum's pacing is done."""
    from clips_jax.experiments.presets import GROW_FRACTION

    long9, stop = (_load(f"curriculum_study:{v}").to_dict() for v in ("long9000", "stop"))
    assert (stop["steps"], stop["eval"]["every_steps"], stop["checkpoint"]["every_steps"]) == (9000, 300, 300)
    assert stop["stop_at_plateau"] == {"enabled": True, "after_steps": 4500, "min_last_evals": 3}
    assert stop["stop_at_plateau"]["after_steps"] == GROW_FRACTION * stop["steps"]
    # from step 4500 on, the last 20 % of the steps holds at least 3 validations every 300 steps
    assert 0.2 * 4500 // stop["eval"]["every_steps"] >= stop["stop_at_plateau"]["min_last_evals"]
    for d in (long9, stop):
        d.pop("stop_at_plateau"), d["eval"].pop("every_steps"), d["checkpoint"].pop("every_steps")
    assert long9 == stop


@pytest.mark.parametrize(
    ("variant", "archive_dir"),
    [
        ("first", "curriculum_study_2026-12"),
        ("", "curriculum_study_3000"),
        ("long", "curriculum_study_6000"),
        ("long9000", "curriculum_study_9000"),
    ],
)
def test_each_study_archive_matches_its_variant(study_truths, variant, archive_dir):
    """The committed archive of each study (docs/results/<archive_dir>) was made with the settings and the cohort
    that `--config curriculum_study[:variant] --steps 0` gives today, so its runs can still be restored from it:
    no setting differs (`settings_conflicts`, as clips-compare checks) and the store's folder name and per-split
    case ids (`split_fingerprint`, the hash `store_fingerprint` stores, here from the split made in memory) are
    the same."""
    from clips_jax.experiments.compare_curricula import (
        _settings_key,
        apply_run_defaults,
        settings_conflicts,
        split_fingerprint,
    )
    from clips_jax.trainer import phantom_dirs

    archive = json.loads((REPO / "docs" / "results" / archive_dir / "archive.json").read_text())
    cfg = _load(f"curriculum_study:{variant}" if variant else "curriculum_study")
    with cfg.unlocked():
        apply_run_defaults(cfg, 0, overrides=True)  # as clips-compare does by default (--experiment_defaults)
    assert settings_conflicts(json.loads(archive["settings_key"]), json.loads(_settings_key(cfg))) == []
    assert archive["store"] == phantom_dirs(cfg)[1].name
    split = cohort.study_split(study_truths, **cohort.study_counts(cfg.data.phantoms))
    assert archive["store_cases"] == split_fingerprint(split)  # reads only its "train", "val", "test" keys


# ---- the plateau check ----------------------------------------------------------------------------------


def _curve(values, every=100):
    return [(every * (k + 1), v) for k, v in enumerate(values)]


def test_plateau_passes_on_a_flat_end_and_fails_while_rising():
    flat = plateau.plateau_check(_curve([0.2, 0.4, 0.5, 0.55, 0.6, 0.61, 0.6, 0.62, 0.615, 0.625]), 1000)
    assert flat["plateaued"] and flat["n_evals"] == 10 and flat["reason"] == ""
    assert flat["best_before"] == pytest.approx(0.62) and flat["gain"] == pytest.approx(0.005)
    rising = plateau.plateau_check(_curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.64, 0.65]), 1000)
    assert not rising["plateaued"] and "still improving" in rising["reason"]
    assert rising["gain"] == pytest.approx(0.03)
    # a last part that is worse than the best before is a plateau (the best checkpoint is from before)
    assert plateau.plateau_check(_curve([0.3, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4]), 1000)["plateaued"]


def test_plateau_boundary_tolerance_and_counts():
    # step 800 of 1000 belongs to "before" (the last 20 % are steps > 800)
    c = plateau.plateau_check([(200, 0.1), (400, 0.2), (600, 0.3), (800, 0.5), (1000, 0.509)], 1000)
    assert c["boundary_step"] == 800 and c["best_before"] == 0.5 and c["plateaued"]
    assert not plateau.plateau_check([(200, 0.1), (400, 0.2), (600, 0.3), (800, 0.5), (1000, 0.52)], 1000)["plateaued"]
    # 4 validations are too few, even when flat; step 0 (untrained) and NaN do not count
    few = plateau.plateau_check([(0, 0.0), (250, 0.5), (500, 0.5), (750, float("nan")), (900, 0.5), (1000, 0.5)], 1000)
    assert few["n_evals"] == 4 and not few["plateaued"] and "need >= 5" in few["reason"]
    # no validation in the last 20 %
    late = plateau.plateau_check(_curve([0.1, 0.2, 0.3, 0.4, 0.5], every=100), 1000)
    assert not late["plateaued"] and "last 20 %" in late["reason"]
    with pytest.raises(ValueError):
        plateau.plateau_check([], 0)


def test_run_plateau_reads_the_run_folder_and_reports(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"steps": 500}))
    rows = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, 501)]
    rows += [{"kind": "eval", "step": s, "val_dice": d} for s, d in _curve([0.1, 0.3, 0.4, 0.45, 0.2], 100)]
    rows.append({"kind": "eval", "step": 500, "val_dice": 0.452})  # a resumed run re-logs: the last row wins
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = plateau.run_plateau(run)
    assert rec["plateaued"] and rec["best_last"] == pytest.approx(0.452) and rec["n_evals"] == 5
    assert not plateau.run_plateau(run, tolerance=0.001)["plateaued"]

    records = {"none": {0: rec, 1: plateau.plateau_check(_curve([0.1, 0.2, 0.3, 0.4, 0.5]), 500)}}
    md = "\n".join(plateau.plateau_lines(records))
    assert "| none | 1/2 |" in md and "none seed 1: still improving" in md
    csv_text = plateau.plateau_csv(records).splitlines()
    assert csv_text[0] == ",".join(plateau.PLATEAU_COLUMNS) and csv_text[1].startswith("none,0,1,5,")
    assert rec["last_change"] == pytest.approx(0.452 - 0.45) and csv_text[1].endswith(",0.002")
    assert rec["n_last"] == 1 and csv_text[1].split(",")[plateau.PLATEAU_COLUMNS.index("n_last")] == "1"


def test_stop_due_stops_at_the_first_step_the_rule_holds_with_enough_last_validations():
    from clips_jax import convergence

    # flat from the start: validations every 100 steps
    flat = _curve([0.5] * 20)
    due = [s for s, _ in flat if convergence.stop_due(flat, s, after_steps=0, min_last_evals=2, steps=5000)]
    # 500 has 5 validations but only step 500 in its last 20 % (> 400); 600: (480, 600] holds 500 and 600
    assert due[0] == 600
    # each validation after it also satisfies the rule; the trainer stops at the first
    assert due == [s for s, _ in flat if s >= 600]
    first = lambda curve, **kw: next(  # noqa: E731
        (s for s, _ in curve if convergence.stop_due(curve, s, **{"steps": 5000, **kw})), None
    )
    assert first(flat, after_steps=0, min_last_evals=3) == 1100  # (880, 1100] holds 900, 1000, 1100
    assert first(flat, after_steps=1500, min_last_evals=2) == 1500  # never before after_steps
    assert first(flat, after_steps=0, min_last_evals=2, steps=600) is None  # at `steps` the run ends anyway
    # a rising curve never stops; one that rises and then falls stops once its last 20 % is past the peak
    rising = _curve([0.01 * k for k in range(1, 21)])
    assert first(rising, after_steps=0, min_last_evals=2) is None
    peak = _curve([0.3, 0.5, 0.6, 0.7, 0.72, 0.71, 0.7, 0.69, 0.7, 0.68])
    stop = first(peak, after_steps=0, min_last_evals=2)
    assert stop is not None and plateau.plateau_check([p for p in peak if p[0] <= stop], stop)["plateaued"]
    assert not plateau.plateau_check([p for p in peak if p[0] <= stop - 100], stop - 100)["plateaued"]
    # only at a validation step, and points after `step` are ignored
    assert not convergence.stop_due(flat, 650, after_steps=0, min_last_evals=2, steps=5000)
    assert convergence.stop_due(flat, 600, after_steps=0, min_last_evals=2, steps=5000)
    # never at a step whose validation Dice is not finite
    nan_at_600 = [(s, float("nan") if s == 600 else d) for s, d in flat]
    assert not convergence.stop_due(nan_at_600, 600, after_steps=0, min_last_evals=2, steps=5000)
    # nor counted: at 700 the last 20 %, (560, 700], holds one finite validation; at 800 two
    assert not convergence.stop_due(nan_at_600, 700, after_steps=0, min_last_evals=2, steps=5000)
    assert convergence.stop_due(nan_at_600, 800, after_steps=0, min_last_evals=2, steps=5000)
    # settings that can stop some run, and settings that never can
    assert convergence.can_stop(9000, 300, after_steps=4500, min_last_evals=3)
    assert not convergence.can_stop(9000, 900, after_steps=4500, min_last_evals=3)  # 1 validation in (3600, 4500]
    assert not convergence.can_stop(9000, 300, after_steps=9000, min_last_evals=1)  # at 9000 the run ends anyway
    assert not convergence.can_stop(400, 100, after_steps=0, min_last_evals=1)  # 3 validations before step 400
    assert not convergence.can_stop(9000, 0, after_steps=0, min_last_evals=1)


def test_run_plateau_of_a_stopped_run_uses_the_step_it_stopped_at(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"steps": 3000}))
    rows = [{"kind": "eval", "step": s, "val_dice": d} for s, d in _curve([0.2, 0.4, 0.5, 0.5, 0.5, 0.5], 100)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # judged over 3000 steps, the run has no validation in its last 20 %; it stopped at step 600
    assert "last 20 %" in plateau.run_plateau(run)["reason"]
    (run / "summary.json").write_text(json.dumps({"steps": 3000, "stopped_at_plateau": 600}))
    rec = plateau.run_plateau(run)
    assert rec["plateaued"] and rec["boundary_step"] == pytest.approx(480) and rec["n_last"] == 2
    assert rec["end_step"] == 600 and rec["stopped"]
    # results.md says which runs the trainer stopped, and that they plateaued by construction
    full = {**plateau.plateau_check(_curve([0.5] * 30), 3000), "end_step": 3000, "stopped": False}
    md = "\n".join(plateau.plateau_lines({"none": {0: rec, 1: full}}))
    assert "1 of the 2 runs were stopped at a plateau by the trainer" in md and "steps 600 to 600" in md
    assert "by construction" in md
    assert "stopped at a plateau" not in "\n".join(plateau.plateau_lines({"none": {1: full}}))
    (run / "summary.json").write_text(json.dumps({"steps": 3000, "stopped_at_plateau": None}))
    assert not plateau.run_plateau(run)["plateaued"]


def test_pooled_plateau_paragraph_gives_the_mean_gain_interval_and_end_jitter():
    # two experiments x three seeds; each run gains g over a best-before of 0.5, its last step changing by c
    gains = {"a": [0.0, 0.02, 0.005], "b": [-0.01, 0.03, 0.003]}
    last = {"a": [0.01, 0.02, 0.005], "b": [0.015, 0.0, 0.03]}
    records = {
        e: {
            k: plateau.plateau_check(_curve([0.3, 0.4, 0.5, 0.5, 0.5 + g - c, 0.5 + g]), 600)
            for k, (g, c) in enumerate(zip(gains[e], last[e]))
        }
        for e in gains
    }
    assert [r["last_change"] for r in records["b"].values()] == pytest.approx(last["b"])
    (text, blank) = plateau.pooled_plateau_lines(records)
    seed_means = (np.array(gains["a"]) + np.array(gains["b"])) / 2  # runs of one seed share their initialisation
    half = 4.3026527 * np.std(seed_means, ddof=1) / np.sqrt(3)  # t(0.975, 2 d.f.)
    mean, changes = np.mean(seed_means), last["a"] + last["b"]
    assert blank == "" and "All 6 runs together: 4 plateaued; 1 of the 6 runs with a measured gain lost ground" in text
    assert f"{mean:+.3f} on average (median {np.median(gains['a'] + gains['b']):+.3f})" in text
    assert (
        f"over the 3 seeds (gains averaged within each seed first) is {mean - half:+.3f} to {mean + half:+.3f}" in text
    )
    assert "not below the tolerance" in text and f"changed by {np.std(changes, ddof=1):.3f} (s.d. over 6 runs" in text
    # the reference of a noise-only plateau (steps 100-400 before, 500 and 600 in the last part) against 2 of 6:
    # from all 4 validations before at the plateau to only the last 2 of them
    sd = float(np.std(changes, ddof=1))
    low, high = plateau.noise_only_failure_rate(4, 2, sd), plateau.noise_only_failure_rate(2, 2, sd)
    assert low < high and f"would call about {100 * low:.0f} % to {100 * high:.0f} % of the runs still" in text
    assert "it called 2 of 6 (33 %)" in text
    flat = {
        "a": {
            k: plateau.plateau_check(_curve([0.3, 0.4, 0.5, 0.5, 0.5, 0.5 + g]), 600)
            for k, g in enumerate((0.0, 0.001, -0.001))
        }
    }
    assert "below the tolerance (0.01): the mean gain" in plateau.pooled_plateau_lines(flat)[0]
    assert plateau.pooled_plateau_lines({"a": {0: records["a"][0]}, "b": {0: records["b"][0]}}) == []  # one seed


def test_noise_only_failure_rate_matches_its_closed_form_and_grows_with_the_wobble():
    from scipy import stats

    # one validation on each side: the gain is one normal difference of s.d. change_sd
    for sd in (0.005, 0.01, 0.03):
        exact = 1.0 - stats.norm.cdf(plateau.TOLERANCE / sd)
        assert plateau.noise_only_failure_rate(1, 1, sd, n_sim=200_000) == pytest.approx(exact, abs=0.005)
    assert plateau.noise_only_failure_rate(8, 2, 0.0) == 0.0  # no wobble, no false alarm
    rates = [plateau.noise_only_failure_rate(8, 2, sd) for sd in (0.005, 0.01, 0.02, 0.05)]
    assert rates == sorted(rates) and rates[0] < 0.01 and rates[-1] > 0.05
    # more validations before the last part make a chance win of the last part rarer
    assert plateau.noise_only_failure_rate(8, 2, 0.02) < plateau.noise_only_failure_rate(2, 2, 0.02)
    assert plateau.noise_only_failure_rate(8, 2, 0.02, seed=3) == plateau.noise_only_failure_rate(8, 2, 0.02, seed=3)
    with pytest.raises(ValueError):
        plateau.noise_only_failure_rate(0, 2, 0.01)


# ---- planning: the power table --------------------------------------------------------------------------


def test_power_table_is_deterministic_and_grows_with_the_effect():
    from clips_jax.experiments import statistics

    grid = {"effects": (0.0, 0.15), "cases": (30,), "runs": (3,)}
    table = statistics.power_table(200, 1, grid=grid, n_curricula=4)
    assert table == statistics.power_table(200, 1, grid=grid, n_curricula=4)
    header, _, null, big = table.splitlines()
    assert "p < 0.0125 (Holm, 4 curricula)" in header
    power = lambda line: [float(c.strip(" %")) for c in line.strip("|").split("|")[3:]]  # noqa: E731
    assert null.startswith("| +0.00 | 30 (10) | 3 |") and power(null)[0] <= 15  # the level, about 5 %
    assert power(big)[0] >= 60 and power(big)[0] >= power(big)[1] > power(null)[1]
