"""Score predicted masks against ground truth, per patient and per cohort: `clips-evaluate`.

Examples:
    clips-evaluate --pred results/ --truth data/ --suv data/ --out eval/
    clips-evaluate --pred baseline=runs/a/pred --pred spl=runs/b/pred --truth data/ --out eval/ --tolerance_mm=3
    python -m clips_jax.evaluate --pred results/ --truth data/ --out eval/ --nomips   # without the script

Folder layouts accepted for --truth and --pred (matched by case id):
    DIR/<case>.nii.gz   DIR/<case>_SEG.nii.gz   DIR/<case>/SEG.nii.gz  (autoPET; a folder's id is its path
    under DIR made file-name safe, "/" -> "__": "PETCT_x__05-02-2002-NA-PET-CT", the id clips-predict gives
    that study's outputs, `clips_jax.data.study.study_id`); `.nii` works too. For --suv: DIR/<case>_SUV.nii.gz,
    DIR/<case>.nii.gz or DIR/<case>/SUV.nii.gz. A voxel is foreground when its value is > 0.5.

Outputs (all written atomically), with one --pred in OUT itself, with several in OUT/<name>/:
    metrics.csv         one row per case, columns `clips_jax.metrics.COLUMNS` (docs/metrics.md); plus
                        `reliability` and `review` when clips-predict's `<case>_report.json` lies next to the mask
    reports/<case>.txt  per-patient text report (the fields of the CLIPS precursor's report)
    mips/<case>.png     coronal + sagittal PET MIPs with truth/prediction outlines (needs --suv)
    bland_altman.png    TMTV agreement
    calibration.png     reliability diagram, when lesion probability maps (`<case>_PROB.nii.gz`, written by
                        clips-predict --save_probabilities) lie next to the masks
and OUT/summary.md (mean, median, IQR per column, lesion-free cases apart, skipped cases listed; with
reliability scores: how well they find the worst tertile of Dice (AUROC) and track |TMTV error| (Spearman);
with probability maps: the expected calibration error) and, with several --pred, OUT/boxplots.png (Dice, NSD,
TMTV error per experiment). Definitions: docs/reliability.md.

Problems with single cases (missing on one side, unreadable file, prediction or SUV grid differing from
the ground-truth grid) are printed on stderr, listed in summary.md, and the case is skipped; the other
cases go on. Exit status (README, "Command-line convention"): 0 if at least one case was scored, 1 if none
or on an input error (a missing or empty folder), 2 on a usage error.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import load_nifti
from clips_jax.errors import ConfigError, DataError
from clips_jax.fileio import safe_id, write_text_atomic
from clips_jax.metrics.lesions import dmax_mm
from clips_jax.metrics.report import case_metrics, case_report_text, summarise, summary_markdown, write_metrics_csv

__all__ = ["find_cases", "parse_pred_args", "evaluate", "main"]

_NIFTI_EXTS = (".nii.gz", ".nii")
_ROLE_FILE = {"seg": "SEG", "suv": "SUV"}
# Top-level files with these suffixes belong to another role and are never taken as `<case>.nii.gz`.
_OTHER_SUFFIXES = {"SEG", "SUV", "CT", "CTres", "PET", "PRED", "PROB"}
RELIABILITY_COLUMNS = ("reliability", "review")
"""Extra metrics.csv columns from clips-predict's report next to a mask: the score and the flag (1/0)."""


