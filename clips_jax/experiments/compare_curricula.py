"""`python -m clips_jax.experiments.compare_curricula`: compare curricula in one command (issue 7).

For every experiment of `--curricula` (named settings of `presets.py`) and every seed 0..`--seeds`-1 it

1. trains `trainer.train_and_evaluate(cfg, WORKDIR/runs/<curriculum>/seed<k>)` with the base config
   (`--config`) plus `seed=k`, the curriculum preset and its options, and `data.store` (`--data`, or the
   built-in phantoms). A run is *finished* when its `summary.json` exists with `steps` equal to the config's;
   finished runs are skipped, unfinished ones call the trainer again (it resumes from its last checkpoint);
2. evaluates the run's best-validation checkpoint (the last one if it never validated) on the store's
   held-out "test" split: tiled inference on the store grid and `clips_jax.metrics.case_metrics` per case,
   written to `<run>/test_metrics.csv` (skipped when it exists);
3. writes `WORKDIR/results.csv`, `WORKDIR/results.md`, `WORKDIR/learning_curves.png` and
   `WORKDIR/boxplots.png`: per curriculum the mean +- s.d. over seeds of Dice, NSD, |TMTV error|, lesion
   sensitivity and FP volume, on all test cases and on the hard ones (bottom tertile of the same seed's
   baseline Dice), and a paired per-case Wilcoxon signed-rank test against the baseline.

The transfer-teacher (bootstrapping) curriculum ranks the training cases by the soft-Dice loss of the first
seed's baseline model (`none`, trained first, without curriculum): those scores are added as `teacher_loss`
to a copy of the store manifest in `WORKDIR/teacher_store` (whose `cases` folder links to the original).

All outputs are written atomically. The library entry point is `run_comparison`; the CLI is `main`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clips_jax.curricula.teacher import soft_dice_loss  # noqa: F401 - one implementation, re-exported
from clips_jax.errors import ClipsError, ConfigError, DataError
from clips_jax.experiments import presets
from clips_jax.fileio import write_text_atomic

#: Per-seed summary metrics of results.csv: (column stem, title).
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("dice", "Dice"), ("nsd", "NSD (5 mm)"), ("tmtv_abs_err_ml", "abs. TMTV error (ml)"),
    ("lesion_sensitivity", "lesion sensitivity"), ("fpv_ml", "FP volume (ml)"))

#: Columns of results.csv, in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "curriculum", "preset", "subset", "n_seeds", "n_cases",
    *[f"{m}_{s}" for m, _ in SUMMARY_METRICS for s in ("mean", "sd")],
    "dice_diff_vs_baseline", "wilcoxon_n", "wilcoxon_p")


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------------------

def _nanmean(values) -> float:
    a = np.asarray(list(values), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def case_summary_values(row: Mapping[str, float]) -> dict[str, float]:
    """The five summary metrics of one `case_metrics` row (floats; NaN where undefined).

    dice, nsd: as in the row (NaN for a lesion-free case); tmtv_abs_err_ml = |tmtv_pred_ml - tmtv_true_ml|;
    lesion_sensitivity = a1_tp / (a1_tp + a1_fn) (any-overlap matching; NaN without true lesions);
    fpv_ml: autoPET false-positive component volume (defined for every case).
    """
    tp, fn = float(row["a1_tp"]), float(row["a1_fn"])
    return {"dice": float(row["dice"]), "nsd": float(row["nsd"]),
            "tmtv_abs_err_ml": abs(float(row["tmtv_pred_ml"]) - float(row["tmtv_true_ml"])),
            "lesion_sensitivity": tp / (tp + fn) if tp + fn > 0 else float("nan"),
            "fpv_ml": float(row["fpv_ml"])}


def seed_means(rows: Sequence[Mapping[str, float]], cases: set[str] | None = None) -> dict[str, float]:
    """Mean of each summary metric over the rows (optionally only the rows whose "case" is in `cases`),
    ignoring undefined (NaN) values. Returns {metric: mean} plus "n_cases"."""
    sel = [r for r in rows if cases is None or r["case"] in cases]
    vals = [case_summary_values(r) for r in sel]
    out = {m: _nanmean(v[m] for v in vals) for m, _ in SUMMARY_METRICS}
    out["n_cases"] = len(sel)
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample s.d. (ddof 1) of the finite values; s.d. NaN with fewer than two values."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def hard_cases(baseline_rows: Sequence[Mapping[str, float]]) -> set[str]:
    """The bottom tertile of the baseline's Dice: the ceil(n/3) lesion cases with the lowest Dice.

    Args: baseline_rows: one seed's `case_metrics` rows with "case" (lesion-free cases, Dice NaN, are ignored).
    Returns: the case ids (empty when no lesion case). Ties at the cut are broken by case id (deterministic).
    """
    scored = sorted(((float(r["dice"]), str(r["case"])) for r in baseline_rows if math.isfinite(float(r["dice"]))))
    return {c for _, c in scored[: math.ceil(len(scored) / 3)]}


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired two-sided Wilcoxon signed-rank test of a against b (scipy.stats.wilcoxon).

    Args: a, b: paired values (same length); pairs with a NaN are dropped.
    Returns: {"n": pairs used, "mean_diff": mean(a - b), "p": p-value, "note": ""}. Edge cases: n < 2 gives
      p NaN ("fewer than 2 pairs"); all differences zero gives p = 1.0 ("all differences zero": the two are
      identical on these cases, the test statistic is undefined).
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_wilcoxon: {x.shape} and {y.shape} differ")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else float("nan"), "p": float("nan"),
           "note": ""}
    if d.size < 2:
        out["note"] = "fewer than 2 pairs"
    elif not np.any(d != 0):
        out["p"], out["note"] = 1.0, "all differences zero"
    else:
        out["p"] = float(wilcoxon(x[ok], y[ok], zero_method="wilcox").pvalue)
    return out


def compare(per_run_rows: Mapping[str, Mapping[int, Sequence[Mapping[str, float]]]],
            presets_used: Mapping[str, str], baseline: str = presets.BASELINE) -> tuple[list[dict], list[str]]:
    """The rows of results.csv from the per-run test metrics.

    Args:
      per_run_rows: curriculum -> seed -> `case_metrics` rows (with "case") of that run on the test split.
      presets_used: curriculum -> curriculum preset name (for the table).
      baseline: the curriculum the others are compared with and whose Dice defines the hard cases.
    Returns:
      (rows, notes). One row per (curriculum, subset) with RESULT_COLUMNS; subset "all" (every test case) and
      "hard" (per seed k: the bottom Dice tertile of baseline seed k; only seeds the baseline has). Means and
      s.d. are over the seeds' means. Paired test: "all" pairs each lesion case's Dice averaged over the seeds
      both curricula have; "hard" pools the (seed, hard case) pairs. The baseline's own rows have no test.
      notes: human-readable remarks (missing baseline, degenerate tests).
    """
    notes: list[str] = []
    base = per_run_rows.get(baseline, {})
    hard = {k: hard_cases(rows) for k, rows in base.items()}
    if not base:
        notes.append(f"no finished baseline ({baseline!r}) run: hard cases and paired tests are not computed")
    out = []
    for name, seeds in per_run_rows.items():
        for subset in ("all", "hard"):
            if subset == "hard" and not base:
                continue
            ks = sorted(seeds) if subset == "all" else sorted(k for k in seeds if k in hard)
            means = [seed_means(seeds[k], None if subset == "all" else hard[k]) for k in ks]
            row: dict[str, Any] = {"curriculum": name, "preset": presets_used.get(name, name), "subset": subset,
                                   "n_seeds": len(ks), "n_cases": means[0]["n_cases"] if means else 0}
            for m, _ in SUMMARY_METRICS:
                row[f"{m}_mean"], row[f"{m}_sd"] = mean_sd([s[m] for s in means])
            row.update({"dice_diff_vs_baseline": float("nan"), "wilcoxon_n": 0, "wilcoxon_p": float("nan")})
            if base and name != baseline:
                common = [k for k in ks if k in base]
                if subset == "all":
                    cases = sorted({r["case"] for k in common for r in seeds[k]})
                    a = [_nanmean(_dice_of(seeds[k], c) for k in common) for c in cases]
                    b = [_nanmean(_dice_of(base[k], c) for k in common) for c in cases]
                else:
                    pairs = [(k, c) for k in common for c in sorted(hard[k])]
                    a = [_dice_of(seeds[k], c) for k, c in pairs]
                    b = [_dice_of(base[k], c) for k, c in pairs]
                w = paired_wilcoxon(a, b)
                row.update({"dice_diff_vs_baseline": w["mean_diff"], "wilcoxon_n": w["n"], "wilcoxon_p": w["p"]})
                if w["note"]:
                    notes.append(f"{name} ({subset}): Wilcoxon test {w['note']}")
            out.append(row)
    return out, notes


def _dice_of(rows: Sequence[Mapping[str, float]], case: str) -> float:
    for r in rows:
        if r["case"] == case:
            return float(r["dice"])
    return float("nan")


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------

def _num(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, str):
        return v
    v = float(v)
    return "nan" if math.isnan(v) else f"{v:.6g}"


def write_results_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the comparison rows with exactly RESULT_COLUMNS (NaN as "nan"), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_COLUMNS)
    for r in rows:
        w.writerow([_num(r[c]) for c in RESULT_COLUMNS])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def results_markdown(rows: Sequence[Mapping[str, Any]], notes: Sequence[str], header: Sequence[str]) -> str:
    """Render the comparison rows as Markdown (one table per subset) with a header and notes."""
    out = ["# Curriculum comparison", "", *header, ""]
    titles = {"all": "All test cases", "hard": "Hard test cases (bottom tertile of the same seed's baseline Dice)"}
    for subset in ("all", "hard"):
        sel = [r for r in rows if r["subset"] == subset]
        if not sel:
            continue
        out += [f"## {titles[subset]}", "",
                "| curriculum | seeds | cases | " + " | ".join(t for _, t in SUMMARY_METRICS)
                + " | ΔDice vs baseline | Wilcoxon p (n) |",
                "|---|---|---|" + "---|" * (len(SUMMARY_METRICS) + 2)]
        for r in sel:
            digits = {"tmtv_abs_err_ml": 1, "fpv_ml": 1}
            cells = [_pm(r[f"{m}_mean"], r[f"{m}_sd"], digits.get(m, 3)) for m, _ in SUMMARY_METRICS]
            diff = "—" if math.isnan(r["dice_diff_vs_baseline"]) else f"{r['dice_diff_vs_baseline']:+.3f}"
            p = "—" if math.isnan(r["wilcoxon_p"]) else f"{r['wilcoxon_p']:.3g} ({r['wilcoxon_n']})"
            out.append(f"| {r['curriculum']} | {r['n_seeds']} | {r['n_cases']} | " + " | ".join(cells)
                       + f" | {diff} | {p} |")
        out.append("")
    out += ["Mean ± s.d. over seeds of the per-seed means over test cases (Dice, NSD and lesion sensitivity over "
            "lesion cases only; absolute TMTV error and FP volume over all cases). ΔDice: mean paired per-case "
            "difference to the baseline; Wilcoxon signed-rank test, two-sided (all: per-case Dice averaged over "
            "seeds; hard: pooled (seed, case) pairs).", ""]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def learning_curves_png(curves: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike) -> Path:
    """Train loss and validation Dice vs step per curriculum (mean over seeds), as a PNG (atomic).

    Args: curves: curriculum -> one `trainer.read_metrics(run)` row list per seed.
    The train loss is smoothed by a running mean over 10 steps; seeds are averaged at the steps they share.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clips_jax.fileio import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in curves.items():
        for kind, ax, key in (("train", ax1, "loss"), ("eval", ax2, "val_dice")):
            by_step: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if r.get("kind") == kind and r.get(key) is not None:
                        by_step.setdefault(int(r["step"]), []).append(float(r[key]))
            steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
            if not steps:
                continue
            y = np.array([np.mean(by_step[s]) for s in steps])
            if kind == "train" and y.size >= 10:
                y = np.convolve(y, np.ones(10) / 10, mode="valid")
                steps = steps[9:]
            ax.plot(steps, y, label=name, marker="o" if kind == "eval" else None, ms=3)
    ax1.set(title="train loss (running mean of 10 steps, mean over seeds)", xlabel="step", ylabel="loss")
    ax2.set(title="validation Dice (mean over seeds)", xlabel="step", ylabel="Dice")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8, ncol=2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Runs: configs, finished check, test evaluation, teacher scores
