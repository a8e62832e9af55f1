"""Calibration of voxel lesion probabilities: reliability-diagram bins, expected calibration error, temperature.

Why: a lesion probability of 0.7 should be right 70 % of the time, or the uncertainty measures built on it
(`clips_jax.metrics.reliability`) mean little. Definitions (binary, for the lesion class):

* Bins (`calibration_bins`): `n_bins` equal-width bins of the predicted lesion probability p on [0, 1] (the
  last bin includes 1); per bin the voxel count, the sum of p and the number of true lesion voxels. Bins of
  several cases add up (`add_bins`), so a cohort's diagram weighs every voxel equally.
* Expected calibration error (`expected_calibration_error`; Naeini, Cooper & Hauskrecht 2015, "Obtaining well
  calibrated probabilities using Bayesian binning", AAAI; Guo et al. 2017): ECE = sum over bins of
  (n_b / N) |observed lesion fraction_b - mean p_b|, in probability units [0, 1].
* Which voxels: over a whole-body volume almost every voxel is confident background, which makes any model's
  ECE tiny. `lesion_neighbourhood` restricts the bins to the voxels where the question is open: the true and
  the predicted lesions (p > 0.5) dilated by `clips_jax.metrics.reliability.MARGIN_MM`. Both are reported
  ("all voxels" and "lesion neighbourhood").
* Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On calibration of modern neural networks",
  ICML): p_T = sigmoid(logit(p) / T), one T > 0 fitted by minimising the voxel negative log-likelihood on
  validation cases (`fit_temperature` on a `logit_histogram`). logit(p) = 0 stays 0, so the mask (p > 0.5)
  never changes; only how confident the probabilities are. Applied to the blended probability (not to each
  tile's logits), which is exact for one tile and the usual approximation after averaging.

Pure functions of arrays; no I/O.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from clips_jax.metrics.reliability import MARGIN_MM, lesion_region

LOGIT_RANGE = 16.0
"""Logits are clipped to [-LOGIT_RANGE, LOGIT_RANGE] (p within about 1e-7 of 0 or 1) in the histogram."""
LOGIT_BINS = 3200
"""Bins of the logit histogram (0.01 logit units wide)."""

__all__ = [
    "add_bins",
    "apply_temperature",
    "calibration_bins",
    "expected_calibration_error",
    "fit_temperature",
    "lesion_neighbourhood",
    "logit_histogram",
]


def calibration_bins(prob: np.ndarray, truth: np.ndarray, n_bins: int = 10, where: np.ndarray | None = None) -> dict:
    """Reliability-diagram counts of one case.

    Args:
      prob: `(z, y, x)` lesion probability in [0, 1]. truth: `(z, y, x)` bool (or > 0) ground truth.
      n_bins: equal-width bins on [0, 1]. where: optional `(z, y, x)` bool voxels to use (default all).
    Returns:
      {"count": int64 (n_bins,), "sum_p": float64 (n_bins,), "positives": int64 (n_bins,)}.
    """
    p = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    t = np.asarray(truth) > 0
    if where is not None:
        p, t = p[where], t[where]
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1).ravel()
    return {
        "count": np.bincount(b, minlength=n_bins).astype(np.int64),
        "sum_p": np.bincount(b, weights=p.ravel(), minlength=n_bins),
        "positives": np.bincount(b, weights=t.ravel().astype(np.float64), minlength=n_bins).astype(np.int64),
    }


def add_bins(a: dict | None, b: dict) -> dict:
    """Element-wise sum of two `calibration_bins` results (`a` None: a copy of `b`)."""
    return {k: (b[k].copy() if a is None else a[k] + b[k]) for k in b}


def expected_calibration_error(bins: dict) -> float:
    """ECE = sum_b (n_b / N) |positives_b / n_b - sum_p_b / n_b| in [0, 1]; NaN when there is no voxel."""
    n = bins["count"].astype(np.float64)
    total = n.sum()
    if total == 0:
        return float("nan")
    return float(np.abs(bins["positives"] - bins["sum_p"]).sum() / total)


def lesion_neighbourhood(prob: np.ndarray, truth: np.ndarray, spacing_mm, margin_mm: float = MARGIN_MM) -> np.ndarray:
    """`(z, y, x)` bool: true lesions and predicted lesions (p > 0.5), dilated by `margin_mm` (a ball)."""
    return lesion_region((np.asarray(truth) > 0) | (np.asarray(prob) > 0.5), spacing_mm, margin_mm)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(q) - np.log1p(-q), -LOGIT_RANGE, LOGIT_RANGE)


def apply_temperature(prob: np.ndarray, temperature: float, chunk: int = 1 << 22) -> np.ndarray:
    """p_T = sigmoid(logit(p) / T), float32 of p's shape (computed in float32, `chunk` voxels at a time, so a
    whole-body PET-grid map needs no float64 copy; p clipped to [1e-7, 1 - 1e-7]); T = 1 returns p as float32."""
    p = np.asarray(prob, np.float32)
    if temperature == 1.0:
        return p
    src = p.reshape(-1)
    out = np.empty(src.shape, np.float32)
    for i in range(0, src.size, chunk):
        q = np.clip(src[i : i + chunk], np.float32(1e-7), np.float32(1 - 1e-7))
        z = (np.log(q) - np.log1p(-q)) / np.float32(temperature)
        out[i : i + chunk] = 1.0 / (1.0 + np.exp(-z))
    return out.reshape(p.shape)


def logit_histogram(prob: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> dict:
    """Counts of lesion / background voxels per logit bin (`LOGIT_BINS` bins on +-`LOGIT_RANGE`) of one case;
    cases add up with `add_bins`. Returns {"positives": int64 (LOGIT_BINS,), "negatives": int64 (LOGIT_BINS,)}."""
    z = _logit(prob)
    t = np.asarray(truth) > 0
    if where is not None:
        z, t = z[where], t[where]
    b = np.minimum(((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * LOGIT_BINS).astype(np.int64), LOGIT_BINS - 1).ravel()
    t = t.ravel()
    return {
        "positives": np.bincount(b[t], minlength=LOGIT_BINS).astype(np.int64),
        "negatives": np.bincount(b[~t], minlength=LOGIT_BINS).astype(np.int64),
    }


def fit_temperature(hist: dict, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the negative log-likelihood of the voxels in `hist` (`logit_histogram`,
    logits at the bin centres), searched on log T within `bounds`; 1.0 when the histogram is empty or holds
    only one class."""
    pos, neg = hist["positives"].astype(np.float64), hist["negatives"].astype(np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return 1.0
    width = 2 * LOGIT_RANGE / LOGIT_BINS
    z = -LOGIT_RANGE + (np.arange(LOGIT_BINS) + 0.5) * width

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # -log sigmoid(s) for lesion voxels, -log(1 - sigmoid(s)) = -log sigmoid(-s) for background
        return float((pos * np.logaddexp(0.0, -s)).sum() + (neg * np.logaddexp(0.0, s)).sum())

    res = optimize.minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    return float(math.exp(res.x))