def _stem(name: str) -> str | None:
    for ext in _NIFTI_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def find_cases(folder: str | Path, role: str = "seg") -> dict[str, Path]:
    """Map case id -> NIfTI file for one folder.

    Args:
      folder: directory in one of the accepted layouts (see the module docstring).
      role: "seg" (masks: --truth / --pred) or "suv" (--suv).
    Returns:
      {case_id: path}, sorted by case id. `<case>_SEG` (or `_SUV`) and `<case>/SEG` files take precedence
      over a plain `<case>.nii.gz` with the same id. Ids are those clips-predict names its outputs by: a
      `SEG` file's id is its folder's `study_id` under `folder` (`PETCT_x/<date>/SEG.nii.gz` ->
      "PETCT_x__<date>"), a file's is its stem made file-name safe (`safe_id`).
    Raises:
      DataError naming the folder when it does not exist or holds no usable NIfTI file, or when two different
      names give one case id (`a b/` and `a_b/`: one case would hide the other).
    """
    from clips_jax.data.study import study_id

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    tag = _ROLE_FILE[role]
    explicit: dict[str, Path] = {}
    plain: dict[str, Path] = {}
    named: dict[str, str] = {}  # case id -> the name it came from (a sub-folder path or a file stem)

    def claim(found: dict[str, Path], name: str, cid: str, path: Path) -> None:
        if named.setdefault(cid, name) != name:
            raise DataError(
                f"{folder}: {named[cid]!r} and {name!r} both give the case id {cid!r} (names are made file-name "
                "safe, sub-folders joined with '__'); rename one"
            )
        found.setdefault(cid, path)

    for ext in _NIFTI_EXTS:
        for p in sorted(folder.rglob(tag + ext)):
            if p.parent != folder and p.is_file():
                claim(explicit, p.parent.relative_to(folder).as_posix(), study_id(folder, p.parent), p)
    for p in sorted(folder.iterdir()):
        stem = _stem(p.name)
        if stem is None or not p.is_file() or stem == tag:
            continue
        if stem.endswith("_" + tag):
            claim(explicit, stem[: -len(tag) - 1], safe_id(stem[: -len(tag) - 1]), p)
        elif "_" not in stem or stem.rsplit("_", 1)[1] not in _OTHER_SUFFIXES:
            claim(plain, stem, safe_id(stem), p)
    found = {**plain, **explicit}
    if not found:
        raise DataError(
            f"{folder}: no NIfTI {'masks' if role == 'seg' else 'SUV images'} found; expected "
            f"<case>.nii.gz, <case>_{tag}.nii.gz or <case>/{tag}.nii.gz"
        )
    return dict(sorted(found.items()))


def parse_pred_args(values: Sequence[str]) -> dict[str, Path]:
    """Parse repeated --pred values `NAME=DIR` or `DIR` into {name: folder}.

    An unnamed folder is named after its last path component. Raises ConfigError on duplicate names.
    """
    out: dict[str, Path] = {}
    for v in values:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)=(.+)", v)
        name, folder = (m.group(1), Path(m.group(2))) if m else (Path(v).name or "pred", Path(v))
        if name in out:
            raise ConfigError(f"--pred {v}: experiment name {name!r} given twice; use NAME=DIR with distinct names")
        out[name] = folder
    return out


def _grid_text(g: Geometry) -> str:
    sp = ", ".join(f"{s:.4g}" for s in g.spacing_mm)
    org = ", ".join(f"{o:.4g}" for o in g.origin_mm)
    return f"shape {g.shape}, spacing ({sp}) mm, origin ({org}) mm"


def _load_mask(path: Path) -> tuple[np.ndarray, Geometry]:
    arr, geom = load_nifti(path, np.float32)
    return arr > 0.5, geom


def _safe(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "__", case)


def evaluate(
    preds: dict[str, Path],
    truth_dir: Path,
    out_dir: Path,
    suv_dir: Path | None = None,
    *,
    tolerance_mm: float = 5.0,
    lesion_threshold: float = 0.5,
    suv_threshold: float = 4.0,
    mips: bool = True,
    log=None,
) -> tuple[dict[str, list[dict]], list[str]]:
    """Score every experiment's predictions against the ground truth and write all outputs.

    Args:
      preds: experiment name -> prediction folder. truth_dir, suv_dir: folders (see find_cases).
      out_dir: output folder (created). Other arguments: metric settings; `mips`: draw MIPs when SUV exists.
      log: callable taking one message line (default: print to stderr).
    Returns:
      ({name: metric rows (dicts with "case" + metric columns)}, [problem messages]).
    Raises:
      DataError if a folder is missing or empty (nothing can be scored).
    """
    from clips_jax.metrics import plots  # matplotlib only when outputs are drawn

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    problems: list[str] = []

    def problem(msg: str) -> None:
        problems.append(msg)
        log(msg)

    metric_kw = dict(tolerance_mm=tolerance_mm, lesion_threshold=lesion_threshold, suv_threshold=suv_threshold)
    truth_cases, suv_cases, pred_cases = _find_inputs(preds, truth_dir, suv_dir, problem)
    exp_dir = {name: (out_dir if len(preds) == 1 else out_dir / _safe(name)) for name in preds}
    rows: dict[str, list[dict]] = {name: [] for name in preds}
    bins: dict[str, dict] = {name: {} for name in preds}
    for case, truth_path in truth_cases.items():
        loaded = _load_truth_and_suv(case, truth_path, suv_dir, suv_cases, problem)
        if loaded is None:
            continue
        truth, tgeom, suv = loaded
        for name in preds:
            pred = _load_prediction(case, name, preds[name], pred_cases[name], tgeom, problem)
            if pred is None:
                continue
            row = {"case": case, **case_metrics(pred, truth, tgeom.spacing_mm, suv, **metric_kw)}
            row.update(_read_reliability(pred_cases[name][case], problem))
            prob = _load_probability(case, name, pred_cases[name][case], tgeom, problem)
            if prob is not None:
                _add_calibration(bins[name], prob, truth, tgeom.spacing_mm)
            rows[name].append(row)
            _write_case_outputs(
                exp_dir[name], name, case, row, pred, truth, suv, tgeom.spacing_mm, mips=mips, plots=plots, **metric_kw
            )
    _write_cohort_outputs(rows, exp_dir, out_dir, problems, plots=plots, bins=bins, **metric_kw)
    return rows, problems


