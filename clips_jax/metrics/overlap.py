"""Voxel-overlap metrics between a predicted and a ground-truth mask: Dice, volumes (ml), precision, recall.

All functions take boolean `(z, y, x)` masks on the same grid and return Python floats. Volumes are in ml:
voxel count x prod(spacing_mm) / 1000. Empty-mask conventions (also in docs/metrics.md):

* dice: both empty -> NaN (undefined; such cases are summarised apart), exactly one empty -> 0.
* precision = |P and G| / |P|: NaN when P is empty. recall = |P and G| / |G|: NaN when G is empty.
* volumes are always defined (0.0 for an empty mask).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice", "volume_ml", "overlap_volumes"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient 2|P and G| / (|P| + |G|).

    Args:
      pred, truth: arrays of equal shape, interpreted as boolean (non-zero = foreground).
    Returns:
      float in [0, 1]; NaN when both masks are empty; 0.0 when exactly one is empty.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"dice: masks have different shapes {p.shape} and {t.shape}")
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if n_p + n_t == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & t)) / (n_p + n_t)


def volume_ml(mask: np.ndarray, spacing_mm) -> float:
    """Volume of a boolean mask in ml (= cm^3): voxel count x prod(spacing_mm) / 1000. Empty -> 0.0."""
    return int(np.count_nonzero(mask)) * float(np.prod([float(s) for s in spacing_mm])) / 1000.0


def overlap_volumes(pred: np.ndarray, truth: np.ndarray, spacing_mm) -> dict[str, float]:
    """True-positive, false-positive and false-negative volumes and voxel-wise precision / recall.

    Args:
      pred, truth: bool (z, y, x) masks on the same grid.
      spacing_mm: (z, y, x) voxel size in mm.
    Returns:
      {"tp_ml": |P and G|, "fp_ml": |P and not G|, "fn_ml": |G and not P|  (ml),
       "precision": tp / |P| (NaN if P empty), "recall": tp / |G| (NaN if G empty)}.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    vox_ml = float(np.prod([float(s) for s in spacing_mm])) / 1000.0
    n_tp = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    return {
        "tp_ml": n_tp * vox_ml,
        "fp_ml": (n_p - n_tp) * vox_ml,
        "fn_ml": (n_t - n_tp) * vox_ml,
        "precision": n_tp / n_p if n_p else float("nan"),
        "recall": n_tp / n_t if n_t else float("nan"),
    }
