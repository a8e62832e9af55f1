"""The reliability part of `clips-predict`'s outputs: which studies need a look, and why.

Where this fits: `clips_jax.predict.segment` keeps, on the 6 mm stage-A grid, the ensemble's lesion
probability, each member's (one network pass: `Ensemble.logits_with_members`) and, with `--tta`, each flip
pass's. `study_reliability` turns them and the final mask into the report's `reliability` record
(`clips_jax.metrics.reliability.assess`: measures, score in [0, 1] with 1 = reliable, review flag, reasons in
words); the rest formats it for the Markdown report, the batch lines and the end-of-batch review list.

Conventions (docs/reliability.md):
* everything is measured on the stage-A grid (where the members are); the final mask (after the refiner, on
  the PET grid) enters as the fraction of each 6 mm voxel it covers (`mask_fraction_on_grid`);
* the probabilities are temperature-scaled first when the weights directory's `reliability.json` has a
  temperature (`clips_jax.metrics.calibration.apply_temperature`; the mask never changes); the lesion region
  is fixed by the unscaled probability (`candidate_prob`);
* the review threshold: `--review_threshold`, else the weights' `reliability.json` (fixed on a validation split
  by `clips-reliability`), else `reliability.DEFAULT_REVIEW_THRESHOLD`; the record says which;
* a single U-Net (no members) is measured by its voxel probabilities (and flips with `--tta`) only: member
  measures are null and a note says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clips_jax.errors import WeightsError
from clips_jax.metrics import calibration as cal
from clips_jax.metrics import reliability as rel

__all__ = [
    "SETTINGS_FILE",
    "batch_note",
    "markdown_headline",
    "markdown_section",
    "read_settings",
    "review_list",
    "study_reliability",
    "uncertainty_map",
]

SETTINGS_FILE = "reliability.json"
"""Optional file of a weights directory: {"temperature": T > 0, "review_threshold": t in [0, 1], "tile_shape",
"tile_step", ...}, written by `clips-reliability` (docs/reliability.md)."""


def read_settings(weights_dir: str | Path) -> dict:
    """The weights directory's `reliability.json`, or {} when absent.

    Raises WeightsError naming the file when it is unreadable or its temperature / threshold / stage-A tiling
    (`tile_shape`, `tile_step`: 3 positive integers, the tile divisible by 16) are invalid."""
    path = Path(weights_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        t, thr = doc.get("temperature", 1.0), doc.get("review_threshold", 0.5)
    except (OSError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: unreadable ({e}); fix or delete it") from None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (t, thr))
    if not (numbers and t > 0 and 0 <= thr <= 1):
        raise WeightsError(f"{path}: need temperature > 0 and review_threshold in [0, 1]; fix or delete it")
    for key in ("tile_shape", "tile_step"):
        v = doc.get(key)
        ok = isinstance(v, list) and len(v) == 3 and all(isinstance(n, int) and n > 0 for n in v)
        if v is not None and not ok:
            raise WeightsError(f"{path}: {key} must be 3 positive integers (z, y, x voxels); fix or delete it")
    tile = doc.get("tile_shape")
    if tile is not None and any(n % 16 for n in tile):
        raise WeightsError(f"{path}: tile_shape {tile} must be divisible by 16 (the U-Net); fix or delete it")
    return doc


def _threshold(option: float | None, settings: Mapping) -> tuple[float, str]:
    """(review threshold, its source: "option" | "weights" | "default")."""
    if option is not None:
        return float(option), "option"
    if settings.get("review_threshold") is not None:
        return float(settings["review_threshold"]), "weights"
    return rel.DEFAULT_REVIEW_THRESHOLD, "default"


def study_reliability(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    stage_a_prob: np.ndarray,
    stage_a_spacing_mm: Sequence[float],
    members: np.ndarray | None = None,
    tta: np.ndarray | None = None,
    *,
    settings: Mapping | None = None,
    threshold: float | None = None,
) -> dict:
    """The report's `reliability` record of one study.

    Args:
      mask: `(z, y, x)` final mask on the PET grid (spacing `spacing_mm`, mm).
      stage_a_prob: `(d, h, w)` float32 ensemble lesion probability on the stage-A grid (spacing
        `stage_a_spacing_mm`; shares voxel 0 with the PET grid). members: `(n, d, h, w)` member probabilities
        or None. tta: `(8, d, h, w)` flip passes or None.
      settings: the weights' `reliability.json` ({"temperature", "review_threshold"}) or None.
      threshold: `--review_threshold` (None: settings, else the default).
    Returns:
      `reliability.assess`'s dict + "temperature", "threshold_source", "grid" ("stage A, <s> mm").
    """
    settings = dict(settings or {})
    t = float(settings.get("temperature", 1.0) or 1.0)
    thr, source = _threshold(threshold, settings)
    fraction = rel.mask_fraction_on_grid(mask, spacing_mm, stage_a_spacing_mm, stage_a_prob.shape)
    prob = cal.apply_temperature(stage_a_prob, t)
    out = rel.assess(prob, fraction, stage_a_spacing_mm, members, tta, threshold=thr, candidate_prob=stage_a_prob)
    grid = "x".join(f"{float(s):g}" for s in stage_a_spacing_mm)
    return {**out, "temperature": t, "threshold_source": source, "grid": f"stage A, {grid} mm"}


def uncertainty_map(stage_a_prob: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Binary entropy (bits, in [0, 1]) of the temperature-scaled stage-A probability: the MIP's uncertainty
    panel. High where the ensemble's probability is near 0.5, i.e. where members disagree or are unsure."""
    return rel.binary_entropy_bits(cal.apply_temperature(stage_a_prob, temperature))


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_headline(r: Mapping | None) -> str:
    """The line near the top of the Markdown report: "**REVIEW: ...**" or "Reliability ... (no review flag)"."""
    if not r:
        return "Reliability: not computed (--noreliability)."
    if r["review"]:
        why = "; ".join(r["reasons"]) or "low score"
        return f"**REVIEW: reliability {r['score']:.2f} is below the review threshold {r['threshold']:.2f}: {why}.**"
    return f"Reliability {r['score']:.2f} (review threshold {r['threshold']:.2f}; no review flag)."