def _sidecar(mask_path: Path, suffix: str) -> Path:
    """The file clips-predict writes beside a mask: `<id>_SEG.nii.gz` (or `<id>.nii.gz`) -> `<id><suffix>`;
    `<case>/SEG.nii.gz` -> `<case>/<suffix without its leading "_">`."""
    name = mask_path.name
    stem = _stem(name) or name
    if stem == "SEG":
        return mask_path.parent / suffix.lstrip("_")
    return mask_path.parent / f"{stem[:-4] if stem.endswith('_SEG') else stem}{suffix}"


def _read_reliability(mask_path: Path, problem) -> dict:
    """{"reliability": score, "review": 1.0/0.0} from the predict report beside the mask; {} when there is none
    (or it has no reliability record); an unreadable report is reported through `problem`."""
    path = _sidecar(mask_path, "_report.json")
    if not path.is_file():
        return {}
    try:
        r = json.loads(path.read_text()).get("reliability")
    except (OSError, ValueError) as e:
        problem(f"{path}: unreadable report ({e}); no reliability score for this case")
        return {}
    if not r or r.get("score") is None:
        return {}
    return {"reliability": float(r["score"]), "review": float(bool(r["review"]))}


def _load_probability(case: str, name: str, mask_path: Path, tgeom, problem) -> np.ndarray | None:
    """The lesion probability map beside the mask (`<id>_PROB.nii.gz`) on the truth grid, or None."""
    for ext in _NIFTI_EXTS:
        path = _sidecar(mask_path, "_PROB" + ext)
        if path.is_file():
            break
    else:
        return None
    try:
        prob, geom = load_nifti(path, np.float32)
    except DataError as e:
        problem(f"case {case}: {e}; no calibration for it")
        return None
    if not geom.same_grid(tgeom):
        problem(f"case {case}: probability map of {name} is not on the ground-truth grid; no calibration for it")
        return None
    return prob


def _add_calibration(acc: dict, prob: np.ndarray, truth: np.ndarray, spacing_mm) -> None:
    """Add one case's reliability-diagram bins (all voxels, lesion neighbourhood) to `acc` (in place)."""
    from clips_jax.metrics import calibration as cal

    where = cal.lesion_neighbourhood(prob, truth, spacing_mm)
    for region, w in (("all", None), ("neighbourhood", where)):
        acc[region] = cal.add_bins(acc.get(region), cal.calibration_bins(prob, truth, 10, w))
    acc["cases"] = acc.get("cases", 0) + 1


