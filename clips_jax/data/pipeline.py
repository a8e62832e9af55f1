"""grain training pipeline: curriculum-weighted case sampling -> random crop -> augmentation -> batches.

Built on grain's Dataset API (grain documentation, "Choosing an API", `docs/api_choice.md`), whose output
stream does not depend on the number of worker processes:

    MapDataset.range(num_batches * local_batch)          local element j of this process
      .map(PatchSampler)                                 j -> global index g -> one augmented patch
      .batch(local_batch)  .to_iter_dataset(...)  [.mp_prefetch(num_workers)]

Each element is a pure function of `(seed, stage, weights, g)`:
1. `element_rng(seed, stage, g)`: a Philox generator keyed by `[(seed << 32) | stage, g]`, so every element
   has its own independent stream, computable in any worker, in any order.
2. Case: inverse CDF of the caller's per-case weights at the generator's first uniform (`case_for_element`;
   `sample_case_indices` is the same draw, vectorised over g, for tests and curricula). A zero weight is
   never drawn.
3. Crop of `patch_shape` (default (128, 96, 96) voxels = 768 x 576 x 576 mm at 6 mm) whose start is uniform
   over the positions where the patch fits (if an axis is shorter than the patch, its centre is uniform over
   [0, size] as in the reference). With probability `p_foreground` the patch is centred on a random lesion
   voxel instead (clamped to fit; cases without lesions fall back to the uniform crop). Otherwise, with
   probability `p_hot_negative`, it is centred on a random *hard negative*: a voxel with SUV >= `hot_suv`
   outside the lesions (physiological uptake: brain, heart, kidneys, bladder; the false positives a
   lesion-centred sampler teaches least about; no such voxel -> uniform crop). Both 0 = the reference's
   uniform crops; a probability of 0 draws no random number, so the other draws stay as they were.
   Out-of-volume voxels are filled in the RAW arrays with -1024 HU / SUV 0 / label 0; every channel window
   maps those to exactly 0, i.e. the same as the reference's zero padding of the channels.
4. Augmentation (`clips_jax.data.augment`, as the original's training code): with p = `p_affine` (0.5) a rotation
   U(-0.3, 0.3) rad about each axis and scale U(0.9, 1.1), folded into the crop (linear for CT/SUV, nearest
   for the label; the rotated patch samples the real volume around it, not padding); SUV intensity
   augmentations each with p = `p_intensity` (0.1); flips of each axis with p = 0.5; then the 5 input
   channels (`channels.make_channels`). Deviation from the reference order (intensity -> channels -> flips
   -> affine on channels): here the geometric resampling is done on the raw HU/SUV before the windowing,
   which is 2.5x cheaper (2 volumes instead of 5) and differs only where a linear interpolation straddles
   a window edge.

Batches: `{"image": (B, D, H, W, 5) float32, "label": (B, D, H, W) int32, "case_index": (B,) int32
(index in the CaseStore), "labeled": (B,) bool, "lesion_centred": (B,) bool (the crop was centred on a lesion
voxel: the crops whose loss the self-paced and bandit curricula read)}` where B is the per-process batch.

Extra input channels (the refiner): `extra_channels=("stage_a",)` reads the optional per-case array
`cases/<id>/stage_a.npy` (the stage-A lesion probability on the stored grid, written by
`python -m clips_jax.stage_a`) and appends it after the 5 image channels, so "image" is
(B, D, H, W, 5 + len(extra_channels)). Extra arrays go through exactly the same crop, affine (linear
interpolation, 0 outside the volume) and flips as CT/SUV; the SUV intensity augmentation does not touch them,
and they are not windowed. A case without the file is a ConfigError when the pipeline is built. With the
default `extra_channels=()` nothing changes (same random draws, same batches, same iterator state).

Curriculum stages and weight changes. The weights are frozen into a pipeline when it is built (grain
pickles the dataset into spawned workers; later changes never reach them). The trainer therefore works in
stages of N batches: at a stage boundary it computes new weights and calls `make_train_iterator(...,
stage=s + 1, weights=new)`. New weights thus take effect at the next stage, i.e. within N batches of being
computed; the old iterator and whatever it had prefetched (up to `prefetch` batches plus `num_workers` x 1
in flight) are dropped with it, so no batch drawn with stale weights is consumed unless the caller keeps
draining the old iterator (then up to that prefetch depth). Element indices restart at 0 in each stage,
and the key includes the stage, so stages draw independent streams.

Checkpointing: `TrainIterator.get_state()` returns a JSON-friendly dict `{"grain": <grain iterator state>,
"seed", "stage", "weights_md5", ...}`; `set_state` on a pipeline rebuilt with the same arguments resumes
with identical next batches (it raises ConfigError if seed/stage/weights/batch layout differ).

Multi-host: the global batch of size `batch_size` is split into `process_count` contiguous slices; process
p produces elements `b * batch_size + p * local_batch + [0, local_batch)` of global batch b, so
`jax.make_array_from_process_local_data(sharding, local_batch_array)` assembles exactly the global batch a
single host would have produced. `process_index` / `process_count` default to `jax.process_index()` /
`jax.process_count()`.

Workers are spawned processes: everything here is picklable NumPy code and touches no jax device; scripts
must have absl flags parsed (run under `absl.app.run`, or call `flags.FLAGS.mark_as_parsed()`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterator, Sequence

import grain
import numpy as np

from clips_jax.data import augment as aug
from clips_jax.data.channels import CHANNELS, make_channels
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError

DEFAULT_PATCH_SHAPE = (128, 96, 96)
"""TMTV-Net training patch (z, y, x) voxels at 6 mm (`fov_half_size` (64, 48, 48) x 2 of the original training)."""

PAD_HU = -1024.0
PAD_SUV = 0.0
_U32 = 1 << 32


def _check_weights(weights, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise ConfigError(f"curriculum weights: got {w.size} values for {n} cases")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(
            "curriculum weights must be finite, >= 0 and not all zero (curriculum rule 1 of "
            "docs/curricula.md: fall back to "
            "the easiest cases instead of an empty selection)"
        )
    return w


def weights_cdf(weights) -> np.ndarray:
    """Normalised cumulative weights (float64, last positive entry and after set to exactly 1.0)."""
    w = _check_weights(weights, np.size(weights))
    cdf = np.cumsum(w) / w.sum()
    cdf[int(np.flatnonzero(w > 0)[-1]) :] = 1.0
    return cdf


def weights_md5(weights) -> str:
    """Fingerprint of a weight vector (float64 bytes), stored in iterator states to detect mismatches."""
    return hashlib.md5(np.ascontiguousarray(weights, dtype=np.float64).tobytes()).hexdigest()


def element_rng(seed: int, stage: int, index: int) -> np.random.Generator:
    """The generator of global element `index` of curriculum stage `stage` (Philox, counter-based).

    `seed` and `stage` must lie in [0, 2**32); `index` in [0, 2**64).
    """
    if not (0 <= int(seed) < _U32 and 0 <= int(stage) < _U32):
        raise ConfigError(f"seed {seed} / stage {stage}: both must be integers in [0, 2**32)")
    key = np.array([(int(seed) << 32) | int(stage), int(index)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def case_for_element(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """Draw one position in `cdf` (from `weights_cdf`) with the generator's next uniform (inverse CDF)."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def sample_case_indices(seed: int, stage: int, weights, count: int, start: int = 0) -> np.ndarray:
    """Pure function `(seed, stage, weights) -> positions` drawn by global elements `start .. start+count-1`.

    Args:
      weights: (N,) non-negative, not all zero (need not sum to 1).
    Returns:
      (count,) int64 positions in [0, N): exactly the cases the pipeline's elements use (positions index the
      weight vector, i.e. `case_indices[pos]` when the pipeline was given explicit case indices).
    """
    cdf = weights_cdf(weights)
    return np.array(
        [case_for_element(element_rng(seed, stage, g), cdf) for g in range(start, start + count)], dtype=np.int64
    )