# ---------------------------------------------------------------------------------------------------------

def run_config(base, name: str, seed: int, store_dir: str | os.PathLike):
    """The training config of one (experiment, seed): a copy of `base` with `seed`, the curriculum preset,
    its options (`presets.curriculum_options`) and `data.store = store_dir`. `base` is not modified."""
    import ml_collections

    exp = presets.get_experiment(name)
    cfg = ml_collections.ConfigDict(base.to_dict())  # a deep, unlocked copy
    cfg.seed = int(seed)
    cfg.curriculum.name = exp.preset
    opts = presets.curriculum_options(name, int(cfg.steps), int(cfg.curriculum.steps_per_epoch), int(seed))
    cfg.curriculum.options = ml_collections.ConfigDict(opts)
    cfg.data.store = str(store_dir)
    return cfg


def run_finished(run_dir: str | os.PathLike, steps: int) -> bool:
    """True when `run_dir/summary.json` exists and records `steps` steps."""
    path = Path(run_dir) / "summary.json"
    try:
        return int(json.loads(path.read_text()).get("steps", -1)) == int(steps)
    except (OSError, ValueError):
        return False


def load_trained_model(cfg, run_dir: str | os.PathLike):
    """The trained model of a run: parameters of the best-validation checkpoint (`checkpoints/best`), else of
    the latest `checkpoints/last` (`clips_jax.curricula.teacher.load_run_model` with the run's config `cfg`).
    Raises ConfigError (a ClipsError) if the run has no checkpoint."""
    from clips_jax.curricula.teacher import load_run_model

    return load_run_model(run_dir, "best", config=cfg)[0]


