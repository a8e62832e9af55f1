"""Validate the per-patient reliability score on phantoms in one command: `clips-reliability`.

Examples:
    clips-reliability --workdir runs/reliability          # 4 default U-Nets, 30 validation + >= 45 test cases
    clips-reliability --workdir runs/reliability --tta    # also flip test-time augmentation (8x inference)
    clips-reliability --config default:tiny --members 2 --val_cases 4 --test_lesion_cases 3 --workdir /tmp/rel

Question: does the reliability score of `clips_jax.metrics.reliability` find the badly segmented patients?
Steps (docs/reliability.md; everything resumable: re-running the command skips what is done):

1. members: `--members` runs of `--config` (default: the default U-Net on the built-in phantoms) with seeds
   0..n-1, the project's own training (`trainer.train_and_evaluate`, `WORKDIR/members/seed<k>`; a run whose
   summary.json records the configured steps is skipped);
2. ensemble: their best-validation checkpoints as one mean ensemble (`Ensemble.from_members`: members trained
   apart have no stacking conv), saved as the weights directory `WORKDIR/ensemble` (`clips-predict
   --weights WORKDIR/ensemble --stage_a_only` and `--hardness reliability:WORKDIR/ensemble` use it);
3. cohort: held-out phantoms of another dataset seed (`--cohort_seed`, never the training phantoms): the
   first `--val_cases` are the validation split, the following ones the test split, up to the one that
   brings the lesion-bearing test cases to `--test_lesion_cases`; prepared on the config's grid into
   `WORKDIR/cohort/store`;
4. predictions: each cohort case once through the ensemble by tiled inference with the config's evaluation
   tile and half of it as step, as `clips-predict --stage_a_tile <tile>` tiles stage A (one pass gives the
   ensemble and every member: `Ensemble.logits_with_members`), cached as `WORKDIR/predictions/<case>.npz`
   (float16);
5. validation split only: the temperature T (voxel NLL over every voxel of the validation cases,
   `clips_jax.metrics.calibration.fit_temperature`), then the review threshold maximising Youden's J for the
   worst tertile of Dice (`reliability.youden_threshold`); both are written to
   `WORKDIR/ensemble/reliability.json`, which `clips-predict` reads;
6. test split: AUROC of the review risk (1 - score) for the worst tertile of Dice among the lesion-bearing
   cases (primary; DeLong 95 % interval), Spearman correlation with |TMTV error| (all test cases),
   sensitivity / specificity of the review flag, ECE before / after T and the reliability diagram, and the
   AUROC of each measure alone (secondary; and the phantoms' latent difficulty as a reference).

Outputs: `WORKDIR/reliability.md`, `cases.csv` (one row per cohort case), `results.json`,
`reliability_diagram.png`, `score_vs_dice.png`. The masks are the ensemble probability > 0.5 on the store grid
(6 mm), as stage A of `clips-predict --stage_a_only`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clips_jax.errors import ConfigError
from clips_jax.fileio import atomic_path, json_safe, write_text_atomic
from clips_jax.metrics import calibration as cal
from clips_jax.metrics import reliability as rel
from clips_jax.reliability_report import SETTINGS_FILE

CASE_MEASURES = (
    "member_dice_mean",
    "member_tmtv_cv",
    "member_disagreement",
    "member_sd_mean",
    "tta_dice_mean",
    "entropy_mean_bits",
    "uncertain_ml",
    "expected_dice",
)
"""Measures of `reliability.measures` written per case (cases.csv) and tested alone (secondary AUROCs)."""
RISK_OF = {
    "member_dice_mean": lambda v: 1.0 - v,
    "tta_dice_mean": lambda v: 1.0 - v,
    "expected_dice": lambda v: 1.0 - v,
}
"""Orientation of the measures where larger = more reliable (the rest: larger = riskier)."""


# ---------------------------------------------------------------------------------------------------------
# 1-2: members and the ensemble
# ---------------------------------------------------------------------------------------------------------


def member_config(base, seed: int):
    """A deep copy of `base` with `seed` (and quiet logging)."""
    import ml_collections

    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.seed = int(seed)
    cfg.quiet = True
    return cfg


def train_members(base, workdir: Path, n: int, log: Callable[[str], None]) -> list[Path]:
    """Train (or skip, when finished) `n` runs of `base` with seeds 0..n-1 in `workdir/members/seed<k>`."""
    from clips_jax import trainer
    from clips_jax.experiments.compare_curricula import run_finished

    dirs = []
    for k in range(n):
        run_dir = workdir / "members" / f"seed{k}"
        if run_finished(run_dir, int(base.steps)):
            log(f"member {k + 1}/{n}: finished earlier ({run_dir})")
        else:
            t0 = time.time()
            summary = trainer.train_and_evaluate(member_config(base, k), run_dir)
            best = summary.get("best", {}).get("val_dice", float("nan"))
            log(f"member {k + 1}/{n}: trained in {time.time() - t0:.0f} s, best validation Dice {best:.3f}")
        dirs.append(run_dir)
    return dirs


def build_ensemble(run_dirs: Sequence[Path], out: Path, log: Callable[[str], None]):
    """The mean ensemble of the runs' best checkpoints, saved as the weights directory `out` (kept when it
    exists and names the same runs). Returns the loaded `Ensemble`."""
    from clips_jax.model import Ensemble, load_model, read_weights_meta, save_weights
    from clips_jax.runs import load_run_model

    runs = [str(Path(d).absolute()) for d in run_dirs]
    if (out / "clips_weights.json").is_file():
        if read_weights_meta(out).get("source", {}).get("runs") == runs:
            return load_model(out, "ensemble")
        raise ConfigError(f"{out}: an ensemble of other runs; use a new --workdir")
    unets = [load_run_model(d, "best")[0] for d in run_dirs]
    ens = Ensemble.from_members(unets)
    save_weights(out, {"ensemble": ens}, source={"runs": runs, "combine": "mean of the members' probabilities"})
    log(f"ensemble of {len(unets)} members saved to {out}")
    return ens


# ---------------------------------------------------------------------------------------------------------
# 3: the held-out cohort
# ---------------------------------------------------------------------------------------------------------


def _n_lesions(raw: Path, cid: str) -> int:
    return int(json.loads((raw / cid / "truth.json").read_text())["n_lesions"])


def cohort_ids(raw: Path, seed: int, size, val_cases: int, test_lesion_cases: int, log) -> dict[str, list[str]]:
    """Generate phantoms of dataset `seed` into `raw` until the split is complete; {"val": ids, "test": ids}."""
    from clips_jax.data.phantoms import case_id, write_phantoms

    n = val_cases + math.ceil(test_lesion_cases / 0.75)
    while True:
        write_phantoms(raw, n, seed, size, log=log)
        ids = [case_id(seed, i) for i in range(n)]
        test, lesions = [], 0
        for cid in ids[val_cases:]:
            test.append(cid)
            lesions += _n_lesions(raw, cid) > 0
            if lesions >= test_lesion_cases:
                return {"val": ids[:val_cases], "test": test}
        n += test_lesion_cases - lesions + 2


def ensure_cohort(config, workdir: Path, seed: int, val_cases: int, test_lesion_cases: int, log):
    """The prepared cohort store (`WORKDIR/cohort/store`) and its raw phantom folder."""
    from clips_jax.data.prepare import prepare_dataset
    from clips_jax.data.store import CaseStore

    raw, store_dir = workdir / "cohort" / "raw", workdir / "cohort" / "store"
    split = cohort_ids(raw, seed, config.data.phantoms.size, val_cases, test_lesion_cases, log)
    spacing = config.data.spacing_mm or "native"
    prepare_dataset(raw, store_dir, spacing_mm=spacing, seed=seed, split_json=split, log=log)
    return CaseStore(store_dir), raw


# ---------------------------------------------------------------------------------------------------------
# 4: predictions (cached)
# ---------------------------------------------------------------------------------------------------------


def predict_case(
    image: np.ndarray, pair, n_members: int, tile, step, batch_size: int = 1, tta: bool = False
) -> dict[str, np.ndarray]:
    """Tiled inference of one volume with a reference model, members in the same pass.

    Args:
      image: `(z, y, x, C)` input channels (`make_eval_cases`' "image"). pair: (predictor, params); for an
        `Ensemble` that of `logits_with_members` (`n_members` > 0), else the plain model's (`n_members` 0).
      tile, step, batch_size: as the config's eval tiles (tiles reaching the end of every axis, checked).
      tta: also the 8 flip passes.
    Returns:
      {"prob": (z, y, x), "members": (n, z, y, x) (only with members), "tta": (8, z, y, x) (only with tta)}
      float32.
    """
    from clips_jax.evaluation import check_coverage
    from clips_jax.inference import tiled_inference

    tile, step = tuple(tile), tuple(step)
    check_coverage(image.shape[:3], tile, step)
    passes: list[np.ndarray] = []
    out = tiled_inference(
        image,
        pair[0],
        params=pair[1],
        tile_shape=tile,
        step=step,
        batch_size=int(batch_size),
        cover_end=True,
        softmax_groups=1 + n_members,
        tta=tta,
        on_pass=(lambda f, p: passes.append(np.array(p[..., 1]))) if tta else None,
    )
    res = {"prob": np.array(out[..., 1])}
    if n_members:
        res["members"] = np.moveaxis(out[..., 3::2], -1, 0).copy()
    if tta:
        res["tta"] = np.stack(passes)
    return res


def reference_pair(model) -> tuple[tuple, int]:
    """((predictor, params), n_members) of a reference model: an `Ensemble` with its members, else the model."""
    from clips_jax.inference import nnx_predictor
    from clips_jax.model import Ensemble

    if isinstance(model, Ensemble):
        return nnx_predictor(model, "logits_with_members"), int(model.n_members)
    return nnx_predictor(model), 0


def predict_step(eval_cfg) -> tuple[int, int, int]:
    """Half the config's evaluation tile: the step of `clips-predict`'s stage A (`--stage_a_tile` / 2), so that
    the scores, threshold and temperature fixed here are those `clips-predict` produces with these weights and
    `--stage_a_tile` = the tile (the training's validation steps differ, and the score moves with the tiling)."""
    return tuple(int(t) // 2 for t in eval_cfg.tile_shape)


def predict_cohort(ensemble, store, eval_cfg, out: Path, tta: bool, log) -> None:
    """Every cohort case's predictions into `out/<case>.npz` (float16), skipping those present."""
    from clips_jax import batch
    from clips_jax.data.pipeline import make_eval_cases

    pair, n_members = reference_pair(ensemble)
    e = eval_cfg
    idx = np.concatenate([store.split_indices("val"), store.split_indices("test")])
    t0 = time.time()

    def one(cid: str):
        path = out / f"{cid}.npz"
        if path.is_file():
            return batch.skipped("predicted earlier")
        case = next(make_eval_cases(store, [store.index(cid)]))
        res = predict_case(case["image"], pair, n_members, e.tile_shape, predict_step(e), e.batch_size, tta)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **{k: v.astype(np.float16) for k, v in res.items()})
        return batch.done(f"predicted ({time.time() - t0:.0f} s)")

    failed = batch.for_each_case([store.ids[int(i)] for i in idx], one, log=log).failed
    if failed:
        raise ConfigError(f"prediction failed for {sorted(failed)}: {next(iter(failed.values()))}")


def load_prediction(out: Path, cid: str) -> dict[str, np.ndarray]:
    with np.load(out / f"{cid}.npz") as z:
        return {k: z[k].astype(np.float32) for k in z.files}


# ---------------------------------------------------------------------------------------------------------
# 5-6: temperature, scores, statistics
# ---------------------------------------------------------------------------------------------------------


def fit_cohort_temperature(store, pred_dir: Path) -> float:
    """T fitted on every voxel of the validation cases (`calibration.fit_temperature`; the standard likelihood
    of Guo et al. 2017). Not on the lesion neighbourhoods: they are selected by the prediction itself (p > 0.5),
    which biases T (measured on the phantoms: T = 5.7 there, and a 100 times worse all-voxel ECE;
    docs/reliability.md)."""
    from clips_jax.data.pipeline import make_eval_cases

    hist = None
    for case in make_eval_cases(store, "val"):
        prob = load_prediction(pred_dir, case["id"])["prob"]
        hist = cal.add_bins(hist, cal.logit_histogram(prob, case["label"]))
    return 1.0 if hist is None else cal.fit_temperature(hist)


def score_cohort(store, pred_dir: Path, raw: Path, temperature: float, n_bins: int = 10) -> tuple[list[dict], dict]:
    """One row per cohort case (split, case, latent difficulty, Dice, TMTVs, |TMTV error|, measures, score)
    and the test split's calibration bins {"raw"|"scaled": {"all"|"neighbourhood": bins}}."""
    from clips_jax.data.pipeline import make_eval_cases
    from clips_jax.evaluation import validation_row

    rows, bins = [], {"raw": {"all": None, "neighbourhood": None}, "scaled": {"all": None, "neighbourhood": None}}
    splits = {store.ids[int(i)]: s for s in ("val", "test") for i in store.split_indices(s)}
    for case in make_eval_cases(store, np.concatenate([store.split_indices("val"), store.split_indices("test")])):
        cid, spacing = case["id"], case["geometry"].spacing_mm
        p = load_prediction(pred_dir, cid)
        scaled = cal.apply_temperature(p["prob"], temperature)
        a = rel.assess(scaled, p["prob"] > 0.5, spacing, p.get("members"), p.get("tta"), candidate_prob=p["prob"])
        source = store.cases[store.index(cid)].get("source", cid)
        difficulty = json.loads((raw / str(source) / "truth.json").read_text())["difficulty"]
        row = {"split": splits[cid], "case": cid, "difficulty": difficulty, **validation_row(p["prob"], case)}
        row.update({k: a[k] for k in CASE_MEASURES}, score=a["score"], review_risk=1.0 - a["score"])
        rows.append(row)
        if splits[cid] == "test":
            where = cal.lesion_neighbourhood(p["prob"], case["label"], spacing)
            for kind, prob in (("raw", p["prob"]), ("scaled", scaled)):
                for region, w in (("all", None), ("neighbourhood", where)):
                    bins[kind][region] = cal.add_bins(
                        bins[kind][region], cal.calibration_bins(prob, case["label"], n_bins, w)
                    )
    return rows, bins


def _risk(rows: Sequence[dict], key: str) -> np.ndarray:
    f = RISK_OF.get(key, lambda v: v)
    return np.array([np.nan if r[key] is None else f(float(r[key])) for r in rows], np.float64)


def split_statistics(val: Sequence[dict], test: Sequence[dict]) -> dict:
    """The threshold from `val`, and on `test` the AUROC (DeLong), Spearman, flag performance, secondary AUROCs."""
    val_l = [r for r in val if math.isfinite(r["dice"])]
    test_l = [r for r in test if math.isfinite(r["dice"])]
    val_bad = rel.worst_tertile([r["dice"] for r in val_l])
    youden = rel.youden_threshold([r["score"] for r in val_l], val_bad)
    bad = rel.worst_tertile([r["dice"] for r in test_l])
    risk = _risk(test_l, "review_risk")
    flag = np.array([r["score"] < youden["threshold"] for r in test_l])
    secondary = {k: rel.auroc(_risk(test_l, k), bad) for k in (*CASE_MEASURES, "difficulty")}
    secondary["small_predicted_tmtv"] = rel.auroc([-r["tmtv_pred_ml"] for r in test_l], bad)  # a trivial baseline
    return {
        "threshold": youden,
        "auroc": rel.delong_interval(risk, bad),
        "spearman_abs_tmtv_error": rel.spearman(_risk(test, "review_risk"), [r["tmtv_abs_err_ml"] for r in test]),
        "spearman_dice": rel.spearman(risk, [r["dice"] for r in test_l]),
        "spearman_rel_tmtv_error": rel.spearman(risk, [r["tmtv_abs_err_ml"] / r["tmtv_true_ml"] for r in test_l]),
        "test_flag": {
            "flagged": int(flag.sum()),
            "sensitivity": float(flag[bad].mean()) if bad.any() else float("nan"),
            "specificity": float((~flag[~bad]).mean()) if (~bad).any() else float("nan"),
        },
        "worst_tertile_dice_max": float(max(r["dice"] for r, b in zip(test_l, bad) if b)),
        "secondary_auroc": secondary,
        "n": {"val": len(val), "val_lesion": len(val_l), "test": len(test), "test_lesion": len(test_l)},
    }


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def write_cases_csv(path: Path, rows: Sequence[dict]) -> None:
    cols = list(rows[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r[c] is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in cols])
    write_text_atomic(path, buf.getvalue())


def _f(v, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _t_meaning(t: float) -> str:
    if t > 1.05:
        return "T > 1: the ensemble was over-confident"
    if t < 0.95:
        return "T < 1: the ensemble was under-confident"
    return "T near 1: nearly calibrated already"


def report_markdown(res: dict) -> str:
    """reliability.md from the results dict of `run_validation`."""
    s, a, t = res["statistics"], res["statistics"]["auroc"], res["statistics"]["threshold"]
    sp, fl, ece = s["spearman_abs_tmtv_error"], s["test_flag"], res["ece"]
    lines = [
        "# Reliability score: validation on phantoms",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; wall time of this invocation {res['seconds']['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items() if k != "total")
        + "; a resumed invocation skips what is done); the members' training loops took "
        + f"{_f(res['member_train_s'], 0)} s (their summary.json), best validation Dice "
        + ", ".join(_f(d) for d in res["member_val_dice"]),
        "",
        f"Ensemble: {res['members']} members of `{res['config']}` (seeds 0..{res['members'] - 1}), mean of their "
        f"probabilities; cohort: phantoms of dataset seed {res['cohort_seed']}, {s['n']['val']} validation "
        f"({s['n']['val_lesion']} with lesions) and {s['n']['test']} test cases ({s['n']['test_lesion']} with "
        f"lesions); TTA {'on' if res['tta'] else 'off'}. Score = geometric mean of the member agreement (mean "
        "pairwise Dice) and the expected Dice under the temperature-scaled probabilities "
        "(`clips_jax.metrics.reliability`).",
        "",
        "## Primary: does the score find the worst tertile of Dice? (test split)",
        "",
        f"- **AUROC {_f(a['auroc'])}** (95 % DeLong interval {_f(a['ci_low'])}-{_f(a['ci_high'])}; "
        f"{a['n_pos']} worst-tertile cases with Dice <= {_f(s['worst_tertile_dice_max'])} vs {a['n_neg']} others); "
        f"target >= 0.8: {'met' if a['auroc'] >= 0.8 else 'NOT met'}",
        f"- Spearman correlation of the review risk (1 - score) with |TMTV error|: rho {_f(sp['rho'])} "
        f"(p {sp['p']:.2g}, n {sp['n']}); with Dice (lesion cases): rho {_f(s['spearman_dice']['rho'])}; with "
        f"the relative TMTV error |error| / true TMTV (lesion cases): rho {_f(s['spearman_rel_tmtv_error']['rho'])}",
        f"- review threshold fixed on the validation split (Youden's J {_f(t['j'])}): **score < {_f(t['threshold'])}**;"
        f" on the test split it flags {fl['flagged']} of {s['n']['test_lesion']} lesion cases, sensitivity "
        f"{_f(fl['sensitivity'], 2)}, specificity {_f(fl['specificity'], 2)} for the worst tertile",
        "",
        "## Calibration of the voxel probabilities (test split)",
        "",
        f"Temperature fitted on the validation split: T = {res['temperature']:.3f} ({_t_meaning(res['temperature'])}).",
        "",
        "| voxels | ECE raw | ECE after T |",
        "|---|---|---|",
        f"| all voxels | {_f(ece['raw']['all'], 4)} | {_f(ece['scaled']['all'], 4)} |",
        f"| lesion neighbourhood (truth or p > 0.5, +6 mm) | {_f(ece['raw']['neighbourhood'], 4)} | "
        f"{_f(ece['scaled']['neighbourhood'], 4)} |",
        "",
        "All voxels is the unbiased summary (dominated by confident background); the lesion neighbourhood is "
        "selected by the truth and the prediction, which biases its diagram (towards lesion where the truth "
        "selects, towards background where the prediction does).",
        "",
        "Figures: `reliability_diagram.png`, `score_vs_dice.png`.",
        "",
        "## Secondary: each measure alone (AUROC for the worst tertile, test split)",
        "",
        "| measure (oriented: larger = riskier) | AUROC |",
        "|---|---|",
        *[f"| {k} | {_f(v)} |" for k, v in s["secondary_auroc"].items()],
        "",
        "`difficulty` is the phantoms' latent difficulty (known only for phantoms) and `small_predicted_tmtv` "
        "the predicted TMTV (smaller = riskier): references a score must beat, not measures.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(workdir: Path, res: dict, rows: Sequence[dict], bins: dict) -> None:
    from clips_jax.metrics import plots

    write_cases_csv(workdir / "cases.csv", rows)
    ece, t = res["ece"], res["temperature"]
    curves = {
        f"{label}, {kind}: ECE {ece[key][region]:.4f}": bins[key][region]
        for region, label in (("all", "all voxels"), ("neighbourhood", "lesion neighbourhood"))
        for key, kind in (("raw", "raw"), ("scaled", f"T = {t:.2f}"))
    }
    plots.reliability_diagram(curves, workdir / "reliability_diagram.png", "test split")
    test = [r for r in rows if r["split"] == "test" and math.isfinite(r["dice"])]
    bad = rel.worst_tertile([r["dice"] for r in test])
    thr = res["statistics"]["threshold"]["threshold"]
    auc = res["statistics"]["auroc"]["auroc"]
    plots.score_scatter(
        [r["score"] for r in test],
        [r["dice"] for r in test],
        bad,
        thr,
        workdir / "score_vs_dice.png",
        f"test split: AUROC {auc:.3f} for the worst tertile",
    )
    write_text_atomic(workdir / "results.json", json.dumps(json_safe(res), indent=1, allow_nan=False))
    write_text_atomic(workdir / "reliability.md", report_markdown(res))


# ---------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------


def _check_workdir(workdir: Path, settings: dict) -> None:
    """Record the settings in `workdir/experiment.json`; refuse a workdir made with other settings."""
    path = workdir / "experiment.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"{workdir}: made with other settings ({', '.join(diff)}); use a new --workdir")
    else:
        write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True))


def run_validation(
    config,
    workdir: str | Path,
    *,
    members: int = 4,
    cohort_seed: int = 1,
    val_cases: int = 30,
    test_lesion_cases: int = 45,
    tta: bool = False,
    command: str = "",
    config_name: str = "default",
    log: Callable[[str], None] = print,
) -> dict:
    """Steps 1-6 of the module docstring; returns the results dict (also `WORKDIR/results.json`)."""
    if members < 2 or val_cases < 3 or test_lesion_cases < 3:
        raise ConfigError("need --members >= 2, --val_cases >= 3 and --test_lesion_cases >= 3")
    if config.data.store:
        raise ConfigError("clips-reliability validates on built-in phantoms (known truth); leave data.store empty")
    workdir = Path(workdir).absolute()
    settings = {"config": config.to_dict(), "members": members, "cohort_seed": cohort_seed}
    settings.update(val_cases=val_cases, test_lesion_cases=test_lesion_cases, tta=bool(tta))
    settings.update(tiling="eval tile, step tile / 2 (as clips-predict's stage A)")
    _check_workdir(workdir, json.loads(json.dumps(json_safe(settings))))
    sec, t0 = {}, time.time()

    def lap(name: str, since: float) -> float:
        sec[name] = time.time() - since
        return time.time()

    run_dirs = train_members(config, workdir, members, log)
    t = lap("training", t0)
    ensemble = build_ensemble(run_dirs, workdir / "ensemble", log)
    store, raw = ensure_cohort(config, workdir, cohort_seed, val_cases, test_lesion_cases, log)
    t = lap("cohort", t)
    predict_cohort(ensemble, store, config.eval, workdir / "predictions", tta, log)
    t = lap("inference", t)
    temperature = fit_cohort_temperature(store, workdir / "predictions")
    rows, bins = score_cohort(store, workdir / "predictions", raw, temperature)
    stats = split_statistics([r for r in rows if r["split"] == "val"], [r for r in rows if r["split"] == "test"])
    lap("scoring", t)
    sec["total"] = time.time() - t0
    res = {
        "command": command,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "config": config_name,
        "members": members,
        "cohort_seed": cohort_seed,
        "tta": bool(tta),
        "member_train_s": sum(_summary(d).get("wall_s", float("nan")) for d in run_dirs),
        "member_val_dice": [_summary(d).get("best", {}).get("val_dice") for d in run_dirs],
        "temperature": temperature,
        "statistics": stats,
        "ece": {k: {r: cal.expected_calibration_error(b) for r, b in v.items()} for k, v in bins.items()},
        "seconds": sec,
    }
    write_settings(workdir / "ensemble", temperature, stats["threshold"]["threshold"], config.eval, res)
    write_outputs(workdir, res, rows, bins)
    return res


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def write_settings(weights_dir: Path, temperature: float, threshold: float, eval_cfg, res: dict) -> None:
    """`weights_dir/reliability.json`: what `clips-predict` applies with these weights."""
    doc = {
        "temperature": temperature,
        "review_threshold": threshold,
        "tile_shape": list(eval_cfg.tile_shape),
        "tile_step": list(predict_step(eval_cfg)),
        "fixed_on": "validation split of the phantom cohort (clips-reliability; docs/reliability.md)",
        "test_auroc": res["statistics"]["auroc"]["auroc"],
        "date": res["date"],
    }
    write_text_atomic(weights_dir / SETTINGS_FILE, json.dumps(json_safe(doc), indent=1, allow_nan=False))


def machine_description() -> str:
    import os

    import jax

    return f"{os.cpu_count()}-core {jax.default_backend().upper()}"


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags
    from ml_collections import config_flags

    from clips_jax.configs import default_path

    config_flags.DEFINE_config_file(
        "config", default_path(), "Members' training config (packaged name or path[:variant]).", flag_values=fv
    )
    flags.DEFINE_string("workdir", "runs/reliability", "Output folder (resumable).", flag_values=fv)
    flags.DEFINE_integer("members", 4, "Ensemble members (seeds 0..members-1).", flag_values=fv)
    flags.DEFINE_integer(
        "cohort_seed", 1, "Dataset seed of the held-out phantoms (not the training one).", flag_values=fv
    )
    flags.DEFINE_integer("val_cases", 30, "Validation cases (temperature and review threshold).", flag_values=fv)
    flags.DEFINE_integer(
        "test_lesion_cases", 45, "Lesion-bearing test cases (lesion-free ones come on top).", flag_values=fv
    )
    flags.DEFINE_bool(
        "tta", False, "Also flip test-time augmentation (8 passes; flip agreement in the score).", flag_values=fv
    )


def run_from_flags(fv, argv: Sequence[str]) -> int:
    from absl import logging

    from clips_jax.train import load_config

    logging.set_verbosity(logging.WARNING)
    cfg = load_config(fv)
    t0 = time.time()
    res = run_validation(
        cfg,
        fv["workdir"].value,
        members=fv["members"].value,
        cohort_seed=fv["cohort_seed"].value,
        val_cases=fv["val_cases"].value,
        test_lesion_cases=fv["test_lesion_cases"].value,
        tta=fv["tta"].value,
        command=" ".join(["clips-reliability", *argv[1:]]),
        config_name=_config_name(argv),
    )
    a = res["statistics"]["auroc"]
    print(
        f"done in {time.time() - t0:.0f} s: AUROC {a['auroc']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f}) for the "
        f"worst tertile of Dice; review threshold {res['statistics']['threshold']['threshold']:.3f}; "
        f"report {Path(fv['workdir'].value) / 'reliability.md'}"
    )
    return 0


def _config_name(argv: Sequence[str]) -> str:
    """The --config value as given (a packaged name is resolved to a path by then: show its file stem)."""
    for k, a in enumerate(argv):
        value = a.partition("=")[2] if a.startswith("--config=") else argv[k + 1] if a == "--config" else None
        if value:
            name, _, variant = value.partition(":")
            return Path(name).stem + (f":{variant}" if variant else "")
    return "default"


def main(argv: Sequence[str] | None = None) -> int:
    """`clips-reliability`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""
    from clips_jax import cli
    from clips_jax.train import resolve_config_args

    argv = resolve_config_args(list(sys.argv if argv is None else argv))
    return cli.run_tool(argv, define_flags, lambda fv: run_from_flags(fv, argv), __doc__)


if __name__ == "__main__":
    sys.exit(main())