def _read_box(arr: np.ndarray, lo, hi, fill, dtype) -> np.ndarray:
    """Copy `arr[lo:hi]` (per axis, may extend beyond the array) into a new array filled with `fill` outside."""
    lo = np.asarray(lo, int)
    hi = np.asarray(hi, int)
    out = np.full(tuple(hi - lo), fill, dtype=dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, arr.shape)
    if np.all(src_hi > src_lo):
        src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        dst = tuple(slice(a - off, b - off) for a, b, off in zip(src_lo, src_hi, lo))
        out[dst] = arr[src]
    return out


def crop_patch(arrays: dict, start, patch_shape, matrix: np.ndarray | None = None, extra: Sequence[str] = ()):
    """Cut one patch out of a case's (z, y, x) `ct`, `suv`, `seg` arrays (memory maps are fine).

    Args:
      start: (z, y, x) integer index of the patch's first voxel (may be negative / beyond the end).
      patch_shape: (D, H, W) voxels.
      matrix: optional 3x3 sampling matrix (`augment.affine_matrix`) applied about the patch centre
        `start + (patch_shape - 1) / 2`: output offset d reads input offset `matrix @ d`.
      extra: names of further (z, y, x) arrays in `arrays` (e.g. "stage_a") cropped the same way, linearly
        interpolated under `matrix`, 0 outside the volume.
    Returns:
      (ct float32 HU, suv float32, seg uint8, *extra float32), each (D, H, W); outside the volume -1024 HU,
      0, 0 and 0 for the extras.
    """
    p = np.asarray(patch_shape, int)
    start = np.asarray(start, int)
    if matrix is None:
        hi = start + p
        return (
            _read_box(arrays["ct"], start, hi, PAD_HU, np.float32),
            _read_box(arrays["suv"], start, hi, PAD_SUV, np.float32),
            _read_box(arrays["seg"], start, hi, 0, np.uint8),
            *(_read_box(arrays[n], start, hi, 0.0, np.float32) for n in extra),
        )
    half = (p - 1) / 2.0
    centre = start + half
    ext = np.abs(matrix) @ half
    lo = np.floor(centre - ext).astype(int) - 1
    hi = np.ceil(centre + ext).astype(int) + 2
    boxes = [
        _read_box(arrays["ct"], lo, hi, PAD_HU, np.float32),
        _read_box(arrays["suv"], lo, hi, PAD_SUV, np.float32),
        _read_box(arrays["seg"], lo, hi, 0, np.uint8),
        *(_read_box(arrays[n], lo, hi, 0.0, np.float32) for n in extra),
    ]
    return _affine_sample(boxes, np.asarray(matrix, np.float64), centre - lo, half, tuple(p))