def predict_cases(model, store, indices, cfg):
    """Yield (case dict of `make_eval_cases`, lesion probability (z, y, x) float32) for store cases, by the
    same tiled inference as the trainer's validation (`cfg.eval` tiles)."""
    from clips_jax.data.pipeline import make_eval_cases
    from clips_jax.inference import nnx_predictor, tiled_inference

    e = cfg.eval
    predictor, params = nnx_predictor(model)
    for case in make_eval_cases(store, np.asarray(indices, dtype=np.int64)):
        probs = tiled_inference(case["image"], predictor, params=params, tile_shape=tuple(e.tile_shape),
                                step=tuple(e.tile_step), batch_size=int(e.batch_size))
        yield case, np.asarray(probs[..., 1], np.float32)


def evaluate_test(cfg, run_dir: str | os.PathLike, store) -> list[dict]:
    """`case_metrics` rows (with "case") of a run's trained model on the store's "test" split, also written to
    `run_dir/test_metrics.csv`; read back instead when that file exists. Masks: lesion probability > 0.5
    (= argmax of two classes), on the store grid (its spacing)."""
    from clips_jax.metrics import case_metrics, read_metrics_csv, write_metrics_csv

    path = Path(run_dir) / "test_metrics.csv"
    if path.is_file():
        return read_metrics_csv(path)
    model = load_trained_model(cfg, run_dir)
    rows = []
    for case, prob in predict_cases(model, store, store.split_indices("test"), cfg):
        row = case_metrics(prob > 0.5, case["label"] > 0, case["geometry"].spacing_mm, case["suv"])
        rows.append({"case": case["id"], **row})
    write_metrics_csv(path, rows)
    return rows


