"""The device data path: the 6 mm case store on the accelerator and a pure JAX `(key, weights, store) -> batch`.

Why: the host pipeline (`clips_jax.data.pipeline`, NumPy/SciPy in grain workers) cuts and augments 4-11
training crops of 128 x 96 x 96 voxels per second on 2 CPU cores (BENCHMARKS.md), far too slow to feed a GPU
training step (target <= 10 ms per batch). The 6 mm store
is small (a 163 x 136 x 136 case is 12 MB per float32 array), so it can live on the accelerator, and every
crop of a batch becomes one compiled function of a PRNG key and the curriculum weights:

    dstore = device_store_from(store, store.split_indices("train"))       # once, on the device
    batch = sample_batch(key, weights, dstore, batch_size=2, patch_shape=(128, 96, 96),
                         p_foreground=0.3, augment=True)                   # inside the jitted train step

`sample_batch` does what `pipeline.PatchSampler` does, with the same distributions (not the same random
numbers: the host uses NumPy's Philox, this path `jax.random`):

1. Element b of the batch uses `jax.random.fold_in(key, first_element + b)` only, so a data-parallel caller
   that passes its global element offset gets exactly the slice of the global batch a single device would
   have produced (the analogue of the host pipeline's multi-host slicing).
2. Case: inverse CDF of the weights at a uniform draw, as the host's `pipeline.case_for_element`; a zero
   weight is never drawn. Weights are a traced argument: changing them never recompiles.
3. Crop start (`pipeline._start_uniform` / `pipeline._start_on_voxel`): with probability `p_foreground` the
   patch is centred on a uniformly drawn lesion voxel of the case (clamped to fit; a lesion-free case falls
   back to the uniform crop); otherwise, with probability `p_hot_negative`, on a uniformly drawn hard-negative
   voxel (SUV >= `hot_suv` outside the lesions, `pipeline.hot_negative_voxels`; labeled cases only; none ->
   uniform); otherwise uniform over the positions where the patch fits (an axis shorter than the patch: centre
   uniform over [0, size]).
4. Augmentation (as `pipeline.PatchSampler` / `clips_jax.data.augment`): with p = `p_affine` a rotation
   U(-0.3, 0.3) rad about x, then y, then z and an isotropic scale U(0.9, 1.1), physical (voxel spacing taken
   into account, `augment.affine_matrix`), folded into the crop: trilinear for the images, nearest for the
   label, the rotated patch samples the real volume around it; outside the volume -1024 HU / SUV 0 / label 0 /
   extras 0. Each axis flipped with p = `p_flip`. SUV intensity augmentations, each with p = `p_intensity`,
   in `augment.augment_suv`'s order: Gaussian blur sigma U(0.5, 1) voxels, brightness x U(0.75, 1.25),
   contrast U(0.75, 1.25) about the mean clipped to the input range, low-resolution simulation zoom U(0.5, 1),
   inverted gamma U(0.7, 1.5), gamma U(0.7, 1.5) (both retaining mean and std), then SUV >= 0 if any fired.
   Then the 5 channels (`channels.make_channels_jnp`) and the extra channels (not windowed, not
   intensity-augmented).

Deviations from the host pipeline, all in the augmentation. With `augment=False` the raw crop (HU, SUV, label,
extras) is bit-identical to `pipeline.crop_patch` for the same start, and the channels are
`channels.make_channels_jnp` of it (XLA:CPU turns the window's division into a multiplication by the
reciprocal, so they can differ from the NumPy `make_channels` by 1 ulp, <= 6e-8).
* Low-resolution simulation up-samples LINEARLY (the host: cubic spline, `scipy.ndimage.zoom(order=3)`);
  the nearest down-sampling is the same (`grid_mode=True` pixel-centre mapping).
* Flips are applied to the sampling grid (reversed index vectors; a negated column of the affine matrix)
  instead of to the finished patch; the intensity augmentations are flip-symmetric (blur with the
  symmetric 'reflect' boundary, global statistics), so this changes nothing except tie-breaking of the
  low-resolution nearest down-sampling.
* Coordinates are float32 (host: float64): affine crops agree with `pipeline.crop_patch(..., matrix)` to
  ~1e-3 HU, and a nearest-neighbour label can differ where a coordinate lies within ~1e-5 voxel of a half
  voxel.
* Means and standard deviations of the intensity augmentations are float32 sums (host: float64).
* Random numbers: the same distributions, not the same stream (tests/test_device_data.py compares both
  samplers' case, crop-centre and augmentation statistics). Across differently compiled programs (another
  batch size, a shard_map over devices) the draws and crops are identical and the intensity-augmented SUV
  may differ by float rounding (~1e-7).

Layout of a `DeviceStore` (built once by `device_store_from`): every case padded to one common shape, the
maximum over the cases, plus a border of 1 fill voxel before and 2 after each axis (so trilinear corners of
clamped coordinates stay inside the array); ct, suv and the extra channels are packed in one array
`images` (N, Z + 3, Y + 3, X + 3, 2 + E) so that one gather fetches all linear channels of a voxel. Memory:
`device_store_bytes` estimates it from the manifest before building.

Per-element branches (affine or plain crop, each intensity augmentation) run inside `lax.map` over the batch
with `lax.cond`, so a crop pays only for the augmentations it draws. Measured on 2 (shared) CPU cores for
128 x 96 x 96 (each stage jitted alone, ms per element): plain crop 1-4, affine (trilinear) crop 11-18, blur
10-16, low-resolution 17-22, gamma 7-11, contrast ~1, the 5 channels 5-11; `vmap` (which turns every
`lax.cond` into a select that computes both sides) costs the affine crop and all six intensity augmentations
for every element, and batches the gathers: 13x the CPU time of `lax.map` + `lax.cond` (B = 2, default
probabilities). On a CPU backend a call that returns a batch also pays page faults for its fresh ~90 MB of
output and temporaries (about as much as the compute); inside a compiled multi-step loop the buffers are reused.
`benchmarks/data_pipeline.py --compare` measures the throughput against the host pipeline.

jax + numpy only (plus the other `clips_jax.data` modules); no trainer, inference or curriculum imports.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clips_jax.data.channels import make_channels_jnp
from clips_jax.data.pipeline import (
    DEFAULT_PATCH_SHAPE,
    PAD_HU,
    PAD_SUV,
    _check_extra,
    _check_weights,
    hot_negative_voxels,
)
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError, DataError

BORDER_LO, BORDER_HI = 1, 2
"""Fill voxels before / after each axis of the padded case arrays (interpolation guard)."""

MAX_ANGLE = 0.3
"""Rotation angles ~ U(-MAX_ANGLE, MAX_ANGLE) rad per axis (`augment.affine_matrix`)."""
SCALE_RANGE = (0.9, 1.1)
"""Isotropic scale ~ U(SCALE_RANGE) (`augment.affine_matrix`)."""

INTENSITY_STEPS = (
    "gaussian_blur",
    "multiplicative_brightness",
    "contrast",
    "simulate_low_resolution",
    "gamma_inverted",
    "gamma",
)
"""The SUV intensity augmentations in `augment.augment_suv`'s order (names of the `augment` functions)."""
INTENSITY_RANGES = ((0.5, 1.0), (0.75, 1.25), (0.75, 1.25), (0.5, 1.0), (0.7, 1.5), (0.7, 1.5))
"""Uniform parameter range of each step: blur sigma (voxels), brightness factor, contrast factor,
low-resolution zoom, gamma, gamma (the defaults of the `augment` functions)."""

