"""Evaluation metrics of CLIPS-JAX: per-patient rows, text reports, the metrics table and its summary.

Modules:
  overlap   Dice, volumes (ml), TP/FP/FN volumes, voxel-wise precision and recall.
  surface   HD, HD95, ASSD, NSD, BJI on deepmind-style surfels (anisotropic spacing, exact crop).
  lesions   18-connected lesions, autoPET FPV/FNV, lesion matching (any overlap; Hungarian at IoU), Dmax.
  report    `case_metrics` (one row of metrics.csv), text report, CSV, `summarise`, Markdown summary.
  plots     box plots, Bland-Altman, PET MIPs with outlines (and an uncertainty panel), reliability diagrams
            (matplotlib, imported on demand only).
  reliability  per-patient reliability: ensemble / flip agreement, voxel uncertainty, score, review reasons;
            AUROC (DeLong), Youden threshold, Spearman (docs/reliability.md).
  calibration  reliability-diagram bins, expected calibration error, temperature scaling.

The library API used by the trainer and the experiments is re-exported here (numpy in, floats out, no I/O
except the explicit writers). Column definitions and empty-mask conventions: docs/metrics.md.
"""

from clips_jax.metrics.lesions import dmax_mm, label_lesions, lesion_metrics
from clips_jax.metrics.overlap import dice, overlap_volumes, volume_ml
from clips_jax.metrics.report import (
    COLUMNS,
    METRIC_KEYS,
    case_metrics,
    case_report_text,
    finite_mean,
    read_metrics_csv,
    summarise,
    summary_markdown,
    write_metrics_csv,
)
from clips_jax.metrics.surface import surface_metrics, surfel_area_table

__all__ = [
    "COLUMNS",
    "METRIC_KEYS",
    "case_metrics",
    "case_report_text",
    "dice",
    "dmax_mm",
    "finite_mean",
    "label_lesions",
    "lesion_metrics",
    "overlap_volumes",
    "read_metrics_csv",
    "summarise",
    "summary_markdown",
    "surface_metrics",
    "surfel_area_table",
    "volume_ml",
    "write_metrics_csv",
]
