"""Per-patient reliability of a segmentation: ensemble disagreement + voxel uncertainty -> one score.

Why: a physician reviewing a batch of studies needs to know which masks to check first. TMTV-Net gives the raw
material for free: its stage A is an ensemble of U-Nets whose disagreement is measurable (deep ensembles as an
uncertainty estimate: Lakshminarayanan, Pritzel & Blundell 2017, "Simple and scalable predictive uncertainty
estimation using deep ensembles", NeurIPS), and flip test-time augmentation gives further samples. This module
turns those probabilities into a few named measures, one score and a review flag with reasons in words.

Everything here is a pure function of arrays (no I/O, no network). Inputs are on ONE grid (in `clips-predict`
the 6 mm stage-A grid, where the ensemble members are):

* `prob` `(z, y, x)` float: the final lesion probability (the ensemble's output; members trained apart are
  averaged), in [0, 1];
* `mask` `(z, y, x)` bool or float in [0, 1]: the final mask on that grid, or the fraction of each voxel that
  the final (finer) mask covers (`mask_fraction_on_grid`);
* `members` `(n_members, z, y, x)` float, optional: each member's lesion probability;
* `tta` `(n_passes, z, y, x)` float, optional: the final probability of each flip pass;
* `spacing_mm` `(z, y, x)` in mm.

Measures (`measures`; volumes in ml, probabilities and Dice unitless; None when the input is absent):

* `member_dice_mean`, `member_dice_min`: mean / smallest pairwise Dice of the members' masks (p_m > 0.5), with
  a smoothing volume s = `SMOOTH_ML`: (2 |A and B| + s) / (|A| + |B| + s), volumes in ml. Both empty -> 1 (two
  members agreeing that there is no lesion agree perfectly); disjoint masks of 10 ml each -> 0.02 (exactly 0
  with s = 0, `pairwise_dice`). The smoothing keeps a disagreement of one or two 6 mm voxels (0.2-0.4 ml,
  irrelevant for TMTV) from reading as total disagreement.
* `member_tmtv_ml` (list), `member_tmtv_cv`: the members' TMTVs and their coefficient of variation
  (population s.d. / mean; 0 when all members are empty).
* `member_disagreement`: |union - intersection| / |union| of the member masks, the share of the volume
  that any member calls lesion on which the members do not all agree (0 when the union is empty).
* `member_sd_mean`: mean over the lesion region (below) of the per-voxel s.d. of the member probabilities.
* `tta_dice_mean`, `tta_sd_mean`: the same for the flip passes.
* `entropy_mean_bits`: mean binary entropy H(p) = -p log2 p - (1-p) log2 (1-p) of `prob` over the region.
* `uncertain_ml`: volume of the region with 0.2 < p < 0.8.
* `expected_dice`: the Dice the mask would have if the truth were drawn voxel by voxel from `prob`,
  (2 sum p f + s) / (sum p + sum f + s) over the region (f = mask fraction, sums as volumes in ml, same
  smoothing): 1 for a confident mask (p near 0 or 1 and the mask where p > 0.5), low when much of the mask
  or of the probability mass lies near 0.5 or outside the mask.
* `region_ml`, `tmtv_ml`: the region's volume and the mask's volume (sum f x voxel volume).

The lesion region: every voxel that anything calls possible lesion (mask > 0, p >= `CANDIDATE_P`, any
member's or pass's p > 0.5), dilated by `MARGIN_MM` (its surroundings). Summaries over the region do not
depend on how much lesion-free body is in the field of view. With temperature-scaled probabilities pass the
unscaled ones as `candidate_prob`: the region is then fixed by what the networks said, and the temperature only
changes the confidence measured inside it (a large T would otherwise lift thousands of background voxels
above `CANDIDATE_P` and make the region, not the lesions, dominate `expected_dice`).

The score (`score`, 1 = reliable, 0 = unreliable): the geometric mean of the available components, each a
Dice-like number in [0, 1]:

    score = (member_dice_mean * tta_dice_mean * expected_dice) ** (1 / k)

over the k components present (a single network without TTA: score = expected_dice). Why these: each
estimates the overlap one should expect between the mask and another plausible segmentation (another member,
another view, a draw from the probabilities), and a bad Dice against the truth shows up as low overlap
between plausible answers; the geometric mean keeps the Dice scale and lets one bad component pull the score
down. The review flag is `score < threshold`; the threshold is fixed on a validation split
(`youden_threshold`; `clips-reliability` does it on phantoms, docs/reliability.md), `DEFAULT_REVIEW_THRESHOLD`
otherwise.

Checking the score against the real error (`auroc`, `delong_interval`, `worst_tertile`, `youden_threshold`):
per patient, on held-out cases with ground truth.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage, stats

SMOOTH_ML = 0.5
"""Smoothing volume (ml) of the Dice-like measures: about two 6 mm voxels (0.216 ml each)."""
MARGIN_MM = 6.0
"""The lesion region includes the candidate voxels' surroundings up to this distance (mm)."""
CANDIDATE_P = 0.25
"""Voxels with a final lesion probability at least this high belong to the lesion region."""
UNCERTAIN_BAND = (0.2, 0.8)
"""Probabilities strictly inside this band count as uncertain (`uncertain_ml`)."""
DEFAULT_REVIEW_THRESHOLD = 0.5
"""Review when the score is below this, unless a threshold fixed on a validation split is given (the
weights directory's `reliability.json`, written by `clips-reliability`)."""
REASON_LEVEL = 0.8
"""A component below this level gets its sentence in `reasons` (the weakest one always does when flagged)."""