_IMAGE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


class DeviceStore(NamedTuple):
    """The training cases of a `CaseStore` as device arrays (a pytree: pass it to jitted functions).

    N cases, common padded grid (Z, Y, X) = max shape over the cases, E extra channels.

    Fields:
      images: (N, Z + 3, Y + 3, X + 3, 2 + E) `dtype` (float32 default; bfloat16 / float16 halve the memory):
        channel 0 CT in HU, 1 SUVbw, 2.. the extra channels in `extra_channels` order. Case voxel (z, y, x)
        is at [n, z + 1, y + 1, x + 1]; everything outside the case is the fill: -1024 HU, SUV 0, extras 0.
        bfloat16 keeps 8 significant bits (HU 1000 +- 4, SUV 10 +- 0.04), float16 11 bits.
      seg: (N, Z + 3, Y + 3, X + 3) uint8 lesion mask, same layout, 0 outside.
      shape: (N, 3) int32 true (z, y, x) shape of each case (voxels).
      spacing: (N, 3) float32 voxel spacing (z, y, x) in mm.
      labeled: (N,) bool: the case has a ground-truth mask.
      lesion_voxels: (N, K) int32 flat C-order indices (in the case's true shape) of its lesion voxels;
        entries >= lesion_count[n] are padding (0).
      lesion_count: (N,) int32.
      hot_voxels: (N, H) int32 flat indices of the hard-negative voxels (SUV >= hot_suv, label 0;
        `pipeline.hot_negative_voxels`); empty for unlabeled cases (never centred on hard negatives).
      hot_count: (N,) int32.
      store_index: (N,) int32 index of each case in the `CaseStore` (position n of the DeviceStore is the
        "case_index" that `sample_batch` returns).
    """

    images: jax.Array
    seg: jax.Array
    shape: jax.Array
    spacing: jax.Array
    labeled: jax.Array
    lesion_voxels: jax.Array
    lesion_count: jax.Array
    hot_voxels: jax.Array
    hot_count: jax.Array
    store_index: jax.Array

    @property
    def num_cases(self) -> int:
        return int(self.images.shape[0])

    @property
    def max_shape(self) -> tuple[int, int, int]:
        """Common (z, y, x) grid the cases are padded to (without the fill border)."""
        return tuple(int(s) - BORDER_LO - BORDER_HI for s in self.images.shape[1:4])

    @property
    def num_extra(self) -> int:
        return int(self.images.shape[-1]) - 2

    @property
    def nbytes(self) -> int:
        """Device bytes of all arrays (per device holding a replica)."""
        return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self))

    def case_volume(self, n: int, channel: int = 0) -> np.ndarray:
        """Host copy of case n's unpadded (z, y, x) volume of `channel` (0 ct, 1 suv, 2.. extras; -1 seg)."""
        z, y, x = (int(v) for v in np.asarray(self.shape[n]))
        sl = (n, slice(BORDER_LO, BORDER_LO + z), slice(BORDER_LO, BORDER_LO + y), slice(BORDER_LO, BORDER_LO + x))
        return np.asarray(self.seg[sl] if channel == -1 else self.images[sl + (channel,)])


