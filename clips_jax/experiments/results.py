"""The tables of a curriculum comparison: per-run test metrics -> results rows, results.csv and results.md.

Pure functions (no training, no inference): `compare_curricula` gives them the per-case test metrics of every
run (`clips_jax.metrics.case_metrics` rows) and the hardness of the test cases (`hardness.py`), and writes
what they return. The statistics are `clips_jax.experiments.statistics.compare` (a mixed-model test whose unit
is the patient and which accounts for the run-to-run variance; docs/statistics.md); this module arranges its
output:

* per (curriculum, subset) the mean +- s.d. over seeds of five summary metrics (Dice, NSD, |TMTV error|, lesion
  sensitivity, FP volume), for all test cases and for the hard third;
* the two endpoints against the baseline, each with its difference, 95 % interval, p-value and Holm-adjusted
  p-value across the compared curricula (Holm 1979, Scand J Statist 6:65-70): Dice (the primary endpoint is
  hard-case Dice) and |TMTV error| (tested as -|TMTV error|, reported in ml, negative = smaller error);
* the minimal detectable effect of this design (baseline variance, this many cases and runs);
* the controls of `--controls` and whether each behaved as expected.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from clips_jax.experiments import presets, statistics
from clips_jax.fileio import write_text_atomic
from clips_jax.metrics import finite_mean

#: Per-seed summary metrics of results.csv: (column stem, title).
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("dice", "Dice"),
    ("nsd", "NSD (5 mm)"),
    ("tmtv_abs_err_ml", "abs. TMTV error (ml)"),
    ("lesion_sensitivity", "lesion sensitivity"),
    ("fpv_ml", "FP volume (ml)"),
)

#: Endpoints tested against the baseline: (column stem, title, sign that makes larger = better, unit digits).
ENDPOINTS: tuple[tuple[str, str, float, int], ...] = (
    ("dice", "Dice", 1.0, 3),
    ("tmtv_abs_err_ml", "|TMTV error| (ml)", -1.0, 1),
)

#: Columns of results.csv, in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "curriculum",
    "preset",
    "role",
    "subset",
    "n_seeds",
    "n_cases",
    *[f"{m}_{s}" for m, _ in SUMMARY_METRICS for s in ("mean", "sd")],
    *[f"{e}_{s}" for e, *_ in ENDPOINTS for s in ("diff", "ci_low", "ci_high", "p", "p_holm")],
)

SUBSETS = ("all", "hard")
ALPHA = 0.05


# ---------------------------------------------------------------------------------------------------------
# Per-case values and per-seed summaries
# ---------------------------------------------------------------------------------------------------------


def case_summary_values(row: Mapping[str, float]) -> dict[str, float]:
    """The five summary metrics of one `case_metrics` row (floats; NaN where undefined).

    dice, nsd: as in the row for a lesion case, NaN for a lesion-free case (`tmtv_true_ml == 0`, docs/metrics.md:
    the row has 0 there when the prediction is not empty, NaN when it is; the comparison's Dice is over lesion
    cases only, so that a false positive on a lesion-free case never enters it as a Dice of 0 in some runs and
    not in others: it counts in the TMTV error and FP volume); tmtv_abs_err_ml = |tmtv_pred_ml - tmtv_true_ml|;
    lesion_sensitivity = a1_tp / (a1_tp + a1_fn) (any-overlap matching; NaN without true lesions);
    fpv_ml: autoPET false-positive component volume (defined for every case).
    """
    tp, fn = float(row["a1_tp"]), float(row["a1_fn"])
    lesion = float(row["tmtv_true_ml"]) > 0
    return {
        "dice": float(row["dice"]) if lesion else float("nan"),
        "nsd": float(row["nsd"]) if lesion else float("nan"),
        "tmtv_abs_err_ml": abs(float(row["tmtv_pred_ml"]) - float(row["tmtv_true_ml"])),
        "lesion_sensitivity": tp / (tp + fn) if tp + fn > 0 else float("nan"),
        "fpv_ml": float(row["fpv_ml"]),
    }


def seed_means(rows: Sequence[Mapping[str, float]], cases: set[str] | None = None) -> dict[str, float]:
    """Mean of each summary metric over the rows (optionally only the rows whose "case" is in `cases`),
    ignoring undefined (NaN) values. Returns {metric: mean} plus "n_cases"."""
    sel = [r for r in rows if cases is None or r["case"] in cases]
    vals = [case_summary_values(r) for r in sel]
    out = {m: finite_mean(v[m] for v in vals) for m, _ in SUMMARY_METRICS}
    out["n_cases"] = len(sel)
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample s.d. (ddof 1) of the finite values; s.d. NaN with fewer than two values."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def metric_table(
    runs: Mapping[int, Sequence[Mapping[str, float]]], case_ids: Sequence[str], metric: str, sign: float = 1.0
) -> np.ndarray:
    """float64 (n_runs, n_cases): `sign` x summary metric of each run (seeds in increasing order) per case of
    `case_ids` (NaN where undefined or missing)."""
    table = np.full((len(runs), len(case_ids)), np.nan)
    col = {c: j for j, c in enumerate(case_ids)}
    for i, seed in enumerate(sorted(runs)):
        for r in runs[seed]:
            if r["case"] in col:
                table[i, col[r["case"]]] = sign * case_summary_values(r)[metric]
    return table


# ---------------------------------------------------------------------------------------------------------
# The comparison rows
# ---------------------------------------------------------------------------------------------------------


def role_of(name: str, baseline: str = presets.BASELINE) -> str:
    """ "baseline", "curriculum", "negative control" or "positive control"."""
    if name == baseline:
        return "baseline"
    control = presets.EXPERIMENTS[name].control if name in presets.EXPERIMENTS else ""
    return f"{control} control" if control else "curriculum"


def summarise(
    per_run_rows: Mapping[str, Mapping[int, Sequence[Mapping]]],
    case_ids: Sequence[str],
    hardness: np.ndarray | None,
    presets_used: Mapping[str, str] | None = None,
    baseline: str = presets.BASELINE,
) -> tuple[list[dict], list[str], dict]:
    """The rows of results.csv and what results.md says about the design.

    Args:
      per_run_rows: curriculum -> seed -> `case_metrics` rows (with "case") of that run on the test split.
      case_ids: the test case ids, in store order.
      hardness: float (n_cases,) larger = harder, fixed before the runs (`hardness.Hardness.array`), or None:
        the baseline's first run picks the hard cases (and is left out of the hard-case tests).
      presets_used: curriculum -> curriculum preset (for the table); default the experiment's.
      baseline: the curriculum the others are compared with.
    Returns:
      (rows, notes, design). rows: one per (curriculum, subset) with RESULT_COLUMNS; the summary means are over
      the hard cases of the Dice endpoint (without `hardness`, the baseline's own hard row leaves out its first
      run, which chose them). notes: remarks (missing baseline, untestable rows). design: {"hard_by",
      "hard_cases" (ids), "mde": {subset: {endpoint: `statistics.minimal_detectable_effect` dict}}}.
    """
    presets_used = dict(presets_used or {})
    notes: list[str] = []
    base = per_run_rows.get(baseline, {})
    if not base:
        notes.append(f"no finished baseline ({baseline!r}) run: no hard subset and no tests")
        return [_summary_row(n, presets_used, "all", s, None, baseline) for n, s in per_run_rows.items()], notes, {}
    tables = {
        e: {n: metric_table(runs, case_ids, e, sign) for n, runs in per_run_rows.items()} for e, _, sign, _ in ENDPOINTS
    }
    hard_mask, hard_by = statistics.hard_subset(tables["dice"][baseline], hardness)
    hard_ids = {c for c, h in zip(case_ids, hard_mask) if h}
    tests = {
        e: {(r["curriculum"], r["subset"]): r for r in statistics.compare(t, baseline, hardness)}
        for e, t in tables.items()
    }
    rows = []
    for name, runs in per_run_rows.items():
        for subset in SUBSETS:
            skip_first = subset == "hard" and name == baseline and hardness is None
            row = _summary_row(
                name, presets_used, subset, runs, None if subset == "all" else hard_ids, baseline, skip_first
            )
            for e, _, sign, _ in ENDPOINTS:
                _put_test(row, e, sign, tests[e].get((name, subset)), notes)
            rows.append(row)
    _holm(rows)
    return (
        rows,
        notes,
        {
            "hard_by": hard_by,
            "hard_cases": sorted(hard_ids),
            "mde": _mde(tables, baseline, hard_mask, hardness is None, len(base)),
        },
    )


def plateaued_only_lines(
    per_run_rows: Mapping[str, Mapping[int, Sequence[Mapping]]],
    plateaued: Mapping[str, Mapping[int, bool | None]],
    case_ids: Sequence[str],
    hardness: np.ndarray | None,
    baseline: str = presets.BASELINE,
) -> list[str]:
    """results.md section: the Dice tests again with only the runs that plateaued (a post-hoc sensitivity check).

    A run still improving at its end may compare learning speed, not where its curriculum ends (`plateau.py`).
    Whether a run plateaus is itself an outcome that the curriculum affects, and the runs are left out after they
    were seen: the runs kept are a selected subset, their differences are not unbiased effect estimates, and with
    fewer runs a non-significant result says little. Holm is over the same curricula as the main tables (a
    curriculum with no test here counts as p = 1), so the family does not shrink with the exclusions.

    Args: per_run_rows: as `summarise`; plateaued: curriculum -> seed -> True (plateaued), False (still
      improving: left out) or None (the check could not judge it, e.g. too few validations; a run missing
      counts as True); case_ids, hardness: as `summarise` (without a fixed hardness the baseline's runs choose
      the hard cases, so nothing is recomputed); baseline: the reference curriculum.
    Returns: markdown lines (empty when no run was left out).
    """
    flags = {n: {k: plateaued.get(n, {}).get(k, True) for k in runs} for n, runs in per_run_rows.items()}
    undetermined = sum(f is None for v in flags.values() for f in v.values())
    kept = {n: {k: r for k, r in runs.items() if flags[n][k] is not False} for n, runs in per_run_rows.items()}
    dropped = sum(len(per_run_rows[n]) - len(kept[n]) for n in kept)
    if dropped == 0:
        return []
    out = ["## Sensitivity: plateaued runs only", ""]
    why = (
        f"the plateau check could not judge {undetermined} run(s)"
        if undetermined
        else "no hardness fixed before the runs"
        if hardness is None
        else f"{len(kept.get(baseline, {}))} plateaued baseline run(s), need 2"
        if len(kept.get(baseline, {})) < 2
        else ""
    )
    if why:
        return out + [f"Not computed ({why}).", ""]
    rows, _, _ = summarise({n: r for n, r in kept.items() if r}, case_ids, hardness, baseline=baseline)
    by = {(r["curriculum"], r["subset"]): r for r in rows}
    _holm_over(by, [n for n in per_run_rows if role_of(n, baseline) == "curriculum"])
    out += [
        f"The Dice tests again without the {dropped} run(s) that had not plateaued. Whether a run plateaus is an "
        "outcome the curriculum itself affects, and the runs were left out after they were seen: the runs kept "
        "are a selected subset, these differences are not unbiased effect estimates, and with fewer runs a "
        "non-significant result here says little. Holm is over the same curricula as the main tables (no test "
        "counts as p = 1). Read it beside the main tables, never instead of them.",
        "",
        "| curriculum | role | runs kept | ΔDice hard [95 % CI] | p (Holm) | ΔDice all [95 % CI] | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, runs in per_run_rows.items():
        cells = []
        for subset in ("hard", "all"):
            r = by.get((n, subset))
            cells.append("— | —" if r is None else _effect(r, "dice", 3) + " | " + _p(r, "dice"))
        out.append(f"| {n} | {role_of(n, baseline)} | {len(kept[n])} of {len(runs)} | " + " | ".join(cells) + " |")
    return out + [""]


def _holm_over(by: dict, family: Sequence[str]) -> None:
    """Holm-adjust the Dice p of `by[(curriculum, subset)]` over `family` for each subset, a missing test = p 1."""
    for subset in SUBSETS:
        ps = [by[(n, subset)]["dice_p"] if (n, subset) in by else float("nan") for n in family]
        adjusted = statistics.holm([1.0 if math.isnan(p) else p for p in ps])
        for n, p, adj in zip(family, ps, adjusted):
            if (n, subset) in by:
                by[(n, subset)]["dice_p_holm"] = float("nan") if math.isnan(p) else float(adj)


def _summary_row(name, presets_used, subset, runs, cases, baseline, skip_first=False) -> dict[str, Any]:
    seeds = sorted(runs)[1 if skip_first else 0 :]
    means = [seed_means(runs[k], cases) for k in seeds]
    preset = presets_used.get(name) or (presets.EXPERIMENTS[name].preset if name in presets.EXPERIMENTS else name)
    row: dict[str, Any] = {
        "curriculum": name,
        "preset": preset,
        "role": role_of(name, baseline),
        "subset": subset,
        "n_seeds": len(seeds),
        "n_cases": means[0]["n_cases"] if means else 0,
    }
    for m, _ in SUMMARY_METRICS:
        row[f"{m}_mean"], row[f"{m}_sd"] = mean_sd([s[m] for s in means])
    for e, *_ in ENDPOINTS:
        row.update({f"{e}_{s}": float("nan") for s in ("diff", "ci_low", "ci_high", "p", "p_holm")})
    return row


def _put_test(row: dict, endpoint: str, sign: float, test: Mapping | None, notes: list[str]) -> None:
    """Copy one `statistics.compare` row into the results row, undoing the endpoint's sign."""
    if test is None:
        return
    lo, hi = sign * test["ci_low"], sign * test["ci_high"]
    row.update(
        {
            f"{endpoint}_diff": sign * test["diff"],
            f"{endpoint}_ci_low": min(lo, hi),
            f"{endpoint}_ci_high": max(lo, hi),
            f"{endpoint}_p": test["p"],
        }
    )
    if test.get("note"):
        notes.append(f"{row['curriculum']} ({row['subset']}, {endpoint}): {test['note']}")


