"""What a curriculum did, in a few numbers and one figure (for the trainer's logs).

How it fits: the trainer calls `summarise_weights(w, case_table)` on the host every few steps (it is plain
NumPy, not traced) and logs the returned dict together with the step and sigma; `plot_curriculum` turns a
list of such logged rows into a PNG: sampling mass per difficulty decile over steps (stacked), with the
effective number of cases and the smoothing sigma underneath.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clips_jax.curricula.core import Array, CaseTable, oriented_difficulty, ranks_from_scores
from clips_jax.errors import DataError
from clips_jax.fileio import atomic_path

N_DECILES = 10


def summarise_weights(weights: Array, case_table: CaseTable, measure: str = "composite") -> dict[str, Any]:
    """Compact description of a sampling distribution over the cases.

    Args:
      weights: (N,) sampling distribution (any float dtype; need not be exactly normalised).
      case_table: the `CaseTable` the weights refer to.
      measure: difficulty column defining the deciles. Default "composite".
    Returns: dict with
      "decile_mass": list of 10 floats, the mass on each decile of the oriented difficulty (decile 0 =
        easiest 10 % of the cases with a defined measure, by rank);
      "undefined_mass": mass on cases whose measure is NaN (typically lesion-free cases);
      "negative_mass": mass on lesion-free cases;
      "n_eff": effective number of cases 1 / sum(w^2) (N for uniform, 1 for a single case);
      "n_support": number of cases with weight > 0.
    Raises: DataError when the length of `weights` differs from the table.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != case_table.n:
        raise DataError(f"weights have {w.shape[0]} entries but the case table has {case_table.n} cases")
    total = w.sum()
    w = w / total if total > 0 else np.full_like(w, 1.0 / max(w.shape[0], 1))
    scores = oriented_difficulty(case_table, measure)
    defined = np.isfinite(scores)
    n_def = int(defined.sum())
    ranks = ranks_from_scores(scores, defined)
    decile = np.where(defined, (ranks.astype(np.int64) * N_DECILES) // max(n_def, 1), -1)
    mass = [float(w[decile == d].sum()) for d in range(N_DECILES)]
    return {
        "decile_mass": mass,
        "undefined_mass": float(w[~defined].sum()),
        "negative_mass": float(w[~case_table.has_lesion].sum()),
        "n_eff": float(1.0 / np.sum(w * w)),
        "n_support": int(np.sum(w > 0)),
    }


def plot_curriculum(log_rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draw logged curriculum summaries over steps into a PNG (written atomically).

    Args:
      log_rows: rows with "step" (int) and "decile_mass" (10 floats, from `summarise_weights`); optional
        "undefined_mass", "n_eff" and "sigma" (float). Rows are sorted by step.
      path: output PNG path (its folder must exist).
    Raises: DataError when there are no rows or a row lacks "step"/"decile_mass".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_rows:
        raise DataError(f"no curriculum log rows to plot into {os.fspath(path)}")
    for row in log_rows:
        if "step" not in row or "decile_mass" not in row:
            raise DataError(f"curriculum log row without 'step'/'decile_mass': {dict(row)!r}")
    rows = sorted(log_rows, key=lambda r: r["step"])
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    mass = np.array([list(r["decile_mass"]) + [r.get("undefined_mass", 0.0)] for r in rows], dtype=np.float64)
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    colours = [plt.cm.viridis(i / (N_DECILES - 1)) for i in range(N_DECILES)] + [(0.7, 0.7, 0.7, 1.0)]
    labels = [f"decile {i + 1}" for i in range(N_DECILES)] + ["undefined (negatives)"]
    ax0.stackplot(steps, mass.T, colors=colours, labels=labels, step="post")
    ax0.set_ylabel("sampling mass")
    ax0.set_ylim(0, 1)
    ax0.set_title("Curriculum: sampling mass by difficulty decile (1 = easiest)")
    ax0.legend(fontsize=6, ncol=2, loc="upper right")
    if any("n_eff" in r for r in rows):
        ax1.plot(steps, [r.get("n_eff", np.nan) for r in rows], color="C0", label="effective #cases")
        ax1.set_ylabel("effective #cases")
    if any("sigma" in r for r in rows):
        ax2 = ax1.twinx()
        ax2.plot(steps, [r.get("sigma", np.nan) for r in rows], color="C3", label="CBS sigma")
        ax2.set_ylabel("sigma (voxels)", color="C3")
    ax1.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
