"""NIfTI read/write at the I/O boundary: nibabel's `(x, y, z)` arrays become our `(z, y, x)` arrays once, here.

`load_nifti` validates what a user can get wrong (unreadable or truncated file, not 3-D, bad spacing,
NaN/inf voxels) and raises `DataError` naming the file. `save_nifti` writes atomically.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from clips_jax.data.geometry import Geometry
from clips_jax.errors import DataError
from clips_jax.fileio import atomic_path


def load_nifti(path: str | os.PathLike, dtype=np.float32, *, check_finite: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D NIfTI image.

    Args:
      path: `.nii` or `.nii.gz` file.
      dtype: output dtype (float32 by default; use np.uint8/np.int16 for masks).
      check_finite: raise if any voxel is NaN or infinite (only checked for floating dtypes).
    Returns:
      (array of shape (z, y, x) and `dtype`, its Geometry). A trailing singleton 4th axis is dropped.
    Raises:
      DataError naming the file: missing, unreadable/truncated, not 3-D, bad spacing, non-finite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise DataError(
            f"{path}: cannot read NIfTI ({type(e).__name__}: {e}); the file is damaged or truncated, export it again"
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D image, got shape {data.shape}")
    geom = Geometry(data.shape[::-1], img.affine).validate(str(path))
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(dtype, copy=False)
    if check_finite and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        n = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(f"{path}: {n} voxels are NaN or infinite; repair or re-export the image")
    return arr, geom


def save_nifti(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, dtype=None) -> Path:
    """Write a `(z, y, x)` array with `geometry` as NIfTI, atomically (temp file + rename).

    Args:
      path: target `.nii.gz` (or `.nii`) path; parent directories are created.
      array: (z, y, x) array whose shape equals `geometry.shape`.
      dtype: on-disk dtype (default: the array's).
    """
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    if tuple(array.shape) != geometry.shape:
        raise DataError(f"{path}: array shape {array.shape} does not match its geometry {geometry.shape}")
    img = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), geometry.affine_array)
    img.header.set_xyzt_units("mm")
    img.set_qform(geometry.affine_array, code=1)
    img.set_sform(geometry.affine_array, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