class CropParams(NamedTuple):
    """The random draws of a batch (leading axis B), what `render_batch` turns into patches.

    case (B,) int32 position in the DeviceStore; start (B, 3) int32 (z, y, x) first voxel of the patch (may be
    negative / beyond the case); mode (B,) int32 0 uniform, 1 lesion-centred, 2 hard-negative-centred;
    voxel (B, 3) int32 the centre voxel drawn for modes 1 and 2 (-1 for uniform crops); affine (B,) bool;
    angles (B, 3) float32 rad (about x, y, z; drawn even when `affine` is false); scale (B,) float32;
    matrix (B, 3, 3) float32 voxel sampling matrix (`augment.affine_matrix`; identity when `affine` is false),
    output offset d from the patch centre reads the case at centre + matrix @ d; flips (B, 3) bool per axis;
    intensity (B, 6) bool which of `INTENSITY_STEPS` fire; intensity_param (B, 6) float32 their parameters.
    """

    case: jax.Array
    start: jax.Array
    mode: jax.Array
    voxel: jax.Array
    affine: jax.Array
    angles: jax.Array
    scale: jax.Array
    matrix: jax.Array
    flips: jax.Array
    intensity: jax.Array
    intensity_param: jax.Array


# ---- building the store ------------------------------------------------------------------------------------


