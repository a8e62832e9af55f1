"""World-space resampling between voxel grids, with SimpleITK's outside-value semantics.

Used to bring a CT onto the PET grid at load time and to build TMTV-Net's stage-A 6 mm grid
(`resample_case`). The mapping is purely geometric: for each target voxel centre we find the world point
(target affine), then the continuous source index (inverse source affine), and interpolate there with
`scipy.ndimage.affine_transform` (no anti-aliasing, as in the original).

Outside rule (emulates SimpleITK's `ResampleImageFilter` with a linear/nearest interpolator): a target point
whose continuous source index lies outside `[-0.5, n - 0.5]` on any axis receives `cval`; inside that band the
source is extended by edge clamping (scipy `mode='nearest'`), so the half-voxel border still interpolates
towards the edge value. A tolerance of 1e-6 voxel absorbs floating-point error of the composed affine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from clips_jax.data.case import Case
from clips_jax.data.geometry import Geometry
from clips_jax.errors import DataError

_TOL = 1e-6  # voxels


def index_transform(src: Geometry, dst: Geometry) -> np.ndarray:
    """The 4x4 matrix mapping a target (z, y, x) voxel index to the continuous source (z, y, x) index.

    Composition dst-index -> world (dst.affine) -> src-index (inverse src.affine), with both affines
    re-ordered from nibabel's (x, y, z) index convention to our (z, y, x) array order.
    """
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0  # (z,y,x,1) <-> (x,y,z,1); its own inverse
    m_xyz = np.linalg.solve(src.affine_array, dst.affine_array)
    return perm @ m_xyz @ perm


def resample_to_grid(
    array: np.ndarray, src: Geometry, dst: Geometry, *, order: int = 1, cval: float = 0.0, dtype=np.float32
) -> np.ndarray:
    """Resample a (z, y, x) volume from grid `src` onto grid `dst` in world space.

    Args:
      array: (z, y, x) volume with shape `src.shape` (any numeric or bool dtype).
      src, dst: source and target grids (affines map voxel (x, y, z) -> RAS mm).
      order: 1 = trilinear (images), 0 = nearest neighbour (labels). Higher spline orders are allowed
        (scipy prefilters then) but unused by the project.
      cval: value of target voxels whose source position lies outside the source volume, i.e. whose
        continuous source index is outside [-0.5, n-0.5] on any axis (e.g. -1024 for CT, 0 for SUV/labels).
      dtype: output dtype; interpolation runs in float32 for float/int inputs (float64 for float64 input).
    Returns:
      (z, y, x) array of shape `dst.shape` and `dtype`. If both grids are the same (`same_grid`) the
      result is simply `array` cast to `dtype` (a copy).
    Raises:
      DataError if `array.shape != src.shape`.
    """
    array = np.asarray(array)
    if tuple(array.shape) != tuple(src.shape):
        raise DataError(f"resample: array shape {array.shape} does not match its source grid {src.shape}")
    if src.same_grid(dst, atol_mm=1e-6):
        return array.astype(dtype, copy=True)
    work = np.float64 if array.dtype == np.float64 else np.float32
    data = array.astype(work, copy=False)
    m = index_transform(src, dst)
    lin, off = m[:3, :3], m[:3, 3]
    diagonal = np.allclose(lin - np.diag(np.diag(lin)), 0.0, atol=1e-12)
    out = ndimage.affine_transform(
        data,
        np.diag(lin) if diagonal else lin,
        offset=off,
        output_shape=tuple(dst.shape),
        order=order,
        mode="nearest",
        prefilter=order > 1,
        output=work,
    )
    inside = _inside_mask(lin, off, tuple(dst.shape), tuple(src.shape))
    if inside is not True:
        out[~inside] = cval
    return out.astype(dtype, copy=False)


def _inside_mask(lin: np.ndarray, off: np.ndarray, dst_shape, src_shape):
    """Boolean (z, y, x) mask of target voxels whose source index is within [-0.5, n-0.5] on every axis.

    Returns True (not an array) when every target voxel is inside. Separable when `lin` is diagonal;
    otherwise evaluated axis by axis with broadcasting (one float64 volume at a time).
    """
    grids = [np.arange(n, dtype=np.float64) for n in dst_shape]
    mask = None
    for a in range(3):
        lo, hi = -0.5 - _TOL, src_shape[a] - 0.5 + _TOL
        coord = off[a]
        for b in range(3):
            if lin[a, b] != 0.0:
                shp = [1, 1, 1]
                shp[b] = dst_shape[b]
                coord = coord + lin[a, b] * grids[b].reshape(shp)
        ok = (coord >= lo) & (coord <= hi)
        if np.all(ok):
            continue
        ok = np.broadcast_to(ok, dst_shape)
        mask = ok.copy() if mask is None else (mask & ok)
    return True if mask is None else mask


def resample_case(case: Case, spacing_mm=6.0) -> Case:
    """The case on `case.geometry.resampled(spacing_mm)` (TMTV-Net's stage-A grid rule).

    Args:
      case: a Case on its PET grid.
      spacing_mm: new voxel size in mm, one number or (z, y, x).
    Returns:
      a new Case: CT trilinear with outside value -1024 HU, SUV trilinear with outside 0, SEG nearest
      neighbour (stays uint8 {0, 1}); same case_id, meta copied. No anti-aliasing before down-sampling.
    """
    dst = case.geometry.resampled(spacing_mm)
    ct = resample_to_grid(case.ct, case.geometry, dst, order=1, cval=-1024.0)
    suv = resample_to_grid(case.suv, case.geometry, dst, order=1, cval=0.0)
    seg = None
    if case.seg is not None:
        seg = resample_to_grid(case.seg, case.geometry, dst, order=0, cval=0, dtype=np.uint8)
    return Case(case.case_id, ct, suv, seg, dst, dict(case.meta))