__all__ = [
    "DEFAULT_REVIEW_THRESHOLD",
    "assess",
    "auroc",
    "binary_entropy_bits",
    "delong_interval",
    "mask_fraction_on_grid",
    "measures",
    "pairwise_dice",
    "score",
    "spearman",
    "worst_tertile",
    "youden_threshold",
]


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    """H(p) = -p log2 p - (1 - p) log2 (1 - p) in bits, float32 of p's shape; 0 at p = 0 or 1, 1 at p = 0.5."""
    q = np.clip(np.asarray(p, np.float32), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1.0 - q) * np.log2(1.0 - q))
    return np.nan_to_num(h, nan=0.0).astype(np.float32)


def pairwise_dice(masks: np.ndarray, voxel_ml: float = 1.0, smooth_ml: float = 0.0) -> np.ndarray:
    """Dice of every pair of masks, `(2 |A and B| v + s) / (|A| v + |B| v + s)`.

    Args:
      masks: `(n, z, y, x)` bool (n >= 2). voxel_ml: volume of one voxel (ml). smooth_ml: s, in ml (>= 0).
    Returns:
      float64 `(n * (n - 1) / 2,)` in pair order (0, 1), (0, 2), ..., (n-2, n-1). Two empty masks -> 1
      (agreement that there is no lesion), with or without smoothing.
    """
    m = np.asarray(masks, bool).reshape(len(masks), -1)
    sizes = m.sum(axis=1).astype(np.float64) * voxel_ml
    out = []
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            den = sizes[i] + sizes[j] + smooth_ml
            inter = float(np.count_nonzero(m[i] & m[j])) * voxel_ml
            out.append(1.0 if den == 0 else (2.0 * inter + smooth_ml) / den)
    return np.asarray(out, np.float64)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population s.d. / mean of non-negative values (e.g. TMTVs in ml); 0 when the mean is 0."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    return 0.0 if mean <= 0 else float(v.std() / mean)


def disagreement_fraction(masks: np.ndarray) -> float:
    """|union - intersection| / |union| of `(n, z, y, x)` bool masks; 0 when the union is empty."""
    m = np.asarray(masks, bool)
    union = np.count_nonzero(m.any(axis=0))
    return 0.0 if union == 0 else float(1.0 - np.count_nonzero(m.all(axis=0)) / union)