def markdown_section(r: Mapping | None) -> list[str]:
    """The "## Reliability" section: the measures with units, the score and what was not measured."""
    if not r:
        return []
    cv = r["member_tmtv_cv"]
    tmtvs = ", ".join(f"{v:.1f}" for v in r["member_tmtv_ml"]) if r["member_tmtv_ml"] else "n/a"
    rows = [
        ("score (1 = reliable; geometric mean of the components below)", _fmt(r["score"]), ""),
        ("members: mean / min pairwise Dice of their masks", f"{_fmt(r['member_dice_mean'])} / "
         f"{_fmt(r['member_dice_min'])}", ""),
        ("members: share of the lesion volume they disagree on", _fmt(r["member_disagreement"]), ""),
        ("members: TMTV each (coefficient of variation)", f"{tmtvs} ({_fmt(cv)})", "ml"),
        ("members: mean s.d. of their probabilities in the lesion region", _fmt(r["member_sd_mean"], 3), ""),
        ("flips (--tta): mean pairwise Dice", _fmt(r["tta_dice_mean"]), ""),
        ("expected Dice of the mask under its own probabilities", _fmt(r["expected_dice"]), ""),
        ("mean entropy of the probability in the lesion region", _fmt(r["entropy_mean_bits"], 3), "bits"),
        ("volume with lesion probability 0.2-0.8", _fmt(r["uncertain_ml"], 1), "ml"),
        ("lesion region (candidates + 6 mm)", _fmt(r["region_ml"], 1), "ml"),
    ]  # fmt: skip
    lines = ["## Reliability", "", "| measure | value | unit |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        f"Review threshold {r['threshold']:.3f} ({_THRESHOLD_SOURCES[r['threshold_source']]}); measured on the "
        f"{r['grid']} grid; probabilities temperature-scaled with T = {r['temperature']:.3f}. "
        "Definitions: docs/reliability.md.",
    ]
    lines += [f"- {n}" for n in r["notes"]] + [""]
    return lines


_THRESHOLD_SOURCES = {
    "option": "--review_threshold",
    "weights": "fixed on a validation split, from the weights' reliability.json",
    "default": "the default; not fixed for these weights on a validation split",
}


def batch_note(r: Mapping | None) -> str:
    """The batch line's addition: ", reliability 0.62" or ", reliability 0.31 REVIEW" ("" when absent)."""
    if not r:
        return ""
    return f", reliability {r['score']:.2f}" + (" REVIEW" if r["review"] else "")


def review_list(records: Mapping[str, Mapping | None]) -> list[str]:
    """The end-of-batch list of the studies flagged for review, lowest score first (one line each, with the
    first reason); [] when none is flagged."""
    flagged = sorted(((r["score"], sid, r) for sid, r in records.items() if r and r["review"]), key=lambda x: x[0])
    if not flagged:
        return []
    out = [f"review ({len(flagged)} stud{'y' if len(flagged) == 1 else 'ies'} below the reliability threshold):"]
    for s, sid, r in flagged:
        out.append(f"  {sid}: reliability {s:.2f}" + (f"; {r['reasons'][0]}" if r["reasons"] else ""))
    return out
