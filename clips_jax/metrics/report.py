"""Per-patient metric rows, per-patient text reports, the metrics.csv table and its summary.

`case_metrics` is the one entry point that turns a (prediction, truth[, SUV]) triple into a row with the
columns of `metrics.csv` (see `COLUMNS` and docs/metrics.md). The trainer's validation, the curriculum
experiments and `python -m clips_jax.evaluate` all use it, so every number in the project is computed one way.
The rest of the module formats rows: a per-patient text report with the fields of the CLIPS precursor's
report (the seed), a CSV writer/reader, and `summarise` (mean, median, IQR per column, lesion-free cases
apart) with a Markdown rendering. No plotting here (see `plots.py`); no file reading (see `evaluate.py`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from clips_jax.fileio import write_text_atomic
from clips_jax.metrics.lesions import dmax_mm, lesion_metrics
from clips_jax.metrics.overlap import dice, overlap_volumes, volume_ml
from clips_jax.metrics.surface import surface_metrics, union_bbox

__all__ = [
    "COLUMNS",
    "METRIC_KEYS",
    "COUNT_KEYS",
    "case_metrics",
    "case_report_text",
    "write_metrics_csv",
    "read_metrics_csv",
    "summarise",
    "summary_markdown",
]

#: The columns of metrics.csv, in order (the issue's contract; docs/metrics.md documents each).
COLUMNS: tuple[str, ...] = (
    "case",
    "suv_max",
    "dice",
    "hd_mm",
    "hd95_mm",
    "assd_mm",
    "nsd",
    "bji",
    "tmtv_pred_ml",
    "tmtv_pred_thr_ml",
    "tmtv_true_ml",
    "tmtv_true_thr_ml",
    "fp_ml",
    "fp_thr_ml",
    "fn_ml",
    "tp_ml",
    "precision",
    "recall",
    "fpv_ml",
    "fnv_ml",
    "lesions_true",
    "lesions_pred",
    "a1_tp",
    "a1_fn",
    "a1_fp",
    "a2_tp",
    "a2_fn",
    "a2_fp",
    "dmax_mm",
)
#: Keys of the dict returned by `case_metrics` (the columns minus "case").
METRIC_KEYS: tuple[str, ...] = COLUMNS[1:]
#: Integer-valued columns (written without decimals).
COUNT_KEYS: frozenset[str] = frozenset(
    {"lesions_true", "lesions_pred", "a1_tp", "a1_fn", "a1_fp", "a2_tp", "a2_fn", "a2_fp"}
)


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm,
    suv: np.ndarray | None = None,
    *,
    tolerance_mm: float = 5.0,
    lesion_threshold: float = 0.5,
    suv_threshold: float = 4.0,
) -> dict[str, float]:
    """Every per-patient metric of one case.

    Args:
      pred, truth: (z, y, x) masks on the same grid (bool, or numbers where non-zero = foreground).
      spacing_mm: (z, y, x) voxel size in mm.
      suv: optional (z, y, x) SUV volume on the same grid; without it suv_max and the `_thr` columns are NaN.
      tolerance_mm: tau of NSD and BJI (mm, > 0).
      lesion_threshold: IoU threshold of lesion matching approach 2, in [0, 1].
      suv_threshold: `_thr` columns use the masks restricted to SUV >= this value.
    Returns:
      dict with exactly the keys METRIC_KEYS (floats; counts are whole floats). Conventions: see the module
      docstrings of overlap/surface/lesions and docs/metrics.md. suv_max = max SUV inside the truth mask (NaN
      when the truth is empty); dmax_mm = Dmax of the truth mask.
    Raises:
      ValueError on mismatched shapes or a non-positive spacing/tolerance (programming errors; the CLI
      checks grids itself and reports them per case).
    """
    p = np.asarray(pred)
    t = np.asarray(truth)
    p = p if p.dtype == bool else p != 0
    t = t if t.dtype == bool else t != 0
    sp = tuple(float(s) for s in spacing_mm)
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"case_metrics: prediction {p.shape} and truth {t.shape} must be equal 3-D shapes")
    if suv is not None and np.shape(suv) != p.shape:
        raise ValueError(f"case_metrics: SUV shape {np.shape(suv)} differs from the masks' {p.shape}")
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"case_metrics: spacing_mm {spacing_mm} must be three positive numbers (z, y, x)")
    if not tolerance_mm > 0:
        raise ValueError(f"case_metrics: tolerance_mm must be > 0, got {tolerance_mm}")
    # Everything below depends only on the union of the masks: crop once (1 voxel margin keeps the surface).
    box = union_bbox(p, t, margin=1) or (slice(0, 1),) * 3
    p, t = p[box], t[box]
    s = None if suv is None else np.asarray(suv)[box]
    nan = float("nan")

    row: dict[str, float] = {}
    row["suv_max"] = float(s[t].max()) if s is not None and t.any() else nan
    row["dice"] = dice(p, t)
    row.update(surface_metrics(p, t, sp, tolerance_mm))
    row["tmtv_pred_ml"] = volume_ml(p, sp)
    row["tmtv_true_ml"] = volume_ml(t, sp)
    ov = overlap_volumes(p, t, sp)
    if s is not None:
        hot = s >= suv_threshold
        row["tmtv_pred_thr_ml"] = volume_ml(p & hot, sp)
        row["tmtv_true_thr_ml"] = volume_ml(t & hot, sp)
        row["fp_thr_ml"] = volume_ml(p & hot & ~t, sp)
    else:
        row["tmtv_pred_thr_ml"] = row["tmtv_true_thr_ml"] = row["fp_thr_ml"] = nan
    row.update(ov)
    row.update(lesion_metrics(p, t, sp, lesion_threshold))
    row["dmax_mm"] = dmax_mm(t, sp)
    return {k: float(row[k]) for k in METRIC_KEYS}


def _fmt(v: float, digits: int = 3) -> str:
    return "undefined" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pct(num: float, den: float) -> str:
    return f"{100.0 * num / den:.1f}%" if den else "n/a"


def case_report_text(
    case: str,
    row: Mapping[str, float],
    *,
    tolerance_mm: float,
    lesion_threshold: float,
    suv_threshold: float,
    dmax_pred_mm: float | None = None,
) -> str:
    """Per-patient text report with the fields of the CLIPS precursor's report (the seed), in English.

    Args:
      case: case id. row: a `case_metrics` dict. Other arguments: the settings used, printed in the header.
      dmax_pred_mm: optional Dmax of the prediction, printed next to the truth's.
    Returns:
      the report text (lines ending with a newline); undefined values print as "undefined".
    """
    r = row
    nt, npd = int(r["lesions_true"]), int(r["lesions_pred"])
    lines = [
        f"Patient: {case}",
        f"Tolerance: {tolerance_mm:g} mm",
        f"Lesion-wise threshold (IoU, approach 2): {100 * lesion_threshold:.1f}%",
        f"SUV threshold: {suv_threshold:g} (SUV >= threshold)",
        f"Max SUV in the true mask: {_fmt(r['suv_max'])}",
        f"Mean surface distance (ASSD, area-weighted): {_fmt(r['assd_mm'])} mm",
        f"Hausdorff distance: {_fmt(r['hd_mm'], 1)} mm",
        f"Hausdorff distance 95%: {_fmt(r['hd95_mm'], 1)} mm",
        f"Dice: {_fmt(r['dice'])}",
        f"NSD at {tolerance_mm:g} mm: {_fmt(r['nsd'])}",
        f"BJI at {tolerance_mm:g} mm: {_fmt(r['bji'])}",
        f"Predicted TMTV (not thresholded): {_fmt(r['tmtv_pred_ml'], 2)} ml",
        f"Predicted TMTV (SUV >= {suv_threshold:g}): {_fmt(r['tmtv_pred_thr_ml'], 2)} ml",
        f"True TMTV: {_fmt(r['tmtv_true_ml'], 2)} ml",
        f"True TMTV (SUV >= {suv_threshold:g}): {_fmt(r['tmtv_true_thr_ml'], 2)} ml",
        f"FP volume (not thresholded): {_fmt(r['fp_ml'], 2)} ml",
        f"FP volume (SUV >= {suv_threshold:g}): {_fmt(r['fp_thr_ml'], 2)} ml",
        f"FN volume: {_fmt(r['fn_ml'], 2)} ml",
        f"TP volume: {_fmt(r['tp_ml'], 2)} ml",
        f"Precision (voxel-wise): {_fmt(100 * r['precision'], 2)} %",
        f"Recall (voxel-wise): {_fmt(100 * r['recall'], 2)} %",
        f"autoPET FP component volume (FPV): {_fmt(r['fpv_ml'], 2)} ml",
        f"autoPET FN component volume (FNV): {_fmt(r['fnv_ml'], 2)} ml",
        f"Dmax of the true mask: {_fmt(r['dmax_mm'], 1)} mm",
    ]
    if dmax_pred_mm is not None:
        lines.append(f"Dmax of the prediction: {_fmt(dmax_pred_mm, 1)} mm")
    lines.append(f"Lesions (18-connected): {nt} true, {npd} predicted")
    for k, title in (
        ("a1", "Approach 1 (any overlap)"),
        ("a2", f"Approach 2 (one-to-one, IoU >= {100 * lesion_threshold:.1f}%)"),
    ):
        tp, fn, fp = int(r[f"{k}_tp"]), int(r[f"{k}_fn"]), int(r[f"{k}_fp"])
        lines += [
            f"{title}:",
            f"  TP lesions: {tp} / {nt} ({_pct(tp, nt)})",
            f"  FN lesions: {fn} / {nt} ({_pct(fn, nt)})",
            f"  FP predictions: {fp} / {npd} ({_pct(fp, npd)})",
        ]
    return "\n".join(lines) + "\n"


def _cell(key: str, v) -> str:
    if key == "case":
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "nan"
    if key in COUNT_KEYS:
        return str(int(round(v)))
    return f"{v:.6g}"


def write_metrics_csv(path: str | os.PathLike, rows: Iterable[Mapping], extra_columns: Sequence[str] = ()) -> Path:
    """Write rows (dicts with "case" and METRIC_KEYS) to a CSV with exactly COLUMNS (+ `extra_columns` after
    them, e.g. the reliability score; a row without one gets `nan`), atomically.

    Floats use 6 significant digits, counts are integers, undefined values are written as `nan`.
    Returns the path.
    """
    cols = tuple(COLUMNS) + tuple(extra_columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(k, r.get(k, float("nan")) if k in extra_columns else r[k]) for k in cols])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Read a metrics.csv back: a list of dicts, "case" as str and every other column as float."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k == "case" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def finite_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN and +-inf = undefined, left out); NaN when there is none."""
    a = np.asarray(list(values), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    finite = a[np.isfinite(a)]
    nan = float("nan")
    if finite.size == 0:
        return {"n": 0, "n_undefined": int(a.size), "mean": nan, "median": nan, "q1": nan, "q3": nan, "iqr": nan}
    q1, med, q3 = np.percentile(finite, [25, 50, 75])
    return {
        "n": int(finite.size),
        "n_undefined": int(a.size - finite.size),
        "mean": float(finite.mean()),
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
    }


def summarise(rows: Sequence[Mapping]) -> dict:
    """Cohort statistics of metric rows, lesion-bearing and lesion-free cases apart.

    Args:
      rows: dicts with METRIC_KEYS (and usually "case").
    Returns:
      {"n_cases": int, "n_positive": int, "n_lesion_free": int,
       "positive": {column: {"n", "n_undefined", "mean", "median", "q1", "q3", "iqr"}},
       "lesion_free": {same}}. A case is lesion-free when tmtv_true_ml == 0. Statistics ignore NaN (and
      infinite) values and count them in n_undefined; a column with no defined value has NaN statistics.
    """
    pos = [r for r in rows if float(r["tmtv_true_ml"]) > 0]
    neg = [r for r in rows if not float(r["tmtv_true_ml"]) > 0]
    return {
        "n_cases": len(rows),
        "n_positive": len(pos),
        "n_lesion_free": len(neg),
        "positive": {k: _stats([float(r[k]) for r in pos]) for k in METRIC_KEYS},
        "lesion_free": {k: _stats([float(r[k]) for r in neg]) for k in METRIC_KEYS},
    }


# Columns that mean something for lesion-free cases (Dice/NSD/HD/recall are undefined there).
_NEGATIVE_COLUMNS = (
    "tmtv_pred_ml",
    "tmtv_pred_thr_ml",
    "fp_ml",
    "fp_thr_ml",
    "fpv_ml",
    "lesions_pred",
    "a1_fp",
    "a2_fp",
)


def summary_markdown(summaries: Mapping[str, dict], *, settings: str = "", problems: Sequence[str] = ()) -> str:
    """Render `summarise` results of one or several experiments as Markdown.

    Args:
      summaries: experiment name -> `summarise(rows)`.
      settings: one line describing the settings (tolerance, thresholds), printed under the title.
      problems: messages about skipped or unmatched cases, listed at the end.
    """
    out = ["# Evaluation summary", ""]
    if settings:
        out += [settings, ""]
    for name, s in summaries.items():
        out += [
            f"## {name}",
            "",
            f"{s['n_cases']} cases: {s['n_positive']} with lesions, {s['n_lesion_free']} lesion-free.",
            "",
        ]
        for part, cols, title in (
            ("positive", METRIC_KEYS, "Cases with lesions"),
            ("lesion_free", _NEGATIVE_COLUMNS, "Lesion-free cases"),
        ):
            if not s[f"n_{'positive' if part == 'positive' else 'lesion_free'}"]:
                continue
            out += [
                f"### {title}",
                "",
                "| column | mean | median | Q1 | Q3 | IQR | n | undefined |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for k in cols:
                st = s[part][k]
                out.append(
                    f"| {k} | "
                    + " | ".join(_fmt(st[x], 4) for x in ("mean", "median", "q1", "q3", "iqr"))
                    + f" | {st['n']} | {st['n_undefined']} |"
                )
            out.append("")
    if problems:
        out += ["## Skipped or unmatched cases", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(out)
