"""Lesion-level metrics: connected components, autoPET FP/FN volumes, lesion matching, Dmax.

Lesions are connected components with **18-connectivity** (voxels sharing a face or an edge), as in
autoPET and microsoft/lymphoma-segmentation-dnn; `scipy.ndimage.label` with
`generate_binary_structure(3, 2)` computes them.

* FPV / FNV (autoPET, Gatidis et al.): total volume of predicted components sharing no voxel with the
  truth / of true components sharing no voxel with the prediction. A component touching the other mask by a
  single voxel contributes nothing.
* Approach 1, any overlap (Ahamed et al. criterion 1): a true lesion is TP if any predicted voxel touches
  it, else FN; a predicted component is FP if it touches no true voxel. a1_tp + a1_fn = number of true
  lesions; a1_fp <= number of predicted components.
* Approach 2, one-to-one at IoU >= threshold: pairs (true lesion, predicted component) with IoU >=
  threshold (and IoU > 0) are candidates; a maximum-cardinality one-to-one matching is found with the
  Hungarian algorithm (`scipy.optimize.linear_sum_assignment`), ties broken by the larger total IoU.
  a2_tp = matched pairs, a2_fn = true lesions unmatched, a2_fp = predicted components unmatched.
* Dmax (the definition of microsoft/lymphoma-segmentation-dnn, not the lesion-centroid distance of Cottereau
  et al. 2020): the largest Euclidean distance
  in mm between the centres of any two foreground voxels of one mask (spacing-aware). A single voxel gives
  0; an empty mask gives NaN. Computed exactly on the convex hull of the per-row extreme voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize, spatial

__all__ = [
    "LESION_STRUCTURE",
    "label_lesions",
    "lesion_overlaps",
    "fpv_fnv_ml",
    "match_any_overlap",
    "match_iou",
    "lesion_metrics",
    "dmax_mm",
]

#: 3x3x3 structuring element of 18-connectivity (faces + edges, not corners).
LESION_STRUCTURE = ndimage.generate_binary_structure(3, 2)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 18-connected components of a boolean (z, y, x) mask.

    Returns:
      (int32 labels of mask.shape, 0 = background and 1..n the lesions; n the number of lesions).
    """
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=LESION_STRUCTURE)
    return labels.astype(np.int32, copy=False), int(n)


class LesionOverlaps:
    """Overlap statistics of two labelled masks.

    Attributes:
      n_true, n_pred: number of true lesions and predicted components.
      size_true: (n_true,) int64 voxel counts; size_pred: (n_pred,).
      pair_true, pair_pred: (k,) 0-based indices of every (true, predicted) pair sharing voxels.
      pair_inter: (k,) int64 number of shared voxels of each pair.
    """

    def __init__(self, n_true, n_pred, size_true, size_pred, pair_true, pair_pred, pair_inter):
        self.n_true, self.n_pred = n_true, n_pred
        self.size_true, self.size_pred = size_true, size_pred
        self.pair_true, self.pair_pred, self.pair_inter = pair_true, pair_pred, pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        """(k,) float64 IoU of each overlapping pair."""
        union = self.size_true[self.pair_true] + self.size_pred[self.pair_pred] - self.pair_inter
        return self.pair_inter / np.maximum(union, 1)


