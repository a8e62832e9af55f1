"""Per-case losses of a whole-volume lesion probability map against its label (one float per case).

Where this fits: the transfer-teacher curriculum ranks training cases by how badly a trained model predicts
them (`clips_jax.experiments.teacher.score_cases`, which re-exports these functions under its older names), and
`clips_jax.evaluation.teacher_row` turns one case's prediction into that score. They are pure functions of
NumPy arrays (no I/O), below both the evaluation and the curricula packages.

Not to be confused with `clips_jax.losses.soft_dice_loss`, the *training* loss of a batch of logits: here the
input is a probability map `p` of one whole case, `(z, y, x)` float in [0, 1], and the label `t` a same-shape
mask (> 0 = lesion).

* `soft_dice_of_probs`: 1 - 2 sum(p t) / (sum(p) + sum(t)), in [0, 1];
* `combined_case_loss`: the supervised part of the TMTV-Net paper's Eq. 1 with its weights (Dice + 2 * CE,
  as `clips_jax.losses.combined_loss` without its Mumford-Shah term): the training soft Dice
  (`clips_jax.losses.soft_dice_loss`, smoothing 1e-3 / 1e-5) + `CE_WEIGHT` * the voxel-mean cross-entropy of
  (1 - p, p), p clipped to [`PROB_CLIP`, 1 - `PROB_CLIP`];
* `case_loss`: one of the two by name, NaN for an unlabeled or lesion-free case (its loss would be an FP-only
  score on another scale than the lesion cases').
"""

from __future__ import annotations

import numpy as np

from clips_jax.errors import ConfigError, DataError

CASE_LOSSES = ("soft_dice", "combined")
"""Per-case loss kinds of `case_loss`."""

PROB_CLIP = 1e-7
"""Probability clip of the `combined` loss's cross-entropy (keeps it finite for p = 0 or 1)."""

CE_WEIGHT = 2.0
"""Weight of the cross-entropy in the `combined` loss (lambda of the TMTV-Net paper's Eq. 1)."""


def soft_dice_of_probs(prob: np.ndarray, truth: np.ndarray) -> float:
    """1 - soft Dice = 1 - 2 sum(p t) / (sum(p) + sum(t)) of a probability map against a mask.

    Args: prob: (z, y, x) lesion probability in [0, 1] (any float dtype; summed in float64); truth: same-shape
      mask (> 0 is lesion).
    Returns: float in [0, 1]; NaN when the mask is empty (a lesion-free case has no Dice).
    """
    t = np.asarray(truth, dtype=np.float64) > 0
    if not t.any():
        return float("nan")
    p = np.asarray(prob, dtype=np.float64)
    return float(1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum()))


def combined_case_loss(prob: np.ndarray, truth: np.ndarray) -> float:
    """Supervised TMTV-Net loss of a whole volume: soft Dice (training form) + `CE_WEIGHT` * cross-entropy.

    Dice: `clips_jax.losses.soft_dice_loss` (1 - (2 sum(p t) + 1e-3) / (sum(p) + sum(t) + 1e-5 + 1e-3)); CE: the
    voxel mean of -log p(true class) with class probabilities (1 - p, p), p clipped to [PROB_CLIP, 1 - PROB_CLIP]
    (`clips_jax.losses.cross_entropy` of the logits log(1 - p), log(p)).

    Args: prob: (z, y, x) lesion probability in [0, 1]; truth: same-shape mask (> 0 is lesion).
    Returns: float >= 0 (finite for any p in [0, 1]); NaN when the mask is empty (as `soft_dice_of_probs`).
    """
    import jax.numpy as jnp

    from clips_jax import losses

    t = np.asarray(truth) > 0
    if not t.any():
        return float("nan")
    p = np.clip(np.asarray(prob, dtype=np.float32), PROB_CLIP, 1.0 - PROB_CLIP)
    logits = jnp.asarray(np.log(np.stack([1.0 - p, p], axis=-1))[None])
    labels = jnp.asarray(t.astype(np.int32)[None])
    dice = float(losses.soft_dice_loss(logits, labels)[0])
    ce = float(losses.cross_entropy(logits, labels)[0])
    return dice + CE_WEIGHT * ce


def case_loss(prob: np.ndarray, truth: np.ndarray | None, loss: str = "soft_dice") -> float:
    """The per-case loss `loss` (in `CASE_LOSSES`) of one case; NaN for an unlabeled (`truth` None) or lesion-free case.

    Args: prob: (z, y, x) lesion probability in [0, 1]; truth: same-shape mask (> 0 is lesion) or None.
    Returns: float (higher = worse prediction = harder case).
    Raises: ConfigError for an unknown `loss`; DataError when `prob` holds a non-finite value (broken model
      weights) or its shape differs from the mask's.
    """
    if loss not in CASE_LOSSES:
        raise ConfigError(f"teacher loss {loss!r} unknown; use one of {CASE_LOSSES}")
    if truth is None or not np.any(np.asarray(truth) > 0):
        return float("nan")
    p = np.asarray(prob)
    if p.shape != np.shape(truth):
        raise DataError(f"teacher probability shape {p.shape} differs from the label's {np.shape(truth)}")
    if not np.all(np.isfinite(p)):
        raise DataError(f"teacher output has {int((~np.isfinite(p)).sum())} non-finite voxels; check the weights")
    return soft_dice_of_probs(p, truth) if loss == "soft_dice" else combined_case_loss(p, truth)


__all__ = ["CASE_LOSSES", "CE_WEIGHT", "PROB_CLIP", "case_loss", "combined_case_loss", "soft_dice_of_probs"]