def _case_indices(store: CaseStore, case_indices) -> np.ndarray:
    idx = np.arange(len(store)) if case_indices is None else np.asarray(case_indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= len(store):
        raise ConfigError(f"case_indices must be non-empty indices into the store ({len(store)} cases)")
    return idx


def _image_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _IMAGE_DTYPES:
        raise ConfigError(f"device store dtype {dtype}: use float32, bfloat16 or float16")
    return dt


def device_store_bytes(
    store: CaseStore,
    case_indices=None,
    *,
    dtype=jnp.float32,
    extra_channels: Sequence[str] = (),
    hot_fraction: float = 0.05,
) -> int:
    """Estimated device bytes of `device_store_from(store, case_indices, ...)`, without loading any volume.

    Exact for the images, masks, lesion lists and metadata (shapes from the manifest, lesion counts from the
    `fg.npy` headers); the hard-negative lists depend on the SUV, so they are estimated as `hot_fraction` of
    the largest case's voxels for every labeled case (4 bytes each; phantoms have ~2-4 % of their voxels at
    SUV >= 2.5 outside the lesions). Compare with `DeviceStore.nbytes` after building.
    """
    idx = _case_indices(store, case_indices)
    c = 2 + len(tuple((extra_channels,) if isinstance(extra_channels, str) else extra_channels))
    shapes = np.array([store.geometry(int(i)).shape for i in idx], np.int64)
    padded = int(np.prod(shapes.max(0) + BORDER_LO + BORDER_HI))
    n = len(idx)
    k = max(1, max(int(np.load(store.case_dir(int(i)) / "fg.npy", mmap_mode="r").shape[0]) for i in idx))
    h = max(1, int(np.ceil(hot_fraction * shapes.prod(1).max())) if store.has_seg[idx].any() else 1)
    return int(n * padded * (c * _image_dtype(dtype).itemsize + 1) + n * 4 * (k + h) + n * (3 * 4 * 2 + 1 + 3 * 4))


def _placement(device):
    if device is None or isinstance(device, jax.sharding.Sharding):
        return device
    return jax.sharding.SingleDeviceSharding(device)


@functools.partial(jax.jit, donate_argnums=0)
def _set_case(arr, n, case):
    return lax.dynamic_update_index_in_dim(arr, case.astype(arr.dtype), n, 0)


def device_store_from(
    store: CaseStore,
    case_indices=None,
    *,
    hot_suv: float = 2.5,
    dtype=jnp.float32,
    extra_channels: Sequence[str] = (),
    device=None,
) -> DeviceStore:
    """Load the cases `case_indices` (default all; e.g. `store.split_indices("train")`) onto the device.

    Args:
      store: a prepared `CaseStore` (normally the 6 mm grid; see `device_store_bytes` for the memory).
      case_indices: store indices; position n of the result is case `case_indices[n]`.
      hot_suv: hard-negative threshold in SUV (g/ml), as `pipeline.make_train_iterator`'s `hot_suv`.
      dtype: storage dtype of ct / suv / extras: float32, bfloat16 or float16 (see `DeviceStore`); crops are
        computed in float32 either way.
      extra_channels: optional per-case arrays (e.g. `("stage_a",)`), ConfigError if a case lacks one.
      device: a `jax.Device` or a `jax.sharding.Sharding` (e.g. replicated over a mesh); default device if None.
    Returns:
      `DeviceStore`. Built one case at a time (the host holds one padded case; the device arrays are updated
      in place), so host memory stays at one case.
    Raises:
      ConfigError for bad indices, dtype, hot_suv or a missing extra array (naming the cases and the command
      that makes it); DataError if a case's arrays do not match its manifest grid.
    """
    idx = _case_indices(store, case_indices)
    dt = _image_dtype(dtype)
    if not (np.isfinite(hot_suv) and hot_suv >= 0):
        raise ConfigError(f"hot_suv={hot_suv}: need a finite SUV >= 0 (g/ml)")
    extra = _check_extra(store, extra_channels, idx)
    shapes = np.array([store.geometry(int(i)).shape for i in idx], np.int64)
    full = tuple(int(s) for s in shapes.max(0) + BORDER_LO + BORDER_HI)
    n_cases, c = len(idx), 2 + len(extra)
    labeled = store.has_seg[idx]
    fill = np.array([PAD_HU, PAD_SUV] + [0.0] * len(extra), np.float32).astype(dt)
    place = _placement(device)

    def alloc(shape, value, dtype_):
        f = jax.jit(
            lambda: jnp.broadcast_to(jnp.asarray(value, dtype_), shape),
            **({} if place is None else {"out_shardings": place}),
        )
        return f()

    put = (lambda x: jax.device_put(x, place)) if place is not None else jax.device_put
    images = alloc((n_cases, *full, c), fill, dt)
    seg = alloc((n_cases, *full), np.uint8(0), np.uint8)
    lesions, hots, spacing = [], [], []
    for n, i in enumerate(idx):
        i = int(i)
        a = store.case_arrays(i, extra=extra)
        shp = tuple(a["ct"].shape)
        if shp != tuple(shapes[n]):
            raise DataError(
                f"case {store.ids[i]}: arrays {shp} differ from the manifest grid {tuple(shapes[n])}; run prepare again"
            )
        inner = tuple(slice(BORDER_LO, BORDER_LO + s) for s in shp)
        buf = np.empty(full + (c,), dt)
        buf[...] = fill
        for ch, name in enumerate(("ct", "suv", *extra)):
            buf[inner + (ch,)] = np.asarray(a[name]).astype(dt)
        sbuf = np.zeros(full, np.uint8)
        seg_arr = np.asarray(a["seg"])
        sbuf[inner] = seg_arr
        images = _set_case(images, np.int32(n), put(buf))
        seg = _set_case(seg, np.int32(n), put(sbuf))
        fg = store.foreground(i)
        lesions.append(np.ravel_multi_index(tuple(fg.T), shp).astype(np.int32) if len(fg) else np.zeros(0, np.int32))
        hots.append(
            hot_negative_voxels(np.asarray(a["suv"], np.float32), seg_arr, hot_suv).astype(np.int32)
            if labeled[n]
            else np.zeros(0, np.int32)
        )
        spacing.append(store.geometry(i).spacing_mm)

    def padded(lists):
        out = np.zeros((n_cases, max(1, max(len(v) for v in lists))), np.int32)
        for n, v in enumerate(lists):
            out[n, : len(v)] = v
        return out, np.array([len(v) for v in lists], np.int32)

    les, les_n = padded(lesions)
    hot, hot_n = padded(hots)
    return DeviceStore(
        images=images,
        seg=seg,
        shape=put(shapes.astype(np.int32)),
        spacing=put(np.asarray(spacing, np.float32)),
        labeled=put(labeled.astype(bool)),
        lesion_voxels=put(les),
        lesion_count=put(les_n),
        hot_voxels=put(hot),
        hot_count=put(hot_n),
        store_index=put(idx.astype(np.int32)),
    )


# ---- random draws ------------------------------------------------------------------------------------------


def rotation_matrix_jnp(angles_xyz):
    """jnp twin of `augment.rotation_matrix`: (3, 3) R = Rz @ Ry @ Rx in (z, y, x) order, angles (3,) rad."""
    ax, ay, az = angles_xyz[0], angles_xyz[1], angles_xyz[2]
    cx, sx, cy, sy, cz, sz = jnp.cos(ax), jnp.sin(ax), jnp.cos(ay), jnp.sin(ay), jnp.cos(az), jnp.sin(az)
    one, zero = jnp.ones_like(ax), jnp.zeros_like(ax)
    rx = jnp.array([[cx, -sx, zero], [sx, cx, zero], [zero, zero, one]])
    ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = jnp.array([[one, zero, zero], [zero, cz, -sz], [zero, sz, cz]])
    hi = lax.Precision.HIGHEST  # no TF32 / bf16 passes on accelerators
    return jnp.matmul(rz, jnp.matmul(ry, rx, precision=hi), precision=hi)


def affine_matrix_jnp(angles_xyz, scale, spacing_mm):
    """jnp twin of `augment.affine_matrix` for given draws: (3, 3) float32 M = S^-1 R S / scale, S = diag(spacing).

    Args: angles_xyz (3,) rad about x, y, z; scale () > 1 zooms in; spacing_mm (3,) (z, y, x) mm.
    """
    sp = jnp.asarray(spacing_mm, jnp.float32)
    r = rotation_matrix_jnp(jnp.asarray(angles_xyz, jnp.float32))
    return (r * sp[None, :] / sp[:, None] / scale).astype(jnp.float32)


def _unravel(flat, shape):
    """(3,) int32 (z, y, x) of a C-order flat index in a traced (3,) shape."""
    yx = shape[1] * shape[2]
    return jnp.stack([flat // yx, (flat % yx) // shape[2], flat % shape[2]])


def _check_patch(patch_shape) -> tuple[int, int, int]:
    p = tuple(int(v) for v in patch_shape)
    if len(p) != 3 or min(p) < 1:
        raise ConfigError(f"patch_shape {patch_shape!r}: need three positive sizes (z, y, x)")
    return p


_N_BITS = 28
"""32-bit words drawn per element by one `jax.random.bits` call (one threefry evaluation instead of a dozen
`jax.random` calls cut the compilation of `draw_params` ~4x on CPU): case, 2 mode decisions, lesion / hot
voxel index, 3 start offsets, 3 angles, scale, 6 intensity parameters, affine decision, 3 flips, 6 intensity
decisions."""


def _u01(bits):
    """Uniform float32 in [0, 1) from uint32 words (the top 24 bits, exact in float32)."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _below(bits, n):
    """Uniform integer in [0, n) from uint32 words (n >= 1 int32; modulo bias <= n / 2**32)."""
    return (bits % jnp.maximum(n, 1).astype(jnp.uint32)).astype(jnp.int32)


def _draw_one(
    key, cdf, last, dstore: DeviceStore, patch, p_foreground, p_hot_negative, augment, p_affine, p_intensity, p_flip
) -> CropParams:
    bits = jax.random.bits(key, (_N_BITS,), jnp.uint32)
    u = _u01(bits)
    # case: inverse CDF (a zero weight spans an empty interval; `last` = the last positive weight)
    case = jnp.minimum(jnp.searchsorted(cdf, u[0] * cdf[-1], side="right"), last).astype(jnp.int32)
    n = dstore.shape[case]
    q = jnp.asarray(patch, jnp.int32)
    want_fg = u[1] < p_foreground
    les_n, hot_n = dstore.lesion_count[case], dstore.hot_count[case]
    use_fg = want_fg & (les_n > 0)
    use_hot = (~want_fg) & (u[2] < p_hot_negative) & dstore.labeled[case] & (hot_n > 0)
    flat = jnp.where(
        use_fg, dstore.lesion_voxels[case, _below(bits[3], les_n)], dstore.hot_voxels[case, _below(bits[4], hot_n)]
    )
    v = _unravel(flat, n)
    fits = n >= q
    s_vox = v - q // 2
    s_vox = jnp.where(fits, jnp.clip(s_vox, 0, n - q), s_vox)  # pipeline._start_on_voxel
    r = _below(bits[5:8], jnp.where(fits, n - q + 1, n + 1))
    s_uni = jnp.where(fits, r, r - q // 2)  # pipeline._start_uniform
    centred = use_fg | use_hot
    start = jnp.where(centred, s_vox, s_uni).astype(jnp.int32)
    mode = jnp.where(use_fg, 1, jnp.where(use_hot, 2, 0)).astype(jnp.int32)
    voxel = jnp.where(centred, v, -1).astype(jnp.int32)
    angles = -MAX_ANGLE + 2.0 * MAX_ANGLE * u[8:11]
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[11]
    lo = jnp.asarray([r_[0] for r_ in INTENSITY_RANGES], jnp.float32)
    hi = jnp.asarray([r_[1] for r_ in INTENSITY_RANGES], jnp.float32)
    iparam = lo + (hi - lo) * u[12:18]
    if augment:
        affine, flips, intensity = u[18] < p_affine, u[19:22] < p_flip, u[22:28] < p_intensity
    else:
        affine, flips, intensity = jnp.bool_(False), jnp.zeros(3, bool), jnp.zeros(6, bool)
    m = affine_matrix_jnp(angles, scale, dstore.spacing[case])
    m = jnp.where(affine, m, jnp.eye(3, dtype=jnp.float32))
    return CropParams(
        case=case,
        start=start,
        mode=mode,
        voxel=voxel,
        affine=affine,
        angles=angles,
        scale=scale,
        matrix=m,
        flips=flips,
        intensity=intensity,
        intensity_param=iparam,
    )


def draw_params(
    key,
    weights,
    dstore: DeviceStore,
    *,
    batch_size: int,
    patch_shape=DEFAULT_PATCH_SHAPE,
    p_foreground=0.0,
    p_hot_negative=0.0,
    augment: bool = True,
    p_affine=0.5,
    p_intensity=0.1,
    p_flip=0.5,
    first_element=0,
) -> CropParams:
    """The random draws of `sample_batch` (same arguments), without cutting any patch. Pure, jit-able.

    Element b uses only `jax.random.fold_in(key, first_element + b)` (28 uint32 words of `jax.random.bits`).
    Args:
      key: a PRNG key (typed `jax.random.key` or legacy uint32).
      weights: (N,) float sampling weights over the DeviceStore's cases, >= 0, not all zero (traced; with
        all zeros the draw is undefined; NumPy inputs are checked).
      batch_size, patch_shape, augment: static. The probabilities may be traced scalars.
    Returns: `CropParams` with leading axis `batch_size`.
    """
    patch = _check_patch(patch_shape)
    if isinstance(weights, (np.ndarray, list, tuple)):
        _check_weights(weights, dstore.num_cases)
    w = jnp.maximum(jnp.asarray(weights, jnp.float32).reshape(-1), 0.0)
    cdf = jnp.cumsum(w)
    last = w.shape[0] - 1 - jnp.argmax(w[::-1] > 0)
    elements = first_element + jnp.arange(int(batch_size), dtype=jnp.int32)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(elements)
    draw = functools.partial(
        _draw_one,
        cdf=cdf,
        last=last,
        dstore=dstore,
        patch=patch,
        p_foreground=p_foreground,
        p_hot_negative=p_hot_negative,
        augment=bool(augment),
        p_affine=p_affine,
        p_intensity=p_intensity,
        p_flip=p_flip,
    )
    return jax.vmap(lambda k: draw(k))(keys)


# ---- cutting one patch -------------------------------------------------------------------------------------


def _flat_views(dstore: DeviceStore):
    full = dstore.images.shape[1:4]
    strides = (full[0] * full[1] * full[2], full[1] * full[2], full[2])
    return dstore.images.reshape(-1, dstore.images.shape[-1]), dstore.seg.reshape(-1), strides


def _get(flat, idx):
    return flat.at[idx].get(mode="promise_in_bounds", wrap_negative_indices=False)


def _crop_plain(dstore: DeviceStore, case, start, flips, patch):
    """Integer crop: (D, H, W, C) float32 images, (D, H, W) uint8 label; flips reverse the index vectors."""
    flat_img, flat_seg, st = _flat_views(dstore)
    smax = dstore.max_shape
    ax = []
    for a in range(3):
        o = jnp.arange(patch[a], dtype=jnp.int32)
        o = jnp.where(flips[a], patch[a] - 1 - o, o)
        ax.append(jnp.clip(start[a] + o, -1, smax[a]) + BORDER_LO)
    idx = case * st[0] + ax[0][:, None, None] * st[1] + ax[1][None, :, None] * st[2] + ax[2][None, None, :]
    return _get(flat_img, idx).astype(jnp.float32), _get(flat_seg, idx)


def _crop_affine(dstore: DeviceStore, case, start, matrix, flips, patch):
    """Affine crop about the patch centre: trilinear images, nearest label (`pipeline._affine_sample`)."""
    flat_img, flat_seg, st = _flat_views(dstore)
    smax = dstore.max_shape
    m = matrix * jnp.where(flips, -1.0, 1.0)[None, :]  # flipping output axis j == negating column j
    half = [(q - 1) / 2.0 for q in patch]
    d = [jnp.arange(q, dtype=jnp.float32) - h for q, h in zip(patch, half)]
    coords = [
        m[a, 0] * d[0][:, None, None]
        + m[a, 1] * d[1][None, :, None]
        + m[a, 2] * d[2][None, None, :]
        + (start[a].astype(jnp.float32) + half[a])
        for a in range(3)
    ]
    # nearest (labels): np.rint == round half to even; out-of-volume -> the fill border
    near = [jnp.clip(jnp.round(c), -1, smax[a]).astype(jnp.int32) + BORDER_LO for a, c in enumerate(coords)]
    seg = _get(flat_seg, case * st[0] + near[0] * st[1] + near[1] * st[2] + near[2])
    # trilinear (images): clamping to [-1, smax] keeps both corners inside the padded array, and every
    # clamped sample is pure fill, as outside the volume
    cc = [jnp.clip(c, -1.0, float(smax[a])) for a, c in enumerate(coords)]
    i0f = [jnp.floor(c) for c in cc]
    fr = [c - i for c, i in zip(cc, i0f)]
    base = case * st[0] + sum((i.astype(jnp.int32) + BORDER_LO) * s for i, s in zip(i0f, (st[1], st[2], 1)))
    out = None
    for dz in (0, 1):
        wz = fr[0] if dz else 1.0 - fr[0]
        for dy in (0, 1):
            wzy = wz * (fr[1] if dy else 1.0 - fr[1])
            for dx in (0, 1):
                w = wzy * (fr[2] if dx else 1.0 - fr[2])
                v = _get(flat_img, base + (dz * st[1] + dy * st[2] + dx)).astype(jnp.float32)
                out = w[..., None] * v if out is None else out + w[..., None] * v
    return out, seg


def crop_patch_device(dstore: DeviceStore, case, start, patch_shape, matrix=None, flips=(False, False, False)):
    """One raw patch of case `case` (position in the DeviceStore), the device twin of `pipeline.crop_patch`.

    Args:
      case: () int; start: (3,) int (z, y, x) first voxel (may lie outside the case);
      patch_shape: static (D, H, W); matrix: optional (3, 3) sampling matrix about the patch centre
        (`augment.affine_matrix`); flips: (3,) bool.
    Returns:
      (images (D, H, W, 2 + E) float32 [ct HU, suv, *extras], label (D, H, W) uint8); outside the case
      -1024 HU / 0 / 0. Without `matrix` bit-identical to `pipeline.crop_patch`.
    """
    patch = _check_patch(patch_shape)
    case = jnp.asarray(case, jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    flips = jnp.asarray(flips, bool)
    if matrix is None:
        return _crop_plain(dstore, case, start, flips, patch)
    return _crop_affine(dstore, case, start, jnp.asarray(matrix, jnp.float32), flips, patch)


# ---- SUV intensity augmentations (jnp twins of clips_jax.data.augment, given their parameter) --------------


def _shift_sum(xp, weights, axis, n, radius):
    out = None
    for k in range(2 * radius + 1):
        t = lax.slice_in_dim(xp, k, k + n, axis=axis) * weights[k]
        out = t if out is None else out + t
    return out


def gaussian_blur_jnp(x, sigma):
    """`augment.gaussian_blur` for a given sigma in [0.5, 1] voxels: separable 7-tap Gaussian, truncate 3.0
    (radius int(3 sigma + 0.5), as `scipy.ndimage.gaussian_filter`), boundary 'reflect' (= numpy 'symmetric')."""
    radius = 3
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    r = jnp.floor(3.0 * sigma + 0.5)
    w = jnp.where(jnp.abs(t) <= r, jnp.exp(-0.5 * t * t / (sigma * sigma)), 0.0)
    w = w / w.sum()
    for a in range(x.ndim):
        pad = [(0, 0)] * x.ndim
        pad[a] = (radius, radius)
        x = _shift_sum(jnp.pad(x, pad, mode="symmetric"), w, a, x.shape[a], radius)
    return x


def contrast_jnp(x, factor):
    """`augment.contrast`: (x - mean) * factor + mean, clipped to [min(x), max(x)]."""
    m = jnp.mean(x)
    return jnp.clip((x - m) * factor + m, jnp.min(x), jnp.max(x))


def simulate_low_resolution_jnp(x, zoom):
    """`augment.simulate_low_resolution` for a given zoom in (0, 1]: per axis, nearest down-sampling to
    max(1, round(n * zoom)) voxels (`scipy.ndimage.zoom(order=0, grid_mode=True)` pixel-centre mapping), then
    LINEAR up-sampling back to n (the host uses cubic splines; linear keeps it a pair of gathers per axis).
    Both steps are separable, so each axis is done on its own, with static shapes."""
    for a in range(x.ndim):
        n = x.shape[a]
        s = jnp.maximum(1.0, jnp.round(n * zoom))
        u = jnp.clip((jnp.arange(n, dtype=jnp.float32) + 0.5) * s / n - 0.5, 0.0, s - 1.0)
        j0 = jnp.floor(u)
        f = u - j0
        j1 = jnp.minimum(j0 + 1.0, s - 1.0)
        src = lambda j: jnp.clip(jnp.floor((j + 0.5) * n / s), 0, n - 1).astype(jnp.int32)  # noqa: E731
        shape = [1] * x.ndim
        shape[a] = n
        f = f.reshape(shape)
        x = jnp.take(x, src(j0), axis=a) * (1.0 - f) + jnp.take(x, src(j1), axis=a) * f
    return x


def gamma_jnp(x, g, invert: bool = False):
    """`augment.gamma` (retain_stats=True) for a given gamma: min-max normalise, ** g, back, restore mean and
    std; `invert` works on -x. A constant patch (range < 1e-7) is returned unchanged."""
    v = -x if invert else x
    lo, hi = jnp.min(v), jnp.max(v)
    rng_ = hi - lo
    const = rng_ < 1e-7
    safe = jnp.where(const, 1.0, rng_)
    m, sd = jnp.mean(v), jnp.std(v)
    out = ((v - lo) / safe) ** g * safe + lo
    out = (out - jnp.mean(out)) / jnp.maximum(jnp.std(out), 1e-7) * sd + m
    out = -out if invert else out
    return jnp.where(const, x, out)


_INTENSITY_FNS = (
    gaussian_blur_jnp,
    lambda x, p: x * p,
    contrast_jnp,
    simulate_low_resolution_jnp,
    lambda x, p: gamma_jnp(x, p, invert=True),
    gamma_jnp,
)


def _augment_chain(suv, fire, params):
    for k, f in enumerate(_INTENSITY_FNS):
        if k == 1:  # brightness: a multiply by 1 is free, a conditional would copy the patch
            suv = suv * jnp.where(fire[k], params[k], 1.0)
        else:
            suv = lax.cond(fire[k], f, lambda x, p: x, suv, params[k])
    return jnp.maximum(suv, 0.0)


def augment_suv_jnp(suv, fire, params):
    """`augment.augment_suv` with given draws: step k of `INTENSITY_STEPS` applied iff fire[k], then SUV
    clipped at 0 if any fired. suv (D, H, W) float32; fire (6,) bool; params (6,) float32.

    Steps run under `lax.cond` (inside an outer one on `any(fire)`), so a step that does not fire costs
    only a copy of the patch, and a patch with no step costs nothing."""
    return lax.cond(jnp.any(fire), _augment_chain, lambda x, f, p: x, suv, fire, params)


# ---- batches -----------------------------------------------------------------------------------------------


def _render_one(dstore: DeviceStore, p: CropParams, patch, augment: bool):
    """Raw patch of one element: (D, H, W, 2 + E) float32 [ct, augmented suv, *extras], (D, H, W) uint8."""
    if not augment:
        return _crop_plain(dstore, p.case, p.start, jnp.zeros(3, bool), patch)
    img, seg = lax.cond(
        p.affine,
        lambda: _crop_affine(dstore, p.case, p.start, p.matrix, p.flips, patch),
        lambda: _crop_plain(dstore, p.case, p.start, p.flips, patch),
    )
    suv = augment_suv_jnp(img[..., 1], p.intensity, p.intensity_param)
    return jnp.concatenate([img[..., :1], suv[..., None], img[..., 2:]], axis=-1), seg


def _window(raw, label):
    """(D, H, W, 2 + E) raw patch -> (D, H, W, 5 + E) network input; label -> int32."""
    chans = make_channels_jnp(raw[..., 0], raw[..., 1])
    if raw.shape[-1] > 2:
        chans = jnp.concatenate([chans, raw[..., 2:]], axis=-1)
    return chans, label.astype(jnp.int32)


def render_batch(
    params: CropParams, dstore: DeviceStore, *, patch_shape=DEFAULT_PATCH_SHAPE, augment: bool = True
) -> dict:
    """Cut, augment and window the patches described by `params` (from `draw_params`). Pure, jit-able.

    Elements are processed one after another (`lax.map`), each paying only for the branches it drew, and
    each written straight into the batch (measured on 2 CPU cores: ~15 % less CPU time than windowing the
    stacked raw patches afterwards, which needs one more batch-sized buffer).
    Returns the batch dict of `sample_batch`.
    """
    patch = _check_patch(patch_shape)
    image, label = lax.map(lambda p: _window(*_render_one(dstore, p, patch, bool(augment))), params)
    return {
        "image": image,
        "label": label,
        "case_index": params.case,
        "labeled": dstore.labeled[params.case],
        "lesion_centred": params.mode == 1,
    }


def sample_batch(
    key,
    weights,
    dstore: DeviceStore,
    *,
    batch_size: int,
    patch_shape=DEFAULT_PATCH_SHAPE,
    p_foreground=0.0,
    p_hot_negative=0.0,
    augment: bool = True,
    p_affine=0.5,
    p_intensity=0.1,
    p_flip=0.5,
    first_element=0,
    return_params: bool = False,
):
    """One training batch drawn and cut on the device: the device twin of `pipeline.PatchSampler`.

    Pure and jit-compatible (static: batch_size, patch_shape, augment, return_params; everything else may be
    traced, so new curriculum weights never recompile). See the module docstring for the maths.

    Args:
      key: PRNG key; element b uses `jax.random.fold_in(key, first_element + b)` only, so a device holding
        global elements [o, o + B) passes `first_element=o` and the global batch does not depend on the
        device count.
      weights: (N,) float >= 0 (not all zero) over the DeviceStore's cases.
      dstore: from `device_store_from`.
      batch_size: B; patch_shape: (D, H, W) voxels of the stored grid.
      p_foreground, p_hot_negative, augment, p_affine, p_intensity, p_flip: as `pipeline.make_train_iterator`
        (`augment=False`: plain crops, no flips, no intensity changes).
      return_params: also return the `CropParams` drawn.
    Returns:
      `{"image": (B, D, H, W, 5 + E) float32 (the 5 channels in `channels.CHANNELS` order, then the extras),
      "label": (B, D, H, W) int32, "case_index": (B,) int32 position in the DeviceStore (store index:
      `dstore.store_index[case_index]`), "labeled": (B,) bool, "lesion_centred": (B,) bool}`
      [, `CropParams`].
    """
    params = draw_params(
        key,
        weights,
        dstore,
        batch_size=batch_size,
        patch_shape=patch_shape,
        p_foreground=p_foreground,
        p_hot_negative=p_hot_negative,
        augment=augment,
        p_affine=p_affine,
        p_intensity=p_intensity,
        p_flip=p_flip,
        first_element=first_element,
    )
    batch = render_batch(params, dstore, patch_shape=patch_shape, augment=augment)
    return (batch, params) if return_params else batch


sample_batch_jit = jax.jit(sample_batch, static_argnames=("batch_size", "patch_shape", "augment", "return_params"))
"""`sample_batch` compiled (patch_shape must be a tuple)."""


__all__ = [
    "BORDER_HI",
    "BORDER_LO",
    "CropParams",
    "DeviceStore",
    "INTENSITY_RANGES",
    "INTENSITY_STEPS",
    "MAX_ANGLE",
    "SCALE_RANGE",
    "affine_matrix_jnp",
    "augment_suv_jnp",
    "contrast_jnp",
    "crop_patch_device",
    "device_store_bytes",
    "device_store_from",
    "draw_params",
    "gamma_jnp",
    "gaussian_blur_jnp",
    "render_batch",
    "rotation_matrix_jnp",
    "sample_batch",
    "sample_batch_jit",
    "simulate_low_resolution_jnp",
]