def _affine_sample(boxes, matrix, centre_in_box, half, out_shape):
    """Sample boxes[2] by nearest neighbour and every other box trilinearly at `centre + matrix @ (o - half)`.

    Returns (linear boxes[0], linear boxes[1], nearest boxes[2], linear boxes[3], ...).

    Same result as `scipy.ndimage.affine_transform(order=1 / order=0)` where all sample points lie inside
    the box (guaranteed by `crop_patch`'s margins), but the coordinates and weights are computed once for
    all arrays with vectorised NumPy (about 3x faster than three affine_transform calls).
    """
    d = [np.arange(n, dtype=np.float64) - h for n, h in zip(out_shape, half)]
    coords = []
    for a in range(3):
        c = (
            matrix[a, 0] * d[0][:, None, None]
            + matrix[a, 1] * d[1][None, :, None]
            + matrix[a, 2] * d[2][None, None, :]
            + centre_in_box[a]
        )
        coords.append(c)
    shape = np.asarray(boxes[0].shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    # nearest neighbour (labels)
    near = sum(np.clip(np.rint(c), 0, n - 1).astype(np.intp) * s for c, n, s in zip(coords, shape, strides))
    seg = boxes[2].ravel()[near]
    # trilinear (images); margins keep i0 in [0, n - 2]
    i0 = [np.clip(np.floor(c), 0, n - 2).astype(np.intp) for c, n in zip(coords, shape)]
    fr = [(c - i).astype(np.float32) for c, i in zip(coords, i0)]
    base = i0[0] * strides[0] + i0[1] * strides[1] + i0[2]
    del coords, near
    flats = [b.ravel() for k, b in enumerate(boxes) if k != 2]
    out = [np.zeros(out_shape, np.float32) for _ in flats]
    for dz in (0, 1):
        wz = fr[0] if dz else 1.0 - fr[0]
        for dy in (0, 1):
            wzy = wz * (fr[1] if dy else 1.0 - fr[1])
            for dx in (0, 1):
                w = wzy * (fr[2] if dx else 1.0 - fr[2])
                idx = base + (dz * strides[0] + dy * strides[1] + dx)
                for o, fl in zip(out, flats):
                    o += w * fl[idx]
    return (out[0], out[1], seg, *out[2:])


def _start_uniform(rng, shape, p) -> np.ndarray:
    st = []
    for n, q in zip(shape, p):
        if n >= q:
            st.append(int(rng.integers(0, n - q + 1)))
        else:  # axis shorter than the patch: centre uniform over [0, n], the rest padded
            st.append(int(rng.integers(0, n + 1)) - q // 2)
    return np.asarray(st)


def _start_on_voxel(v, shape, p) -> np.ndarray:
    st = np.asarray(v, int) - np.asarray(p) // 2
    for a, (n, q) in enumerate(zip(shape, p)):
        if n >= q:
            st[a] = min(max(st[a], 0), n - q)
    return st


class PatchSampler:
    """Callable `local element index -> training example` (picklable; what grain maps over).

    See the module docstring for the maths. Construct through `make_train_dataset`.
    """

    def __init__(
        self,
        store: CaseStore,
        weights,
        *,
        seed: int,
        stage: int,
        patch_shape,
        batch_size: int,
        local_batch: int,
        process_index: int,
        case_indices=None,
        p_foreground: float = 0.0,
        p_hot_negative: float = 0.0,
        hot_suv: float = 2.5,
        augment: bool = True,
        p_affine: float = 0.5,
        p_intensity: float = 0.1,
        p_flip: float = 0.5,
        extra_channels: Sequence[str] = (),
    ):
        self.store = store
        self.case_indices = np.arange(len(store)) if case_indices is None else np.asarray(case_indices, dtype=np.int64)
        if self.case_indices.size == 0 or self.case_indices.min() < 0 or self.case_indices.max() >= len(store):
            raise ConfigError(f"case_indices must be non-empty indices into the store ({len(store)} cases)")
        self.weights = _check_weights(weights, len(self.case_indices))
        self.cdf = weights_cdf(self.weights)
        element_rng(seed, stage, 0)  # validates seed / stage
        self.seed, self.stage = int(seed), int(stage)
        self.patch_shape = tuple(int(v) for v in patch_shape)
        if len(self.patch_shape) != 3 or min(self.patch_shape) < 1:
            raise ConfigError(f"patch_shape {patch_shape!r}: need three positive sizes (z, y, x)")
        self.batch_size, self.local_batch, self.process_index = int(batch_size), int(local_batch), int(process_index)
        self.p_foreground, self.augment = float(p_foreground), bool(augment)
        self.p_hot_negative, self.hot_suv = float(p_hot_negative), float(hot_suv)
        for name, p in (("p_foreground", self.p_foreground), ("p_hot_negative", self.p_hot_negative)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}={p}: need a probability in [0, 1]")
        if not (np.isfinite(self.hot_suv) and self.hot_suv >= 0):
            raise ConfigError(f"hot_suv={hot_suv}: need a finite SUV >= 0 (g/ml)")
        self.p_affine, self.p_intensity, self.p_flip = float(p_affine), float(p_intensity), float(p_flip)
        self.extra_channels = _check_extra(store, extra_channels, self.case_indices[self.weights > 0])
        self.spacings = [store.geometry(int(i)).spacing_mm for i in self.case_indices]
        self.labeled = store.has_seg
        self._hot_cache: OrderedDict[int, np.ndarray] = OrderedDict()  # case -> hot_negative_voxels, LRU

    def _hot_voxels(self, case: int, arrays: dict) -> np.ndarray:
        """Flat indices of the case's hard-negative voxels (`hot_negative_voxels`), cached for the last
        `HOT_CACHE_CASES` cases: ~1 ms per 6 mm case, but ~0.1 s on a native 326 x 400 x 400 grid."""
        cache = self._hot_cache
        if case in cache:
            cache.move_to_end(case)
            return cache[case]
        hot = hot_negative_voxels(arrays["suv"], arrays["seg"], self.hot_suv)
        cache[case] = hot
        while len(cache) > HOT_CACHE_CASES:
            cache.popitem(last=False)
        return hot

    def global_index(self, j: int) -> int:
        """Global element index of this process's local element `j` (multi-host slicing)."""
        b, r = divmod(int(j), self.local_batch)
        return b * self.batch_size + self.process_index * self.local_batch + r

    def __call__(self, j: int) -> dict:
        g = self.global_index(j)
        rng = element_rng(self.seed, self.stage, g)
        pos = case_for_element(rng, self.cdf)
        case = int(self.case_indices[pos])
        arrays = self.store.case_arrays(case, extra=self.extra_channels)
        shape = arrays["ct"].shape
        start = None
        centred = False
        if self.p_foreground > 0 and rng.random() < self.p_foreground:
            fg = self.store.foreground(case)
            if len(fg):
                start = _start_on_voxel(fg[int(rng.integers(len(fg)))], shape, self.patch_shape)
                centred = True
        elif self.p_hot_negative > 0 and rng.random() < self.p_hot_negative and self.labeled[case]:
            hot = self._hot_voxels(case, arrays)  # (unlabeled cases: their lesions would count as negatives)
            if len(hot):
                v = np.unravel_index(int(hot[int(rng.integers(len(hot)))]), shape)
                start = _start_on_voxel(v, shape, self.patch_shape)
        if start is None:
            start = _start_uniform(rng, shape, self.patch_shape)
        matrix = None
        if self.augment and rng.random() < self.p_affine:
            matrix = aug.affine_matrix(rng, self.spacings[pos])
        ct, suv, seg, *extra = crop_patch(arrays, start, self.patch_shape, matrix, self.extra_channels)
        if self.augment:
            suv = aug.augment_suv(suv, rng, self.p_intensity)
            ct, suv, seg, *extra = aug.random_flips([ct, suv, seg, *extra], rng, self.p_flip)
        return {
            "image": _stack_channels(ct, suv, extra),
            "label": seg.astype(np.int32),
            "case_index": np.int32(case),
            "labeled": np.bool_(self.labeled[case]),
            "lesion_centred": np.bool_(centred),
        }


#: Cases whose hard-negative voxel lists a sampler keeps (at 4 bytes per hot voxel).
HOT_CACHE_CASES = 16


def hot_negative_voxels(suv: np.ndarray, seg: np.ndarray, hot_suv: float) -> np.ndarray:
    """Flat (C-order) int32/int64 indices of the hard-negative voxels of one case: SUV >= `hot_suv` (g/ml) and
    label 0. `suv`, `seg`: (z, y, x) arrays of the stored grid; `np.unravel_index(i, suv.shape)` gives (z, y, x).
    """
    flat = np.flatnonzero((np.asarray(suv) >= hot_suv) & (np.asarray(seg) == 0))
    return flat.astype(np.int32) if np.asarray(suv).size < 2**31 else flat


def _check_extra(store: CaseStore, extra_channels, indices) -> tuple[str, ...]:
    """Validated tuple of extra channel names; ConfigError if a case in `indices` lacks one of the files."""
    if isinstance(extra_channels, str):
        extra_channels = (extra_channels,)
    names = tuple(str(n) for n in extra_channels)
    reserved = {
        "ct",
        "suv",
        "seg",
        "fg",
        "image",
        "label",
        "labeled",
        "id",
        "case_index",
        "geometry",
        "native_geometry",
    }
    bad = [n for n in names if not n.isidentifier() or n in reserved]
    if bad or len(set(names)) != len(names):
        raise ConfigError(
            f"extra_channels {names!r}: need distinct names of optional case arrays such as "
            f"'stage_a' (not {sorted(reserved)})"
        )
    store.require_extra(names, indices)
    return names


def _stack_channels(ct: np.ndarray, suv: np.ndarray, extra) -> np.ndarray:
    """(..., 5 + len(extra)) float32: the 5 windowed channels, then the extra arrays unchanged."""
    if not extra:
        return make_channels(ct, suv)
    out = np.empty(ct.shape + (len(CHANNELS) + len(extra),), np.float32)
    out[..., : len(CHANNELS)] = make_channels(ct, suv)
    for k, e in enumerate(extra):
        out[..., len(CHANNELS) + k] = e
    return out


def _resolve_processes(batch_size, process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # only here: workers never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(f"batch_size {batch_size} must be a positive multiple of the {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} outside [0, {process_count})")
    return int(process_index), int(process_count), batch_size // process_count


def make_train_dataset(
    store: CaseStore,
    weights,
    *,
    seed: int,
    stage: int = 0,
    batch_size: int = 2,
    patch_shape: Sequence[int] = DEFAULT_PATCH_SHAPE,
    num_batches: int | None = None,
    case_indices=None,
    p_foreground: float = 0.0,
    augment: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    extra_channels: Sequence[str] = (),
    p_hot_negative: float = 0.0,
    hot_suv: float = 2.5,
) -> grain.MapDataset:
    """The stage's batched `grain.MapDataset` (random access; batch b is a pure function of the arguments).

    Args: see `make_train_iterator`. Returns a MapDataset of `num_batches` (default 2**40, effectively
    endless) per-process batches.
    """
    pidx, pcount, local = _resolve_processes(batch_size, process_index, process_count)
    sampler = PatchSampler(
        store,
        weights,
        seed=seed,
        stage=stage,
        patch_shape=patch_shape,
        batch_size=batch_size,
        local_batch=local,
        process_index=pidx,
        case_indices=case_indices,
        p_foreground=p_foreground,
        augment=augment,
        extra_channels=extra_channels,
        p_hot_negative=p_hot_negative,
        hot_suv=hot_suv,
    )
    n = (1 << 40) if num_batches is None else int(num_batches)
    if n < 1:
        raise ConfigError(f"num_batches {num_batches}: need >= 1")
    return grain.MapDataset.range(n * local).map(sampler).batch(local, drop_remainder=True)


class TrainIterator:
    """Iterator over training batches with a checkpointable state (wraps a grain DatasetIterator).

    `get_state()` -> JSON-friendly dict; `set_state(state)` on an iterator built with the same arguments
    restores the position (ConfigError if seed, stage, weights or batch layout differ).
    """

    def __init__(self, grain_iterator, info: dict):
        self.grain_iterator = grain_iterator
        self.info = dict(info)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        return next(self.grain_iterator)

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream: grain's iterator state plus the pipeline settings (`info`)."""
        return {"grain": self.grain_iterator.get_state(), **self.info}

    def set_state(self, state: dict) -> None:
        """Restore a `get_state` position; ConfigError if it was saved by a pipeline with other settings."""
        diff = {k: (state.get(k), v) for k, v in self.info.items() if state.get(k) != v}
        if diff:
            raise ConfigError(
                f"iterator state does not match this pipeline (saved, current): {diff}; rebuild "
                "the pipeline with the saved stage and weights before restoring"
            )
        self.grain_iterator.set_state(state["grain"])


def make_train_iterator(
    store: CaseStore,
    weights,
    *,
    seed: int,
    stage: int = 0,
    batch_size: int = 2,
    patch_shape: Sequence[int] = DEFAULT_PATCH_SHAPE,
    num_workers: int = 0,
    num_batches: int | None = None,
    case_indices=None,
    p_foreground: float = 0.0,
    augment: bool = True,
    read_threads: int = 2,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    extra_channels: Sequence[str] = (),
    p_hot_negative: float = 0.0,
    hot_suv: float = 2.5,
) -> TrainIterator:
    """Training batches of one curriculum stage.

    Args:
      store: the prepared CaseStore.
      weights: per-case sampling weights (>= 0, not all zero), one per store case, or one per entry of
        `case_indices` (e.g. the training split). Frozen for this stage.
      seed, stage: stream identity, each in [0, 2**32).
      batch_size: GLOBAL batch size (all processes); each process yields `batch_size / process_count`.
      patch_shape: (D, H, W) voxels of the stored grid.
      num_workers: grain worker processes (0 = in-process threads). The stream does not depend on it.
      num_batches: batches in this stage (None: endless).
      case_indices: optional store indices the weights refer to (default: all cases).
      p_foreground: probability of centring a patch on a lesion voxel (0 = the reference behaviour).
      p_hot_negative: probability (when no lesion centre was drawn) of centring it on a voxel with
        SUV >= `hot_suv` (g/ml) outside the lesions: hard negatives (0 = the reference behaviour).
      augment: apply the TMTV-Net training augmentations of `clips_jax.data.augment` (False: crops only).
      read_threads, prefetch: grain ReadOptions (threads per process/worker, batches buffered).
      process_index, process_count: multi-host slicing (default from jax).
      extra_channels: names of optional per-case arrays appended after the 5 channels, e.g. `("stage_a",)`
        for the refiner (see the module docstring). Every case with a positive weight must have them
        (ConfigError naming the cases and `python -m clips_jax.stage_a` otherwise).
    Returns:
      `TrainIterator` yielding `{"image": (B, D, H, W, 5 + len(extra_channels)) float32, "label":
      (B, D, H, W) int32, "case_index": (B,) int32, "labeled": (B,) bool}`, B = per-process batch.
    """
    pidx, pcount, local = _resolve_processes(batch_size, process_index, process_count)
    ds = make_train_dataset(
        store,
        weights,
        seed=seed,
        stage=stage,
        batch_size=batch_size,
        patch_shape=patch_shape,
        num_batches=num_batches,
        case_indices=case_indices,
        p_foreground=p_foreground,
        augment=augment,
        process_index=pidx,
        process_count=pcount,
        extra_channels=extra_channels,
        p_hot_negative=p_hot_negative,
        hot_suv=hot_suv,
    )
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, int(read_threads)), prefetch_buffer_size=max(1, int(prefetch)))
    )
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers), per_worker_buffer_size=1))
    info = {
        "seed": int(seed),
        "stage": int(stage),
        "weights_md5": weights_md5(weights),
        "batch_size": int(batch_size),
        "process_index": pidx,
        "process_count": pcount,
        "patch_shape": [int(v) for v in patch_shape],
        "num_cases": len(store),
    }
    extra = (extra_channels,) if isinstance(extra_channels, str) else tuple(extra_channels)
    if extra:  # only then: states of 5-channel pipelines stay as before
        info["extra_channels"] = [str(n) for n in extra]
    if p_hot_negative > 0:  # likewise: a resumed run must use the same sampling
        info["p_hot_negative"], info["hot_suv"] = float(p_hot_negative), float(hot_suv)
    return TrainIterator(iter(it_ds), info)