def _ball(spacing_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """Boolean structuring element: voxel offsets within `radius_mm` (anisotropic spacing)."""
    r = [int(math.floor(radius_mm / float(s))) for s in spacing_mm]
    grids = np.meshgrid(*[np.arange(-k, k + 1) * float(s) for k, s in zip(r, spacing_mm)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def lesion_region(candidates: np.ndarray, spacing_mm: Sequence[float], margin_mm: float = MARGIN_MM) -> np.ndarray:
    """`candidates` `(z, y, x)` bool dilated by `margin_mm` (a ball in mm), computed inside their bounding box
    (+ margin); bool of the same shape, all False when there is no candidate."""
    c = np.asarray(candidates, bool)
    out = np.zeros(c.shape, bool)
    idx = np.argwhere(c)
    if idx.size == 0:
        return out
    ball = _ball(spacing_mm, margin_mm)
    pad = [k // 2 for k in ball.shape]
    lo = [max(int(a) - p, 0) for a, p in zip(idx.min(0), pad)]
    hi = [min(int(b) + p + 1, n) for b, p, n in zip(idx.max(0), pad, c.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = ndimage.binary_dilation(c[box], structure=ball) if ball.size > 1 else c[box]
    return out


def mask_fraction_on_grid(
    mask: np.ndarray, spacing_mm: Sequence[float], coarse_spacing_mm: Sequence[float], coarse_shape: Sequence[int]
) -> np.ndarray:
    """The fraction of each coarse voxel covered by a fine mask, for grids sharing voxel 0 (as the PET grid and
    its 6 mm stage-A grid, `Geometry.resampled`).

    Fine voxel i belongs to the coarse voxel nearest to its centre, round(i * s_fine / s_coarse) per axis
    (clipped to the coarse grid). Args: mask `(z, y, x)` bool on the fine grid; spacings (z, y, x) mm;
    coarse_shape (z, y, x). Returns float32 `coarse_shape` in [0, 1] (0 where no fine voxel falls).
    """
    out = np.asarray(mask, bool)
    counts = []
    for axis in range(3):
        n, nc = out.shape[axis], int(coarse_shape[axis])
        b = np.clip(np.rint(np.arange(n) * float(spacing_mm[axis]) / float(coarse_spacing_mm[axis])), 0, nc - 1)
        b = b.astype(np.int64)  # non-decreasing: each coarse voxel takes a contiguous run of fine voxels
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        summed = np.zeros(out.shape[:axis] + (nc,) + out.shape[axis + 1 :], np.uint16)
        np.moveaxis(summed, axis, 0)[b[starts]] = np.moveaxis(np.add.reduceat(out, starts, axis, np.uint16), axis, 0)
        out = summed
        shape = [1, 1, 1]
        shape[axis] = nc
        counts.append(np.bincount(b, minlength=nc).reshape(shape))
    n_fine = counts[0] * counts[1] * counts[2]
    return np.where(n_fine > 0, out / np.maximum(n_fine, 1), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Measures, score, reasons
# ---------------------------------------------------------------------------------------------------------


def _sample_measures(samples, region, voxel_ml, prefix: str) -> dict:
    """Dice agreement and per-voxel s.d. over the region of `(n, z, y, x)` probabilities (None when n < 2)."""
    if samples is None or len(samples) < 2:
        return {f"{prefix}_dice_mean": None, f"{prefix}_dice_min": None, f"{prefix}_sd_mean": None}
    s = np.asarray(samples, np.float32)
    d = pairwise_dice(s > 0.5, voxel_ml, SMOOTH_ML)
    sd = float(s[:, region].std(axis=0).mean()) if region.any() else 0.0
    return {f"{prefix}_dice_mean": float(d.mean()), f"{prefix}_dice_min": float(d.min()), f"{prefix}_sd_mean": sd}


def measures(
    prob: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    members: np.ndarray | None = None,
    tta: np.ndarray | None = None,
    *,
    margin_mm: float = MARGIN_MM,
    candidate_prob: np.ndarray | None = None,
) -> dict:
    """The named measures of the module docstring (floats; None where members / passes are absent).

    Args: see the module docstring (prob, mask `(z, y, x)`; members `(n, z, y, x)`, tta `(k, z, y, x)`,
    spacing (z, y, x) mm; candidate_prob `(z, y, x)`: the probability that defines the lesion region, default
    `prob`). Raises ValueError for mismatched shapes.
    """
    p = np.clip(np.asarray(prob, np.float32), 0.0, 1.0)
    f = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    for name, a in (("mask", f), ("members", members), ("tta", tta), ("candidate_prob", candidate_prob)):
        if a is not None and tuple(np.shape(a)[-3:]) != p.shape:
            raise ValueError(f"reliability: {name} shape {np.shape(a)} does not match prob {p.shape}")
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / 1000.0
    cand = (f > 0) | ((p if candidate_prob is None else np.asarray(candidate_prob)) >= CANDIDATE_P)
    for samples in (members, tta):
        if samples is not None:
            cand |= (np.asarray(samples) > 0.5).any(axis=0)
    region = lesion_region(cand, spacing_mm, margin_mm)
    pr, fr = p[region].astype(np.float64), f[region].astype(np.float64)
    out = {
        "members": 0 if members is None else int(len(members)),
        "tta_passes": 0 if tta is None else int(len(tta)),
        "tmtv_ml": float(f.sum(dtype=np.float64) * voxel_ml),
        "region_ml": float(region.sum() * voxel_ml),
        "expected_dice": (2.0 * float((pr * fr).sum()) * voxel_ml + SMOOTH_ML)
        / ((float(pr.sum()) + float(fr.sum())) * voxel_ml + SMOOTH_ML),
        "entropy_mean_bits": float(binary_entropy_bits(pr).mean()) if pr.size else 0.0,
        "uncertain_ml": float(((pr > UNCERTAIN_BAND[0]) & (pr < UNCERTAIN_BAND[1])).sum() * voxel_ml),
    }
    out.update(_sample_measures(members, region, voxel_ml, "member"))
    if members is not None and len(members) >= 2:
        mm = np.asarray(members) > 0.5
        tmtv = [float(np.count_nonzero(m)) * voxel_ml for m in mm]
        cv, disagree = coefficient_of_variation(tmtv), disagreement_fraction(mm)
        out.update(member_tmtv_ml=tmtv, member_tmtv_cv=cv, member_disagreement=disagree)
    else:
        out.update(member_tmtv_ml=None, member_tmtv_cv=None, member_disagreement=None)
    out.update(_sample_measures(tta, region, voxel_ml, "tta"))
    return out


def score_components(m: dict) -> dict[str, float]:
    """{"members": member_dice_mean, "tta": tta_dice_mean, "voxels": expected_dice}, the ones present."""
    comps = {"members": m.get("member_dice_mean"), "tta": m.get("tta_dice_mean"), "voxels": m.get("expected_dice")}
    return {k: float(v) for k, v in comps.items() if v is not None}


def score(m: dict) -> float:
    """The reliability score in [0, 1] (1 = reliable): geometric mean of `score_components(m)`."""
    comps = np.clip(np.asarray(list(score_components(m).values()), np.float64), 0.0, 1.0)
    return float(np.exp(np.mean(np.log(np.maximum(comps, 1e-12))))) if comps.size else float("nan")


def _reason(key: str, m: dict) -> str:
    """One sentence a physician understands for a score component (see `score_components`)."""
    if key == "members":
        lo, hi = min(m["member_tmtv_ml"]), max(m["member_tmtv_ml"])
        return (
            f"the {m['members']} ensemble members disagree on {100 * m['member_disagreement']:.0f} % of the lesion "
            f"volume (mean pairwise Dice {m['member_dice_mean']:.2f}; their TMTVs range {lo:.1f}-{hi:.1f} ml)"
        )
    if key == "tta":
        return (
            f"the mask changes when the image is flipped (mean pairwise Dice of the {m['tta_passes']} flipped "
            f"passes {m['tta_dice_mean']:.2f})"
        )
    if m["tmtv_ml"] == 0:
        return f"no lesion in the mask, but {m['uncertain_ml']:.1f} ml have a lesion probability of 0.2-0.8"
    return (
        f"the lesion probabilities are uncertain: {m['uncertain_ml']:.1f} ml with probability 0.2-0.8 beside a "
        f"TMTV of {m['tmtv_ml']:.1f} ml (expected Dice of the mask under its own probabilities "
        f"{m['expected_dice']:.2f})"
    )


def reasons(m: dict, review: bool) -> list[str]:
    """Sentences for the components below `REASON_LEVEL`, weakest first; when `review`, at least the weakest."""
    comps = sorted(score_components(m).items(), key=lambda kv: kv[1])
    keep = [k for k, v in comps if v < REASON_LEVEL] or ([comps[0][0]] if review and comps else [])
    return [_reason(k, m) for k in keep]


def assess(
    prob: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    members: np.ndarray | None = None,
    tta: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    margin_mm: float = MARGIN_MM,
    candidate_prob: np.ndarray | None = None,
) -> dict:
    """Measures, score, review flag and reasons of one study (arguments: `measures`).

    Returns a JSON-friendly dict: {**measures, "score": float in [0, 1], "review": score < threshold,
    "threshold": float, "components": `score_components`, "reasons": [sentences], "notes": [sentences about
    what was not measured]}.
    """
    t = DEFAULT_REVIEW_THRESHOLD if threshold is None else float(threshold)
    m = measures(prob, mask, spacing_mm, members, tta, margin_mm=margin_mm, candidate_prob=candidate_prob)
    s = score(m)
    review = bool(s < t)
    notes = []
    if m["members"] < 2:
        notes.append("single network: ensemble disagreement not measured (voxel probabilities only)")
    if m["tta_passes"] < 2:
        notes.append("no test-time augmentation: flip agreement not measured (--tta adds it)")
    return {
        **m,
        "score": s,
        "review": review,
        "threshold": t,
        "components": score_components(m),
        "reasons": reasons(m, review),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------------
# Checking the score against the real error (per patient)
# ---------------------------------------------------------------------------------------------------------


def worst_tertile(dice: Sequence[float]) -> np.ndarray:
    """bool `(n,)`: the ceil(n/3) cases with the lowest Dice among the finite ones (ties: lower index first);
    NaN (lesion-free) cases are False."""
    d = np.asarray(dice, np.float64)
    ok = np.flatnonzero(np.isfinite(d))
    k = math.ceil(len(ok) / 3)
    out = np.zeros(len(d), bool)
    out[ok[np.argsort(d[ok], kind="stable")[:k]]] = True
    return out


def auroc(risk: Sequence[float], label: Sequence[bool]) -> float:
    """Area under the ROC curve of `risk` (larger = more likely positive) for bool `label`: the Mann-Whitney
    probability P(risk of a positive > risk of a negative) + 0.5 P(tie). NaN without positives or negatives."""
    r, y = np.asarray(risk, np.float64), np.asarray(label, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(r)  # average ranks for ties
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def delong_interval(risk: Sequence[float], label: Sequence[bool], level: float = 0.95) -> dict:
    """AUROC with DeLong's standard error and a Wald interval, clipped to [0, 1] (DeLong, DeLong &
    Clarke-Pearson 1988, Biometrics 44:837-845); the unit is the patient.

    Returns {"auroc", "se", "ci_low", "ci_high", "n_pos", "n_neg"}; NaNs with fewer than 2 of either class.
    """
    r, y = np.asarray(risk, np.float64), np.asarray(label, bool)
    x1, x0 = r[y], r[~y]
    out = {"auroc": auroc(r, y), "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    out.update(n_pos=int(len(x1)), n_neg=int(len(x0)))
    if len(x1) < 2 or len(x0) < 2:
        return out
    psi = (x1[:, None] > x0[None, :]) + 0.5 * (x1[:, None] == x0[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(x1) + v01.var(ddof=1) / len(x0))
    z = stats.norm.ppf(0.5 + level / 2)
    out.update(se=se, ci_low=max(0.0, out["auroc"] - z * se), ci_high=min(1.0, out["auroc"] + z * se))
    return out


def youden_threshold(score_values: Sequence[float], label: Sequence[bool]) -> dict:
    """The review threshold t (review when score < t) maximising Youden's J = sensitivity + specificity - 1
    for finding the `label` cases (e.g. the worst tertile of Dice on a validation split).

    Candidates: midpoints between consecutive distinct scores (and just above the largest / below the
    smallest); ties in J: the smallest t (fewest flagged). Returns {"threshold", "j", "sensitivity",
    "specificity"}; NaNs without positives or negatives.
    """
    s, y = np.asarray(score_values, np.float64), np.asarray(label, bool)
    if y.all() or not y.any():
        return {"threshold": float("nan"), "j": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")}
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1e-6], (u[1:] + u[:-1]) / 2, [u[-1] + 1e-6]])
    best = None
    for t in cands:
        flag = s < t
        sens, spec = float(flag[y].mean()), float((~flag[~y]).mean())
        if best is None or sens + spec - 1 > best["j"] + 1e-12:
            best = {"threshold": float(t), "j": sens + spec - 1, "sensitivity": sens, "specificity": spec}
    return best


def spearman(a: Sequence[float], b: Sequence[float]) -> dict:
    """Spearman rank correlation of the finite pairs (`scipy.stats.spearmanr`): {"rho", "p", "n"}; NaNs with
    fewer than 3 pairs or a constant side."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:  # too few, or a constant: undefined
        return {"rho": float("nan"), "p": float("nan"), "n": int(ok.sum())}
    res = stats.spearmanr(x[ok], y[ok])
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(ok.sum())}
