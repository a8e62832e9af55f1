"""`Case`: one PET/CT study in memory, the unit every later stage works on.

A Case holds the CT (in HU) and the SUVbw image on the *same* voxel grid (the PET grid, or a resampled grid
such as TMTV-Net's 6 mm grid), an optional binary lesion mask, the grid's `Geometry`, and free-form metadata
(patient id, injected dose, series UIDs, ...). Loaders (`study.load_nifti_study`, `dicom.read_dicom_study`)
produce Cases; `resample.resample_case` and `channels.case_channels` consume them. Nothing downstream re-reads
a file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from clips_jax.data.geometry import Geometry
from clips_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Case:
    """A PET/CT study on one voxel grid.

    Attributes:
      case_id: identifier used in messages (the folder's name); batches name outputs by `study.study_id`.
      ct: (z, y, x) float32 CT in Hounsfield units, on `geometry`.
      suv: (z, y, x) float32 body-weight SUV, on `geometry`.
      seg: (z, y, x) uint8 lesion mask with values {0, 1}, or None when no ground truth is known.
      geometry: the voxel grid of all three arrays (normally the PET grid).
      meta: JSON-friendly metadata (patient info, dose, series UIDs, SUV factor, ...) when known.

    `__post_init__` converts `ct`/`suv` to float32 and `seg` to uint8 (no copy when already so) and raises
    DataError naming `case_id` if an array is not 3-D with `geometry.shape`, or if `seg` holds values other
    than 0 and 1.
    """

    case_id: str
    ct: np.ndarray
    suv: np.ndarray
    seg: np.ndarray | None
    geometry: Geometry
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        shape = tuple(self.geometry.shape)
        for name in ("ct", "suv", "seg"):
            arr = getattr(self, name)
            if arr is None:
                if name != "seg":
                    raise DataError(f"case {self.case_id}: {name} is missing")
                continue
            arr = np.asarray(arr)
            if tuple(arr.shape) != shape:
                raise DataError(
                    f"case {self.case_id}: {name} has shape {tuple(arr.shape)} but the grid is "
                    f"{shape} (z, y, x); resample it onto the PET grid first"
                )
            if name == "seg":
                if arr.dtype == bool:
                    arr = arr.astype(np.uint8)
                bad = arr.size and (
                    arr.min() < 0
                    or arr.max() > 1
                    or (np.issubdtype(arr.dtype, np.floating) and not np.all((arr == 0) | (arr == 1)))
                )
                if bad:
                    raise DataError(
                        f"case {self.case_id}: seg must hold only 0 and 1, found values in "
                        f"[{arr.min()}, {arr.max()}]; binarise the mask first"
                    )
                arr = arr.astype(np.uint8, copy=False)
            else:
                arr = arr.astype(np.float32, copy=False)
            object.__setattr__(self, name, arr)

    @property
    def has_seg(self) -> bool:
        """True if a ground-truth mask is attached."""
        return self.seg is not None

    def replace(self, **changes) -> "Case":
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)