def reliability_markdown(rows: dict[str, list[dict]], bins: dict[str, dict]) -> str:
    """The summary's "Reliability and calibration" section ("" when no case has a score or a probability map):
    per experiment, the AUROC of the review risk (1 - score) for the worst tertile of Dice among the lesion
    cases (DeLong 95 % interval), Spearman of the risk with |TMTV error|, flagged cases; the ECE."""
    from clips_jax.metrics import calibration as cal
    from clips_jax.metrics import reliability as rel

    out = []
    for name, rs in rows.items():
        scored = [r for r in rs if np.isfinite(r.get("reliability", np.nan))]
        lines = []
        if scored:
            lesion = [r for r in scored if np.isfinite(r["dice"])]
            bad = rel.worst_tertile([r["dice"] for r in lesion])
            a = rel.delong_interval([1 - r["reliability"] for r in lesion], bad)
            err = [abs(r["tmtv_pred_ml"] - r["tmtv_true_ml"]) for r in scored]
            sp = rel.spearman([1 - r["reliability"] for r in scored], err)
            flagged = [r for r in scored if r["review"] == 1.0]
            hits = sum(1 for r, b in zip(lesion, bad) if b and r["review"] == 1.0)
            lines += [
                f"- reliability score (clips-predict reports) for {len(scored)} cases: AUROC of 1 - score for the "
                f"worst tertile of Dice {a['auroc']:.3f} (95 % DeLong {a['ci_low']:.3f}-{a['ci_high']:.3f}; "
                f"{a['n_pos']} of {len(lesion)} lesion cases); Spearman with |TMTV error| rho {sp['rho']:.3f} "
                f"(p {sp['p']:.2g}, n {sp['n']}); flagged for review: {len(flagged)} ({hits} in the worst tertile)",
            ]
        b = bins.get(name) or {}
        if b.get("cases"):
            lines.append(
                f"- calibration ({b['cases']} probability maps): ECE {cal.expected_calibration_error(b['all']):.4f} "
                f"over all voxels, {cal.expected_calibration_error(b['neighbourhood']):.4f} in the lesion "
                "neighbourhood (truth or p > 0.5, + 6 mm); diagram calibration.png"
            )
        if lines:
            out += [f"### {name}", "", *lines, ""]
    return "\n".join(["## Reliability and calibration", "", *out]) if out else ""


def _find_inputs(preds: dict[str, Path], truth_dir: Path, suv_dir: Path | None, problem):
    """(truth cases, SUV cases, {name: prediction cases}) by case id; predictions without ground truth are
    reported through `problem`. Raises DataError for a missing or empty folder."""
    truth_cases = find_cases(truth_dir, "seg")
    suv_cases = find_cases(suv_dir, "suv") if suv_dir is not None else {}
    pred_cases = {name: find_cases(folder, "seg") for name, folder in preds.items()}
    for name, cases in pred_cases.items():
        for case in sorted(set(cases) - set(truth_cases)):
            problem(f"case {case}: prediction in {name} has no ground truth in {truth_dir}; skipped")
    return truth_cases, suv_cases, pred_cases


def _load_truth_and_suv(case: str, truth_path: Path, suv_dir: Path | None, suv_cases: dict, problem):
    """(truth mask bool (z, y, x), its Geometry, SUV float32 on the same grid or None), or None when the case
    must be skipped (reported through `problem`)."""
    try:
        truth, tgeom = _load_mask(truth_path)
    except DataError as e:
        problem(f"case {case}: {e}; skipped")
        return None
    if suv_dir is None:
        return truth, tgeom, None
    if case not in suv_cases:
        problem(f"case {case}: no SUV image in {suv_dir}; SUV columns are NaN and no MIP is drawn")
        return truth, tgeom, None
    try:
        suv, sgeom = load_nifti(suv_cases[case], np.float32)
    except DataError as e:
        problem(f"case {case}: {e}; skipped")
        return None
    if not sgeom.same_grid(tgeom):
        problem(
            f"case {case}: SUV grid ({_grid_text(sgeom)}) differs from the ground-truth grid "
            f"({_grid_text(tgeom)}); resample onto the PET grid. Case skipped"
        )
        return None
    return truth, tgeom, suv


def _load_prediction(case: str, name: str, folder: Path, cases: dict, tgeom, problem):
    """The prediction mask of `case` in experiment `name` on the ground-truth grid, or None (reported)."""
    if case not in cases:
        problem(f"case {case}: no prediction in {name} ({folder}); skipped")
        return None
    try:
        pred, pgeom = _load_mask(cases[case])
    except DataError as e:
        problem(f"case {case}: {e}; skipped")
        return None
    if not pgeom.same_grid(tgeom):
        problem(
            f"case {case}: prediction grid of {name} ({_grid_text(pgeom)}) differs from the ground-truth "
            f"grid ({_grid_text(tgeom)}); resample the prediction onto the PET grid. Case skipped"
        )
        return None
    return pred


def _write_case_outputs(
    exp_dir: Path,
    name: str,
    case: str,
    row: dict,
    pred,
    truth,
    suv,
    spacing_mm,
    *,
    mips: bool,
    plots,
    tolerance_mm: float,
    lesion_threshold: float,
    suv_threshold: float,
) -> None:
    """One case's text report (and MIP figure when SUV is known and `mips`), written atomically."""
    text = case_report_text(
        case,
        row,
        tolerance_mm=tolerance_mm,
        lesion_threshold=lesion_threshold,
        suv_threshold=suv_threshold,
        dmax_pred_mm=dmax_mm(pred, spacing_mm),
    )
    write_text_atomic(exp_dir / "reports" / f"{_safe(case)}.txt", text)
    if mips and suv is not None:
        plots.mip_figure(
            suv, truth, pred, spacing_mm, exp_dir / "mips" / f"{_safe(case)}.png", title=f"{case} ({name})"
        )


