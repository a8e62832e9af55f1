"""Training-time augmentations of TMTV-Net, as pure NumPy/SciPy functions (original: the deleted `main/train.py`
with `main/src/src_transforms.py` and `transforms_augmentation_affine.py` of qurit-frizi/TMTV-Net).

Every function takes the arrays and an explicit `np.random.Generator` (no hidden RNG) and returns new
arrays; the caller (`clips_jax.data.pipeline`) derives the generator from (seed, stage, element index), so
an augmented patch is a deterministic function of its position in the stream.

SUV intensity augmentations (batchgenerators-style, applied to the raw SUV patch, each with p = 0.1 in
`augment_suv`; CT gets no intensity augmentation):
  `gaussian_blur`             sigma ~ U(0.5, 1.0) voxels
  `multiplicative_brightness` x ~ U(0.75, 1.25)
  `contrast`                  (x - mean) * U(0.75, 1.25) + mean, clipped back to the input range
  `simulate_low_resolution`   zoom ~ U(0.5, 1): nearest down-sampling, cubic up-sampling
  `gamma`                     min-max normalise, ** U(0.7, 1.5), back; mean/std retained; `invert=True`
                              works on -x (the "inverted" variant)
Spatial augmentations (jointly for image and label):
  `random_flips`              each axis with p = 0.5
  `affine_matrix`             rotation U(-0.3, 0.3) rad about each axis (x first, then y, then z) and an
                              isotropic scale U(0.9, 1.1), as a voxel-index sampling matrix (physical
                              rotation: the voxel spacing is taken into account). The pipeline folds it into
                              the crop (`pipeline.crop_patch`), so rotated patches sample real image data
                              instead of zero padding.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def gaussian_blur(x: np.ndarray, rng: np.random.Generator, sigma_range=(0.5, 1.0)) -> np.ndarray:
    """Gaussian smoothing with sigma ~ U(sigma_range) voxels (same on every axis). float32 in, float32 out."""
    s = rng.uniform(*sigma_range)
    return ndi.gaussian_filter(np.asarray(x, np.float32), s, truncate=3.0)


def multiplicative_brightness(x: np.ndarray, rng: np.random.Generator, range_=(0.75, 1.25)) -> np.ndarray:
    """`x * m`, m ~ U(range_)."""
    return (np.asarray(x, np.float32) * np.float32(rng.uniform(*range_))).astype(np.float32)


def contrast(x: np.ndarray, rng: np.random.Generator, range_=(0.75, 1.25)) -> np.ndarray:
    """Contrast change about the mean: `(x - mean) * f + mean`, f ~ U(range_), clipped to [min(x), max(x)]."""
    x = np.asarray(x, np.float32)
    f = np.float32(rng.uniform(*range_))
    m = np.float32(x.mean(dtype=np.float64))
    return np.clip((x - m) * f + m, x.min(), x.max()).astype(np.float32)


def simulate_low_resolution(x: np.ndarray, rng: np.random.Generator, zoom_range=(0.5, 1.0)) -> np.ndarray:
    """Down-sample by a factor z ~ U(zoom_range) (nearest), then up-sample back to the shape (cubic)."""
    x = np.asarray(x, np.float32)
    z = rng.uniform(*zoom_range)
    small_shape = tuple(max(1, int(round(n * z))) for n in x.shape)
    small = ndi.zoom(x, [a / b for a, b in zip(small_shape, x.shape)], order=0, grid_mode=True, mode="nearest")
    up = ndi.zoom(small, [a / b for a, b in zip(x.shape, small.shape)], order=3, grid_mode=True, mode="nearest")
    if up.shape != x.shape:  # zoom rounds sizes; pad/crop the last voxel if needed
        out = np.empty_like(x)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(up.shape, x.shape))
        out[...] = np.pad(up[sl], [(0, n - s.stop) for n, s in zip(x.shape, sl)], mode="edge")
        up = out
    return up.astype(np.float32)


def gamma(
    x: np.ndarray, rng: np.random.Generator, gamma_range=(0.7, 1.5), invert: bool = False, retain_stats: bool = True
) -> np.ndarray:
    """Gamma transform of the min-max normalised image (batchgenerators `augment_gamma`).

    `invert` applies it to `-x` and negates back. With `retain_stats` the output gets the input's mean and
    standard deviation back. A constant image is returned unchanged.
    """
    x = np.asarray(x, np.float32)
    v = -x if invert else x
    g = rng.uniform(*gamma_range)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-7:
        return x.copy()
    m, sd = v.mean(dtype=np.float64), v.std(dtype=np.float64)
    out = ((v - lo) / (hi - lo)) ** g * (hi - lo) + lo
    if retain_stats:
        sd2 = out.std(dtype=np.float64)
        out = (out - out.mean(dtype=np.float64)) / max(sd2, 1e-7) * sd + m
    out = -out if invert else out
    return out.astype(np.float32)


def augment_suv(suv: np.ndarray, rng: np.random.Generator, p: float = 0.1) -> np.ndarray:
    """TMTV-Net's SUV intensity augmentation chain: each step applied independently with probability `p`.

    Order: blur, brightness, contrast, low resolution, inverted gamma, gamma. Always draws the same number
    of random numbers per step decision (one uniform), so a step's parameters depend only on whether the
    previous steps fired. Returns a new float32 array (z, y, x); SUV is clipped at 0 afterwards.
    """
    x = np.asarray(suv, np.float32)
    steps = (
        gaussian_blur,
        multiplicative_brightness,
        contrast,
        simulate_low_resolution,
        lambda a, r: gamma(a, r, invert=True),
        gamma,
    )
    changed = False
    for f in steps:
        if rng.random() < p:
            x = f(x, rng)
            changed = True
    return np.maximum(x, 0.0) if changed else x


def random_flips(
    arrays: list[np.ndarray], rng: np.random.Generator, p: float = 0.5, axes=(0, 1, 2)
) -> list[np.ndarray]:
    """Flip every array along each of `axes` with probability `p` (same decision for all arrays).

    Arrays share their leading spatial axes (z, y, x); returns new contiguous arrays.
    """
    flip = [ax for ax in axes if rng.random() < p]
    if not flip:
        return list(arrays)
    return [np.ascontiguousarray(np.flip(a, axis=flip)) for a in arrays]


def rotation_matrix(angles_xyz) -> np.ndarray:
    """3x3 rotation in (z, y, x) axis order: R = Rz @ Ry @ Rx (rotate about x first), angles in radians."""
    ax, ay, az = angles_xyz
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    # matrices act on (z, y, x) column vectors
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1.0]])  # about x: mixes z, y
    ry = np.array([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])  # about y: mixes z, x
    rz = np.array([[1.0, 0, 0], [0, cz, -sz], [0, sz, cz]])  # about z: mixes y, x
    return rz @ ry @ rx


def affine_matrix(
    rng: np.random.Generator, spacing_mm=(1.0, 1.0, 1.0), max_angle: float = 0.3, scale_range=(0.9, 1.1)
) -> np.ndarray:
    """Random rotation + isotropic scale as a 3x3 voxel-index SAMPLING matrix M (output -> input offset).

    An output voxel at offset `d` (voxels, (z, y, x)) from the patch centre reads the input at
    `M @ d` from the source centre. M = S^-1 R S / s with S = diag(spacing_mm), so the rotation is a
    physical one on anisotropic grids; s ~ U(scale_range) > 1 magnifies (zoom in).
    Draws 3 angles then the scale from `rng`.
    """
    angles = rng.uniform(-max_angle, max_angle, size=3)
    s = rng.uniform(*scale_range)
    sp = np.asarray(spacing_mm, np.float64)
    return np.diag(1.0 / sp) @ rotation_matrix(angles) @ np.diag(sp) / s
