"""Evaluation figures (matplotlib, Agg backend, PNG, written atomically).

* `boxplots`: Dice, NSD and TMTV error (predicted - true, ml) per experiment, side by side.
* `bland_altman`: TMTV agreement of one experiment (mean of predicted and true vs their difference, with the
  bias and the 95 % limits of agreement, bias +- 1.96 SD).
* `mip_figure`: coronal and sagittal PET maximum-intensity projections with the outlines of the
  ground-truth (green) and predicted (red) masks' projections; pixel aspect from the voxel spacing.

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

__all__ = ["boxplots", "bland_altman", "mip_figure"]


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
    suv: np.ndarray, truth: np.ndarray, pred: np.ndarray, spacing_mm, path: str | os.PathLike, title: str = ""
) -> Path:
    """Coronal and sagittal PET MIPs with ground-truth (green) and prediction (red) outlines.

    Args:
      suv: (z, y, x) SUV volume; truth, pred: (z, y, x) boolean masks on the same grid (truth None: no
        ground truth, the legend then names the prediction only).
      spacing_mm: (z, y, x) in mm, used for the pixel aspect ratio.
      path: target PNG. title: figure title (e.g. the case id).
    Axis z is drawn upwards (head at the top when z increases towards the head, as in RAS NIfTI).
    """
    sz, sy, sx = (float(s) for s in spacing_mm)
    suv = np.asarray(suv, dtype=np.float32)
    vmax = float(np.percentile(suv, 99.9)) if suv.size else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(9, 6))
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
    legend = "red: prediction" if truth is None else "green: truth, red: prediction"
    fig.suptitle(f"{title}  ({legend})")
    return _save(fig, path)