def make_eval_cases(
    store: CaseStore, split: str | Sequence[int] = "val", extra_channels: Sequence[str] = ()
) -> Iterator[dict]:
    """Whole preprocessed volumes for validation, one case at a time (loaded lazily).

    Args:
      split: a split name ("val", "test", "train") or explicit store indices.
      extra_channels: optional per-case arrays appended after the 5 channels (`("stage_a",)` for the
        refiner); checked for every case of the split before the first is yielded (ConfigError naming the
        cases and the command that makes them).
    Yields:
      `{"case_index": int, "id": str, "image": (z, y, x, 5 + len(extra_channels)) float32 channels, "ct":
      (z, y, x) float32 HU, "suv": (z, y, x) float32, "label": (z, y, x) int32, "labeled": bool, "geometry":
      Geometry (stored grid), "native_geometry": Geometry}`, plus each extra array under its name as
      (z, y, x) float32. An empty split yields nothing.
    """
    idx = store.split_indices(split) if isinstance(split, str) else np.asarray(split, dtype=np.int64)
    extra = _check_extra(store, extra_channels, idx)
    has_seg = store.has_seg
    for i in idx:
        a = store.case_arrays(int(i), extra=extra)
        ct = np.asarray(a["ct"], dtype=np.float32)
        suv = np.asarray(a["suv"], dtype=np.float32)
        ex = {n: np.asarray(a[n], dtype=np.float32) for n in extra}
        yield {
            "case_index": int(i),
            "id": store.ids[int(i)],
            "image": _stack_channels(ct, suv, list(ex.values())),
            "ct": ct,
            "suv": suv,
            "label": np.asarray(a["seg"], dtype=np.int32),
            "labeled": bool(has_seg[int(i)]),
            "geometry": store.geometry(int(i)),
            "native_geometry": store.native_geometry(int(i)),
            **ex,
        }


__all__ = [
    "CHANNELS",
    "DEFAULT_PATCH_SHAPE",
    "HOT_CACHE_CASES",
    "PatchSampler",
    "TrainIterator",
    "crop_patch",
    "element_rng",
    "case_for_element",
    "hot_negative_voxels",
    "make_eval_cases",
    "make_train_dataset",
    "make_train_iterator",
    "sample_case_indices",
    "weights_cdf",
    "weights_md5",
]
