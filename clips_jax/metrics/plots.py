"""Evaluation figures (matplotlib, Agg backend, PNG, written atomically).

* `boxplots`: Dice, NSD and TMTV error (predicted - true, ml) per experiment, side by side.
* `bland_altman`: TMTV agreement of one experiment (mean of predicted and true vs their difference, with the
  bias and the 95 % limits of agreement, bias +- 1.96 SD).
* `mip_figure`: coronal and sagittal PET maximum-intensity projections with the outlines of the
  ground-truth (green) and predicted (red) masks' projections; pixel aspect from the voxel spacing; optionally
  a third panel, the coronal MIP of an uncertainty map (e.g. the binary entropy of the lesion probability).
* `reliability_diagram`: observed lesion fraction vs mean predicted probability per bin (and the voxel count
  per bin), for one or more sets of `clips_jax.metrics.calibration.calibration_bins`.
* `score_scatter`: a per-patient reliability score against the real Dice, with the review threshold.

Inputs are metric rows (dicts with the columns of metrics.csv) or (z, y, x) arrays; nothing is read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clips_jax.fileio import atomic_path  # noqa: E402

__all__ = ["boxplots", "bland_altman", "mip_figure", "reliability_diagram", "score_scatter"]


def _save(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def boxplots(experiments: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """Box plots of Dice, NSD and TMTV error (ml) per experiment.

    Args:
      experiments: experiment name -> metric rows. Undefined (NaN) values are left out of each box.
      path: target PNG.
    Returns: the path written.
    """
    names = list(experiments)
    panels = (
        ("Dice", lambda r: r["dice"]),
        ("NSD", lambda r: r["nsd"]),
        ("TMTV error (pred - true, ml)", lambda r: r["tmtv_pred_ml"] - r["tmtv_true_ml"]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(names) * 3, 4))
    for ax, (title, fn) in zip(axes, panels):
        data = [_finite([fn(r) for r in experiments[n]]) for n in names]
        ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[2].axhline(0.0, color="grey", lw=0.8)
    return _save(fig, path)


def bland_altman(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "TMTV") -> Path:
    """Bland-Altman plot of predicted vs true TMTV (ml) for one experiment.

    x = (pred + true) / 2, y = pred - true; lines at the bias (mean difference) and bias +- 1.96 SD.
    Cases with undefined volumes are skipped; with fewer than two cases the limits are not drawn.
    """
    pred = np.array([float(r["tmtv_pred_ml"]) for r in rows])
    true = np.array([float(r["tmtv_true_ml"]) for r in rows])
    ok = np.isfinite(pred) & np.isfinite(true)
    mean, diff = (pred[ok] + true[ok]) / 2, pred[ok] - true[ok]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(mean, diff, s=18)
    if diff.size >= 2:
        bias, sd = diff.mean(), diff.std(ddof=1)
        for y, style, label in (
            (bias, "-", f"bias {bias:.2f} ml"),
            (bias + 1.96 * sd, "--", "+1.96 SD"),
            (bias - 1.96 * sd, "--", "-1.96 SD"),
        ):
            ax.axhline(y, ls=style, color="C3", lw=1, label=label)
        ax.legend(fontsize=8)
    ax.set_xlabel("mean of predicted and true TMTV (ml)")
    ax.set_ylabel("predicted - true TMTV (ml)")
    ax.set_title(f"Bland-Altman: {title}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def mip_figure(
    suv: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    spacing_mm,
    path: str | os.PathLike,
    title: str = "",
    *,
    uncertainty: np.ndarray | None = None,
    uncertainty_spacing_mm=None,
    uncertainty_label: str = "uncertainty",
) -> Path:
    """Coronal and sagittal PET MIPs with ground-truth (green) and prediction (red) outlines.

    Args:
      suv: (z, y, x) SUV volume; truth, pred: (z, y, x) boolean masks on the same grid (truth None: no
        ground truth, the legend then names the prediction only).
      spacing_mm: (z, y, x) in mm, used for the pixel aspect ratio.
      path: target PNG. title: figure title (e.g. the case id).
      uncertainty: optional (z', y', x') map on its own grid (e.g. the 6 mm stage-A grid), values in [0, 1]:
        a third panel shows its coronal maximum projection (colour bar 0-1) beside the PET.
      uncertainty_spacing_mm: its (z, y, x) spacing (default `spacing_mm`); uncertainty_label: panel title.
    Axis z is drawn upwards (head at the top when z increases towards the head, as in RAS NIfTI).
    """
    sz, sy, sx = (float(s) for s in spacing_mm)
    suv = np.asarray(suv, dtype=np.float32)
    vmax = float(np.percentile(suv, 99.9)) if suv.size else 1.0
    n_panels = 2 if uncertainty is None else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(4.5 * n_panels, 6))
    for ax, axis, name, aspect in ((axes[0], 1, "coronal", sz / sx), (axes[1], 2, "sagittal", sz / sy)):
        ax.imshow(
            suv.max(axis=axis),
            cmap="gray_r",
            origin="lower",
            aspect=aspect,
            vmin=0,
            vmax=max(vmax, 1e-6),
            interpolation="nearest",
        )
        for mask, colour in ((truth, "lime"), (pred, "red")):
            if mask is None:
                continue
            proj = np.asarray(mask, dtype=bool).any(axis=axis)
            if proj.any() and not proj.all():
                ax.contour(proj.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8, origin="lower")
        ax.set_title(name)
        ax.set_axis_off()
    if uncertainty is not None:
        _uncertainty_panel(fig, axes[2], uncertainty, uncertainty_spacing_mm or spacing_mm, uncertainty_label)
    legend = "red: prediction" if truth is None else "green: truth, red: prediction"
    fig.suptitle(f"{title}  ({legend})")
    return _save(fig, path)


def _uncertainty_panel(fig, ax, volume: np.ndarray, spacing_mm, label: str) -> None:
    """Coronal maximum projection of a (z, y, x) map in [0, 1] with a colour bar."""
    uz, _, ux = (float(s) for s in spacing_mm)
    im = ax.imshow(
        np.asarray(volume, np.float32).max(axis=1),
        cmap="magma",
        origin="lower",
        aspect=uz / ux,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(f"{label} (coronal max)")
    ax.set_axis_off()


def reliability_diagram(curves: Mapping[str, Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Reliability diagram: per bin, the observed lesion fraction against the mean predicted probability.

    Args:
      curves: label -> bins of `clips_jax.metrics.calibration.calibration_bins` (summed over cases), e.g.
        {"raw, ECE 0.08": bins, "T = 1.6, ECE 0.03": bins_t}. Empty bins are not drawn.
      path: target PNG. title: figure title.
    The lower panel shows the voxel count per bin (log scale).
    """
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for k, (label, bins) in enumerate(curves.items()):
        n = np.asarray(bins["count"], np.float64)
        ok = n > 0
        conf, frac = np.asarray(bins["sum_p"])[ok] / n[ok], np.asarray(bins["positives"])[ok] / n[ok]
        ax.plot(conf, frac, marker="o", ms=4, color=f"C{k}", label=label)
        edges = np.linspace(0, 1, len(n) + 1)
        axn.step(edges[:-1], np.maximum(n, 1), where="post", color=f"C{k}")
    ax.set_ylabel("observed lesion fraction")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    axn.set_yscale("log")
    axn.set_xlabel("predicted lesion probability")
    axn.set_ylabel("voxels")
    return _save(fig, path)


def score_scatter(
    score: Sequence[float],
    dice: Sequence[float],
    bad: Sequence[bool],
    threshold: float,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Per-patient reliability score (x) against the real Dice (y); `bad` cases (e.g. the worst tertile of
    Dice) in red; a vertical line at the review threshold (cases left of it are flagged)."""
    s, d, b = np.asarray(score, np.float64), np.asarray(dice, np.float64), np.asarray(bad, bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(s[~b], d[~b], s=18, color="C0", label="other cases")
    ax.scatter(s[b], d[b], s=18, color="C3", label="worst tertile of Dice")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="grey", ls="--", lw=1, label=f"review threshold {threshold:.3f}")
    ax.set_xlabel("reliability score (1 = reliable)")
    ax.set_ylabel("Dice against the truth")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