def _write_cohort_outputs(
    rows: dict[str, list[dict]],
    exp_dir: dict[str, Path],
    out_dir: Path,
    problems: list[str],
    *,
    plots,
    bins: dict[str, dict],
    tolerance_mm: float,
    lesion_threshold: float,
    suv_threshold: float,
) -> None:
    """metrics.csv and the Bland-Altman plot per experiment (+ the reliability diagram with probability maps),
    the box plots (several experiments), summary.md (+ the reliability and calibration section)."""
    from clips_jax.metrics import calibration as cal

    for name, name_rows in rows.items():
        extra = RELIABILITY_COLUMNS if any("reliability" in r for r in name_rows) else ()
        write_metrics_csv(exp_dir[name] / "metrics.csv", name_rows, extra_columns=extra)
        if name_rows:
            plots.bland_altman(name_rows, exp_dir[name] / "bland_altman.png", title=f"TMTV, {name}")
        b = bins.get(name) or {}
        if b.get("cases"):
            curves = {
                f"{label}, ECE {cal.expected_calibration_error(b[k]):.4f}": b[k]
                for k, label in (("all", "all voxels"), ("neighbourhood", "lesion neighbourhood"))
            }
            plots.reliability_diagram(curves, exp_dir[name] / "calibration.png", f"calibration, {name}")
    if len(rows) > 1:
        plots.boxplots(rows, out_dir / "boxplots.png")
    settings = (
        f"Tolerance {tolerance_mm:g} mm (NSD, BJI); lesion-wise IoU threshold {lesion_threshold:g}; "
        f"SUV threshold {suv_threshold:g} (SUV >= threshold); lesions 18-connected. "
        "Column definitions: docs/metrics.md."
    )
    text = summary_markdown({n: summarise(r) for n, r in rows.items()}, settings=settings, problems=problems)
    section = reliability_markdown(rows, bins)
    write_text_atomic(out_dir / "summary.md", text.rstrip("\n") + "\n\n" + section if section else text)


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_multi_string(
        "pred", None, "Prediction folder; repeat as NAME=DIR to compare experiments.", flag_values=fv
    )
    flags.DEFINE_string("truth", None, "Ground-truth mask folder.", flag_values=fv)
    flags.DEFINE_string("suv", None, "SUV image folder (SUV columns and MIPs).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_float("tolerance_mm", 5.0, "NSD/BJI tolerance in mm.", flag_values=fv)
    flags.DEFINE_float("lesion_threshold", 0.5, "IoU threshold of one-to-one lesion matching.", flag_values=fv)
    flags.DEFINE_float("suv_threshold", 4.0, "SUV threshold of the _thr columns (SUV >= threshold).", flag_values=fv)
    flags.DEFINE_bool("mips", True, "Draw per-patient MIP PNGs (needs --suv); --nomips to skip them.", flag_values=fv)
    for name in ("pred", "truth", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)


def run_from_flags(fv) -> int:
    """Score every case; returns 0 if at least one case was scored, 1 if none (errors: `cli.run_tool`)."""
    tol, thr = fv["tolerance_mm"].value, fv["lesion_threshold"].value
    if not tol > 0:
        raise ConfigError(f"--tolerance_mm={tol}: must be > 0 mm")
    if not 0.0 <= thr <= 1.0:
        raise ConfigError(f"--lesion_threshold={thr}: must be in [0, 1]")
    out = Path(fv["out"].value)
    rows, problems = evaluate(
        parse_pred_args(fv["pred"].value),
        Path(fv["truth"].value),
        out,
        Path(fv["suv"].value) if fv["suv"].value else None,
        tolerance_mm=tol,
        lesion_threshold=thr,
        suv_threshold=fv["suv_threshold"].value,
        mips=fv["mips"].value,
    )
    n = sum(len(r) for r in rows.values())
    print(f"scored {n} case(s) in {len(rows)} experiment(s); {len(problems)} problem(s); summary: {out / 'summary.md'}")
    return 0 if n else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`clips-evaluate`); `argv` as `sys.argv` (program name first; None = sys.argv).
    Returns the exit status (module docstring)."""
    from clips_jax import cli

    return cli.run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