def _holm(rows: list[dict]) -> None:
    """Holm-adjust, per (endpoint, subset), the p-values of the curricula (controls are checks, not hypotheses:
    they keep their raw p and no adjusted one)."""
    for e, *_ in ENDPOINTS:
        for subset in SUBSETS:
            family = [r for r in rows if r["subset"] == subset and r["role"] == "curriculum"]
            adjusted = statistics.holm([r[f"{e}_p"] for r in family])
            for r, p in zip(family, adjusted):
                r[f"{e}_p_holm"] = float(p)


def _mde(tables, baseline: str, hard_mask: np.ndarray, drop_first: bool, n_runs: int) -> dict:
    """Minimal detectable effect (80 % power, two-sided 5 %) per subset and endpoint from the baseline's runs."""
    out: dict[str, dict] = {}
    for subset in SUBSETS:
        out[subset] = {}
        for e, *_ in ENDPOINTS:
            t = tables[e][baseline]
            if subset == "hard":
                t = t[1:, hard_mask] if drop_first else t[:, hard_mask]
            out[subset][e] = statistics.minimal_detectable_effect(t, n_runs=n_runs)
    return out


# ---------------------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------------------


def control_verdicts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per control row set: did it behave as expected?

    Negative control (the baseline again, other seeds): expected no significant Dice difference (raw p >= 0.05)
    on all and on hard cases. Positive control (never trains on the hardest third): expected significantly
    worse hard-case Dice (difference < 0 and raw p < 0.05).
    """
    out = []
    by = {(r["curriculum"], r["subset"]): r for r in rows}
    for name in dict.fromkeys(r["curriculum"] for r in rows):
        role = by[(name, "all")]["role"] if (name, "all") in by else ""
        if role == "negative control":
            tested = [by[(name, s)] for s in SUBSETS if (name, s) in by and math.isfinite(by[(name, s)]["dice_p"])]
            false_pos = [r["subset"] for r in tested if r["dice_p"] < ALPHA]
            verdict = (
                "as expected: no significant difference"
                if tested and not false_pos
                else "NOT as expected: significant on " + ", ".join(false_pos)
                if false_pos
                else "not tested (too few runs)"
            )
            out.append(
                f"negative control `{name}`: {verdict} "
                + "; ".join(f"{r['subset']}: ΔDice {r['dice_diff']:+.3f}, p {r['dice_p']:.3g}" for r in tested)
            )
        elif role == "positive control" and (name, "hard") in by:
            r = by[(name, "hard")]
            if not math.isfinite(r["dice_p"]):
                verdict = "not tested (too few runs)"
            elif r["dice_diff"] < 0 and r["dice_p"] < ALPHA:
                verdict = "as expected: significantly worse on hard cases"
            else:
                verdict = "NOT as expected: not significantly worse on hard cases (the comparison may lack power)"
            detail = "" if not math.isfinite(r["dice_p"]) else f" (ΔDice {r['dice_diff']:+.3f}, p {r['dice_p']:.3g})"
            out.append(f"positive control `{name}`: {verdict}{detail}")
    return out


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


def _effect(r: Mapping[str, Any], e: str, digits: int) -> str:
    if math.isnan(r[f"{e}_diff"]):
        return "—"
    ci = "" if math.isnan(r[f"{e}_ci_low"]) else f" [{r[f'{e}_ci_low']:+.{digits}f}, {r[f'{e}_ci_high']:+.{digits}f}]"
    return f"{r[f'{e}_diff']:+.{digits}f}{ci}"


def _p(r: Mapping[str, Any], e: str) -> str:
    p, ph = r[f"{e}_p"], r[f"{e}_p_holm"]
    if math.isnan(p):
        return "—"
    return f"{p:.3g}" + ("" if math.isnan(ph) else f" ({ph:.3g})")


def results_markdown(
    rows: Sequence[Mapping[str, Any]],
    notes: Sequence[str],
    header: Sequence[str],
    design: Mapping[str, Any] | None = None,
    hard_description: str = "",
    sections: Sequence[str] = (),
) -> str:
    """results.md: the header, how the hard cases were chosen, one table per subset (summary metrics and the
    two endpoints against the baseline), the minimal detectable effects, the controls, `sections` (markdown
    lines, e.g. the plateau check of `plateau.plateau_lines`) and the notes."""
    design = design or {}
    out = ["# Curriculum comparison", "", *header, ""]
    if design:
        out += [
            f"**Hard cases**: the ceil(n/3) test lesion cases chosen by {hard_description or design['hard_by']} "
            f"({len(design['hard_cases'])} cases). **Primary endpoint**: Dice on the hard cases.",
            "",
        ]
    titles = {"all": "All test cases", "hard": "Hard test cases"}
    for subset in SUBSETS:
        sel = [r for r in rows if r["subset"] == subset]
        if not sel:
            continue
        out += [
            f"## {titles[subset]}",
            "",
            "| curriculum | role | seeds | cases | "
            + " | ".join(t for _, t in SUMMARY_METRICS)
            + " | ΔDice [95 % CI] | p (Holm) | Δ|TMTV err| ml [95 % CI] | p (Holm) |",
            "|---|---|---|---|" + "---|" * (len(SUMMARY_METRICS) + 4),
        ]
        digits = {"tmtv_abs_err_ml": 1, "fpv_ml": 1}
        for r in sel:
            cells = [_pm(r[f"{m}_mean"], r[f"{m}_sd"], digits.get(m, 3)) for m, _ in SUMMARY_METRICS]
            tests = [_effect(r, "dice", 3), _p(r, "dice"), _effect(r, "tmtv_abs_err_ml", 1), _p(r, "tmtv_abs_err_ml")]
            out.append(
                f"| {r['curriculum']} | {r['role']} | {r['n_seeds']} | {r['n_cases']} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(tests)
                + " |"
            )
        out.append("")
    out += [
        "Summary columns: mean ± s.d. over seeds of the per-seed means over test cases (Dice, NSD and lesion "
        "sensitivity over lesion cases only; absolute TMTV error and FP volume over all cases). Δ: curriculum "
        "minus baseline, averaged over patients and runs (Δ|TMTV err| < 0: smaller error); 95 % interval and "
        "two-sided p of a linear mixed model with patients and training runs as sources of variance "
        "(docs/statistics.md); Holm: adjusted across the compared curricula of the table (controls excluded).",
        "",
    ]
    if design.get("mde"):
        out += [
            "## Minimal detectable effect",
            "",
            "Smallest true difference this design detects with 80 % power (two-sided 5 %), from the baseline's "
            "own run-to-run and patient-level variance, for its number of runs per arm and these cases "
            "(assuming no patient-by-curriculum interaction, so a lower bound):",
            "",
        ]
        for subset in SUBSETS:
            m = design["mde"][subset]
            d, t = m["dice"], m["tmtv_abs_err_ml"]
            out.append(
                f"- {titles[subset].lower()}: Dice {d['mde']:.3f} (run s.d. {d['sd_run']:.3f}, per-case noise s.d. "
                f"{d['sd_case_noise']:.3f}), |TMTV error| {t['mde']:.1f} ml (run s.d. {t['sd_run']:.2f}, noise s.d. "
                f"{t['sd_case_noise']:.2f} ml) ({d['n_runs']} runs per arm, {d['n_cases']} cases)"
            )
        out += [
            "",
            "The run and noise s.d. are what `python -m clips_jax.experiments.statistics power N SEED SD_RUN "
            "SD_NOISE` takes to plan a larger study (docs/experiments.md).",
            "",
        ]
    verdicts = control_verdicts(rows)
    if verdicts:
        out += ["## Controls", "", *[f"- {v}" for v in verdicts], ""]
    out += list(sections)
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)