def make_teacher_store(store, teacher_cfg, teacher_run: str | os.PathLike, out_dir: str | os.PathLike,
                       log: Callable[[str], None] = print):
    """A case store identical to `store` plus a `teacher_loss` column scored by a trained teacher run.

    The teacher (the baseline model of `teacher_run`) predicts every training case; its soft-Dice loss w.r.t.
    the ground truth is the case's difficulty (higher = harder; NaN for lesion-free cases). `out_dir` gets a
    copy of the manifest with that column, `teacher_scores.csv`, and a `cases` symbolic link to the original
    arrays. Reused when `out_dir/manifest.json` exists. Returns the new `CaseStore`.
    """
    from clips_jax.curricula import teacher
    from clips_jax.data.store import CaseStore, write_manifest

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        return CaseStore(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"scoring the training cases with the teacher {teacher_run} (transfer-teacher curriculum)")
    model, info = teacher.load_run_model(teacher_run, "best", config=teacher_cfg)
    e = teacher_cfg.eval
    tile, step = tuple(e.tile_shape), tuple(e.tile_step)
    failed: dict[str, str] = {}
    scores = teacher.score_cases(store, model, indices=store.split_indices("train"), tile_shape=tile, step=step,
                                 batch_size=int(e.batch_size), loss="soft_dice", failed=failed,
                                 log=lambda _: None)
    if failed:
        cid = next(iter(failed))
        raise DataError(f"teacher scoring failed for {len(failed)} training case(s), first {cid}: {failed[cid]}")
    record = teacher.make_record(Path(teacher_run).absolute().as_posix(), str(teacher_cfg.model.kind),
                                 "soft_dice", tile, step, **info)
    cases = teacher.apply_scores(store.cases, scores, record)
    link = out_dir / "cases"
    if not link.exists():
        tmp = out_dir / f".cases.tmp{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to((store.cache_dir / "cases").absolute(), target_is_directory=True)
        os.replace(tmp, link)
    write_text_atomic(out_dir / "teacher_scores.csv",
                      "case,teacher_loss\n" + "".join(f"{k},{_num(v)}\n" for k, v in scores.items()))
    extra = {k: v for k, v in store.manifest.items() if k not in ("version", "cases")}
    extra[teacher.RECORD_KEY] = record
    write_manifest(out_dir, cases, extra)
    return CaseStore(out_dir)


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------