def lesion_overlaps(pred: np.ndarray, truth: np.ndarray) -> LesionOverlaps:
    """Label both boolean (z, y, x) masks (18-connectivity) and count the voxels each pair shares.

    Sparse: only pairs that actually overlap are listed, so thousands of small components stay cheap.
    """
    lab_t, n_t = label_lesions(truth)
    lab_p, n_p = label_lesions(pred)
    size_t = np.bincount(lab_t.ravel(), minlength=n_t + 1)[1:].astype(np.int64)
    size_p = np.bincount(lab_p.ravel(), minlength=n_p + 1)[1:].astype(np.int64)
    both = (lab_t > 0) & (lab_p > 0)
    codes = lab_t[both].astype(np.int64) * (n_p + 1) + lab_p[both]
    uniq, inter = np.unique(codes, return_counts=True)
    return LesionOverlaps(
        n_t,
        n_p,
        size_t,
        size_p,
        (uniq // (n_p + 1) - 1).astype(np.int64),
        (uniq % (n_p + 1) - 1).astype(np.int64),
        inter.astype(np.int64),
    )


def fpv_fnv_ml(ov: LesionOverlaps, voxel_ml: float) -> tuple[float, float]:
    """autoPET false-positive and false-negative volumes (ml) from `lesion_overlaps`.

    Returns:
      (FPV = volume of predicted components touching no true voxel,
       FNV = volume of true lesions touching no predicted voxel). Both 0.0 when there is nothing to count.
    """
    touched_p = np.zeros(ov.n_pred, dtype=bool)
    touched_p[ov.pair_pred] = True
    touched_t = np.zeros(ov.n_true, dtype=bool)
    touched_t[ov.pair_true] = True
    return (float(ov.size_pred[~touched_p].sum()) * voxel_ml, float(ov.size_true[~touched_t].sum()) * voxel_ml)


def match_any_overlap(ov: LesionOverlaps) -> tuple[int, int, int]:
    """Approach 1 (any overlap): (TP true lesions, FN true lesions, FP predicted components)."""
    tp = int(np.unique(ov.pair_true).size)
    fp = ov.n_pred - int(np.unique(ov.pair_pred).size)
    return tp, ov.n_true - tp, fp


def match_iou(ov: LesionOverlaps, threshold: float = 0.5) -> tuple[int, int, int]:
    """Approach 2 (one-to-one matching at IoU >= threshold): (TP, FN true lesions, FP predicted components).

    Args:
      ov: from `lesion_overlaps`.
      threshold: lesion-wise IoU threshold in [0, 1] (0.5 typical). Pairs must also overlap (IoU > 0).
    Returns:
      (a2_tp, a2_fn, a2_fp); a2_tp + a2_fn = n_true and a2_tp + a2_fp = n_pred.
    """
    iou = ov.pair_iou
    ok = (iou >= threshold) & (iou > 0)
    if not np.any(ok):
        return 0, ov.n_true, ov.n_pred
    rows, r_idx = np.unique(ov.pair_true[ok], return_inverse=True)
    cols, c_idx = np.unique(ov.pair_pred[ok], return_inverse=True)
    # Maximise the number of matches first, then the total IoU: one extra match outweighs any IoU sum.
    big = float(min(rows.size, cols.size) + 1)
    weight = np.zeros((rows.size, cols.size))
    weight[r_idx, c_idx] = big + iou[ok]
    r, c = optimize.linear_sum_assignment(weight, maximize=True)
    tp = int(np.count_nonzero(weight[r, c] > 0))
    return tp, ov.n_true - tp, ov.n_pred - tp


def lesion_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm, lesion_threshold: float = 0.5) -> dict[str, float]:
    """All lesion-level columns of metrics.csv for two boolean (z, y, x) masks on the same grid.

    Returns:
      {"fpv_ml", "fnv_ml" (ml), "lesions_true", "lesions_pred", "a1_tp", "a1_fn", "a1_fp", "a2_tp",
       "a2_fn", "a2_fp" (counts, as floats for a uniform table)}. Empty masks give 0 lesions and 0 ml.
    """
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / 1000.0
    ov = lesion_overlaps(pred, truth)
    fpv, fnv = fpv_fnv_ml(ov, voxel_ml)
    a1 = match_any_overlap(ov)
    a2 = match_iou(ov, lesion_threshold)
    return {
        "fpv_ml": fpv,
        "fnv_ml": fnv,
        "lesions_true": float(ov.n_true),
        "lesions_pred": float(ov.n_pred),
        "a1_tp": float(a1[0]),
        "a1_fn": float(a1[1]),
        "a1_fp": float(a1[2]),
        "a2_tp": float(a2[0]),
        "a2_fn": float(a2[1]),
        "a2_fp": float(a2[2]),
    }


def dmax_mm(mask: np.ndarray, spacing_mm) -> float:
    """Dmax: largest distance (mm) between the centres of any two foreground voxels of a (z, y, x) mask.

    Args:
      mask: boolean (z, y, x).
      spacing_mm: (z, y, x) voxel size in mm.
    Returns:
      float mm; 0.0 for a single voxel; NaN for an empty mask. Exact: the farthest pair lies on the convex
      hull, whose vertices are among the first/last voxel of each x-row.
    """
    m = np.asarray(mask, dtype=bool)
    rows = m.any(axis=2)
    if not rows.any():
        return float("nan")
    zz, yy = np.nonzero(rows)
    first = np.argmax(m[zz, yy, :], axis=1)
    last = m.shape[2] - 1 - np.argmax(m[zz, yy, ::-1], axis=1)
    pts = np.concatenate([np.stack([zz, yy, first], 1), np.stack([zz, yy, last], 1)]).astype(np.float64)
    pts = np.unique(pts, axis=0) * np.asarray([float(s) for s in spacing_mm])
    if len(pts) > 2000:
        try:
            pts = pts[spatial.ConvexHull(pts).vertices]
        except spatial.QhullError:  # flat or collinear point set: joggle (vertices stay input points)
            pts = pts[spatial.ConvexHull(pts, qhull_options="QJ").vertices]
    if len(pts) < 2:
        return 0.0
    return float(spatial.distance.pdist(pts).max())