def _settings_key(cfg) -> str:
    d = cfg.to_dict()
    for k in ("seed", "quiet", "debug"):  # not part of the experiment's settings (debug: simulated interruptions)
        d.pop(k, None)
    d.get("data", {}).pop("store", None)
    return json.dumps(d, sort_keys=True, default=str)


def settings_conflicts(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between two config dicts. Keys present in only one of them
    are not conflicts (a config option added to the code later keeps its default, which old runs had)."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_conflicts(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def run_comparison(base_config, workdir: str | os.PathLike, curricula: Sequence[str] = presets.DEFAULT_CURRICULA,
                   seeds: int = 3, data: str = "", resume: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and compare; the whole of `python -m clips_jax.experiments.compare_curricula`.

    Args:
      base_config: the training ConfigDict (steps, sizes, ...); not modified.
      workdir: output folder (runs/, results.*, plots, experiment.json).
      curricula: experiment names of `presets.EXPERIMENTS`; the baseline is run first when listed.
      seeds: number of seeds (0..seeds-1, >= 1).
      data: a case-store folder; "" = the built-in phantoms of `base_config.data.phantoms`.
      resume: True continues an existing workdir (finished runs skipped, others resumed); False refuses a
        workdir that already holds an experiment (nothing is deleted).
      log: progress printer.
    Returns: {"rows": results rows, "notes": [...], "runs": {curriculum: {seed: "trained"|"skipped"}},
      "wall_s": seconds}.
    Raises: ConfigError for bad arguments, a refused or inconsistent workdir, or a store without test cases.
    """
    from clips_jax import trainer
    from clips_jax.data.store import CaseStore

    t0 = time.time()
    names = list(dict.fromkeys(curricula))
    for n in names:
        presets.get_experiment(n)
    if not names:
        raise ConfigError("--curricula is empty: name at least one experiment")
    if int(seeds) < 1:
        raise ConfigError(f"--seeds={seeds}: need at least one seed")
    if presets.BASELINE in names:
        names.remove(presets.BASELINE)
        names.insert(0, presets.BASELINE)
    workdir = Path(workdir)
    exp_file = workdir / "experiment.json"
    if exp_file.exists() and not resume:
        raise ConfigError(f"{workdir} already holds an experiment and --noresume was given; choose a new --workdir "
                          "(or drop --noresume to continue it)")
    workdir.mkdir(parents=True, exist_ok=True)

    base = base_config
    if data:
        store = CaseStore(data)
    else:
        store = trainer.ensure_store(base, log)
    if len(store.split_indices("test")) == 0:
        raise ConfigError(f"case store {store.cache_dir}: no 'test' cases; prepare it with a test split")
    key = _settings_key(base)
    if exp_file.exists():
        old = json.loads(exp_file.read_text())
        conflicts = settings_conflicts(json.loads(old.get("settings_key", "{}")), json.loads(key))
        if conflicts or old.get("store") != str(store.cache_dir.absolute()):
            what = ", ".join(conflicts[:5]) if conflicts else f"data {old.get('store')}"
            raise ConfigError(f"{exp_file}: this workdir was made with other settings ({what}); use a new "
                              "--workdir (results of different settings must not be mixed)")
    write_text_atomic(exp_file, json.dumps({"settings_key": key, "store": str(store.cache_dir.absolute()),
                                            "curricula": names, "seeds": int(seeds),
                                            "base_config": json.loads(base.to_json_best_effort())}, indent=1))

    seed_list = list(range(int(seeds)))
    runs: dict[str, dict[int, str]] = {}
    per_run_rows: dict[str, dict[int, list[dict]]] = {}
    curves: dict[str, list[list[dict]]] = {}
    used: dict[str, str] = {}

    def train_one(name: str, seed: int, store_dir) -> tuple[Any, Path, str]:
        cfg = run_config(base, name, seed, store_dir)
        run_dir = workdir / "runs" / name / f"seed{seed}"
        if run_finished(run_dir, cfg.steps):
            log(f"[{name} seed {seed}] finished earlier: skipped")
            return cfg, run_dir, "skipped"
        log(f"[{name} seed {seed}] training ({cfg.steps} steps, curriculum {cfg.curriculum.name}) in {run_dir}")
        t = time.time()
        trainer.train_and_evaluate(cfg, run_dir)
        log(f"[{name} seed {seed}] trained in {time.time() - t:.0f} s")
        return cfg, run_dir, "trained"

    teacher_store = None
    for name in names:
        used[name] = presets.get_experiment(name).preset
        runs[name], per_run_rows[name], curves[name] = {}, {}, []
    # Seed-major order: an interrupted comparison has every curriculum of the first seeds.
    for seed in seed_list:
        for name in names:
            store_dir = store.cache_dir.absolute()
            if presets.get_experiment(name).needs_teacher:
                if teacher_store is None:
                    # Bootstrapping (A3/A6): the teacher is the first seed's baseline model (trained first if
                    # needed).
                    tcfg, trun, _ = train_one(presets.BASELINE, seed_list[0], store.cache_dir.absolute())
                    teacher_store = make_teacher_store(store, tcfg, trun, workdir / "teacher_store", log)
                store_dir = teacher_store.cache_dir.absolute()
            cfg, run_dir, status = train_one(name, seed, store_dir)
            runs[name][seed] = status
            rows = evaluate_test(cfg, run_dir, store)
            per_run_rows[name][seed] = rows
            curves[name].append(trainer.read_metrics(run_dir))
            log(f"[{name} seed {seed}] test Dice {seed_means(rows)['dice']:.4f} over {len(rows)} cases")

    rows, notes = compare(per_run_rows, used)
    write_results_csv(workdir / "results.csv", rows)
    from clips_jax.metrics import plots

    plots.boxplots({n: [r for k in sorted(v) for r in v[k]] for n, v in per_run_rows.items()},
                   workdir / "boxplots.png")
    learning_curves_png(curves, workdir / "learning_curves.png")
    wall = time.time() - t0
    header = [f"- base config: steps {base.steps}, batch {base.data.batch_size}, patch {tuple(base.data.patch_shape)}, "
              f"model channels {tuple(base.model.channels)}",
              f"- data: {store.cache_dir} ({len(store.split_indices('train'))} train, "
              f"{len(store.split_indices('val'))} val, {len(store.split_indices('test'))} test cases)",
              f"- seeds: {seed_list}; evaluated checkpoint: best validation Dice (else last)",
              f"- curricula: " + ", ".join(f"{n} ({presets.EXPERIMENTS[n].family})" for n in names),
              f"- this invocation: {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall "
              f"({sum(s == 'trained' for r in runs.values() for s in r.values())} runs trained, "
              f"{sum(s == 'skipped' for r in runs.values() for s in r.values())} skipped)"]
    write_text_atomic(workdir / "results.md", results_markdown(rows, notes, header))
    log(f"results: {workdir / 'results.md'} ({wall:.0f} s)")
    return {"rows": rows, "notes": notes, "runs": runs, "wall_s": wall}


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def config_keys_in_argv(argv: Sequence[str]) -> set[str]:
    """Dotted config keys set on the command line: `--config.a.b=1`, `--config.a.b 1`, `--noconfig.a.b`
    (a boolean) -> {"a.b"}. (Keys set through `--flagfile` are not seen.)"""
    keys = set()
    for arg in argv:
        name = arg.lstrip("-")
        if arg.startswith("-") and name.startswith(("config.", "noconfig.")):
            keys.add(name.split(".", 1)[1].split("=", 1)[0])
    return keys


def apply_run_defaults(cfg, steps: int, overrides: bool = False, keep: set[str] | frozenset = frozenset()) -> None:
    """Set the experiment's run settings in place (config unlocked), except the dotted keys in `keep` (those the
    user set on the command line, which always win).

    Args:
      steps: > 0: `steps` training steps, validation and checkpoints `presets.EVALS_PER_RUN` times per run;
        0 keeps the config's steps and periods.
      overrides: also apply `presets.RUN_OVERRIDES`.
    """
    def put(key, value):
        if key in keep:
            return
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value

    if overrides:
        for key, value in presets.RUN_OVERRIDES.items():
            put(key, value)
    if steps > 0:
        put("steps", int(steps))
        every = max(1, math.ceil(int(cfg.steps) / presets.EVALS_PER_RUN))
        put("eval.every_steps", every)
        put("checkpoint.every_steps", every)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    default = str(Path(__file__).resolve().parent.parent.parent / "configs" / "default.py")
    config_flags.DEFINE_config_file("config", default, "Base training config (path[:variant]).",
                                    lock_config=False)
    flags.DEFINE_list("curricula", list(presets.DEFAULT_CURRICULA),
                      f"Experiments to compare (presets.py): {', '.join(presets.EXPERIMENTS)}.")
    flags.DEFINE_integer("seeds", 3, "Seeds per curriculum (0..seeds-1).")
    flags.DEFINE_string("workdir", "runs/compare_curricula", "Output folder.")
    flags.DEFINE_string("data", "", "Case store from `python -m clips_jax.data.prepare`; empty = built-in phantoms.")
    flags.DEFINE_bool("resume", True, "Continue an existing workdir (finished runs skipped); --noresume refuses an "
                                      "existing experiment workdir.")
    flags.DEFINE_bool("experiment_defaults", True, "Apply presets.RUN_OVERRIDES (settings of the default "
                      "comparison) over --config, except keys given as --config.KEY; --noexperiment_defaults uses "
                      "the config as given.")
    flags.DEFINE_integer("steps", presets.DEFAULT_STEPS,
                         "Training steps per run (experiment default, sized for ~30 min of the whole default "
                         "comparison on a 2-core CPU); 0 = the config's own steps/eval/checkpoint settings.")


def main(argv) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    cfg = f.config
    try:
        with cfg.unlocked():
            apply_run_defaults(cfg, int(f.steps), bool(f.experiment_defaults), keep=config_keys_in_argv(sys.argv))
            cfg.quiet = True
        run_comparison(cfg, f.workdir, curricula=f.curricula, seeds=f.seeds, data=f.data, resume=f.resume)
    except (ClipsError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
