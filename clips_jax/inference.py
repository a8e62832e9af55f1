"""Tiled whole-body inference: overlapping tiles, one compiled model call, weighted blending on the host.

Where this fits: `clips_jax.predict` and the trainer's whole-volume evaluation hand a channels-last volume
`(D, H, W, C)` (the 5 TMTV-Net input channels, + the stage-A probability for the refiner) and a predictor to
`tiled_inference`, and get per-voxel class probabilities `(D, H, W, 2)` back on the same grid;
`argmax_mask` turns them into the final mask. `upsample_probability` carries the 6 mm stage-A lesion
probability onto the native PET grid (cascade channel of stage B), and `nnx_predictor` turns a Flax NNX model
into a (predictor, params) pair. Tiling takes arrays: this module knows no cases, grids or case stores (it
imports nothing of `clips_jax.data`); the two-stage cascade, which needs both, is `clips_jax.cascade`.

The algorithm reproduces the original TMTV-Net "dense" inference (`inference_process_wholebody_3d` in
`main/main.py` of the original repository qurit-frizi/TMTV-Net; `main/corelib/src/corelib/inference_dense.py` holds
an equivalent copy):
1. zero-pad every axis to the next multiple of the tile, centred (left = floor(diff / 2), right = the rest);
2. tile origins 0, step, 2*step, ... while origin + tile <= padded size;
3. per tile p = softmax(predictor logits); accumulate `acc += p * w`, `wsum += w` with the central weight
   map `w` (`central_weight_map`);
4. zero-weight rule: where `wsum <= 0` the probabilities are (0, 0) (=> background);
5. `acc / wsum`, un-padded.
Steps 1 and 5 are done without building the padded volume: tiles are cut from the unpadded volume into
zero-filled buffers and only the unpadded region is accumulated, with bit-identical results (host memory of
one pass: the input, the (D, H, W, K) result and a (D, H, W) weight sum, float32; `benchmarks/inference_memory.py`).
Deliberate differences: accumulation is float32 (the original used float16), tiles are batched (`batch_size`)
through ONE jit-compiled function (the last batch is padded to the fixed size, so it compiles once), and the
predictor may be run in bfloat16. Optional test-time augmentation averages the 8 flip combinations (the
original's `test_time_augmentation_axis`).

Predictor contract: `predictor(x) -> logits` (or `predictor(params, x)` when `params` is given) with x
`(B, *tile_shape, C)` and logits `(B, *tile_shape, K)`, K = 2 for TMTV-Net. It is traced inside `jax.jit`, so
it must be a pure JAX function. Pass model weights as `params` (for an NNX model:
`pred, state = nnx_predictor(model)`; `tiled_inference(v, pred, params=state)`) rather than closing over them:
closed-over arrays are baked into the compiled program, params are ordinary arguments. The predictor is a static
argument of a module-level jitted function, so the same (hashable) predictor object is compiled once per
tile shape, batch size and dtype and reused across calls and cases (jax's compile cache then keeps a
reference to the predictor object, another reason not to close over large arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from clips_jax.checks import zyx_triple
from clips_jax.errors import ConfigError, DataError
from clips_jax.model.layers import COMPUTE_DTYPES

Progress = Callable[[int, int], None]

_BLENDS = ("central", "constant", "gaussian")


# ----------------------------------------------------------------------------------------------------------
# Weight maps
# ----------------------------------------------------------------------------------------------------------


def central_weight_map(tile_shape: Sequence[int]) -> np.ndarray:
    """The original's central weighting of one tile (`inference_process_wholebody_3d`, qurit-frizi/TMTV-Net).

    Per axis c = floor(floor(T / 2) / 2); the core box is [T//2 - c, T//2 + c) (the central half of the
    tile); d = chessboard (L-infinity) distance of every voxel to the nearest core voxel
    (`scipy.ndimage.distance_transform_cdt`, core voxels d = 0); `w = 1 - sqrt(d) / sqrt(max d)`, computed
    in float64. For 128x96x96 the two z-faces get w = 0 and the y/x-face centres 1 - sqrt(24/32) ~ 0.134; for
    96^3 all six faces are 0.

    Args:
      tile_shape: (z, y, x) voxels, each >= 4 (smaller axes have an empty core).
    Returns:
      float32 array of shape `tile_shape`, values in [0, 1], 1 on the core. A tile that is all core
      (impossible for sizes >= 4) would be all ones.
    """
    t = zyx_triple(tile_shape, "tile_shape")
    if min(t) < 4:
        raise ConfigError(
            f"central_weight_map: tile_shape {t} has an axis < 4 voxels (empty core); "
            f"use a larger tile or blend='constant'"
        )
    outside = np.ones(t, dtype=bool)
    core = tuple(slice(n // 2 - (n // 2) // 2, n // 2 + (n // 2) // 2) for n in t)
    outside[core] = False
    d = ndimage.distance_transform_cdt(outside, metric="chessboard").astype(np.float64)
    dmax = d.max()
    w = np.ones(t, np.float64) if dmax == 0 else 1.0 - np.sqrt(d) / np.sqrt(dmax)
    return w.astype(np.float32)


def weight_map(tile_shape: Sequence[int], blend: str = "central", sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of one tile, float32 of shape `tile_shape`.

    blend: "central" (`central_weight_map`, the original), "constant" (all ones) or "gaussian"
    (MONAI-style separable Gaussian centred on the tile, sigma = sigma_scale * T per axis, maximum 1; never 0).
    """
    t = zyx_triple(tile_shape, "tile_shape")
    if blend == "central":
        return central_weight_map(t)
    if blend == "constant":
        return np.ones(t, np.float32)
    if blend == "gaussian":
        w = np.ones((1, 1, 1), np.float64)
        for axis, n in enumerate(t):
            i = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            g = np.exp(-0.5 * (i / (sigma_scale * n)) ** 2)
            w = w * g.reshape([-1 if a == axis else 1 for a in range(3)])
        w = w / w.max()
        return np.maximum(w, np.finfo(np.float32).tiny).astype(np.float32)
    raise ConfigError(f"blend={blend!r} unknown; use one of {_BLENDS}")


# ----------------------------------------------------------------------------------------------------------
# Tiling geometry
# ----------------------------------------------------------------------------------------------------------


def pad_to_multiple(shape: Sequence[int], tile_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Centred padding of `shape` to the next multiple of `tile_shape`: [(left, right)] per axis.

    left = floor(diff / 2), right = diff - left; diff = 0 when the size is already a multiple.
    """
    out = []
    for n, t in zip(shape, tile_shape):
        diff = -(-int(n) // int(t)) * int(t) - int(n)
        out.append((diff // 2, diff - diff // 2))
    return out


def tile_origins(
    padded_shape: Sequence[int], tile_shape: Sequence[int], step: Sequence[int], cover_end: bool = False
) -> list[tuple[int, int, int]]:
    """Tile origins (z, y, x), C order: per axis 0, step, 2*step, ... while origin + tile <= size.

    With `cover_end=True` a last origin `size - tile` is added per axis when the regular grid stops short of
    the end (MONAI behaviour, no uncovered voxels for any step). Without it (the original), a step that does
    not divide `size - tile` leaves the trailing voxels uncovered (zero weight -> probabilities (0, 0)).
    """
    per_axis = []
    for n, t, s in zip(padded_shape, tile_shape, step):
        o = list(range(0, int(n) - int(t) + 1, int(s)))
        if cover_end and o and o[-1] + t < n:
            o.append(int(n) - int(t))
        per_axis.append(o)
    return list(itertools.product(*per_axis))


# ----------------------------------------------------------------------------------------------------------
# The compiled tile function
# ----------------------------------------------------------------------------------------------------------


def _tile_probs_impl(predictor, dtype_name, with_params, groups, params, x):
    """softmax(predictor(x)) in float32, over each of `groups` consecutive channel groups of equal size (1: over
    all K channels); x is cast to the compute dtype first."""
    x = x.astype(COMPUTE_DTYPES[dtype_name])
    logits = (predictor(params, x) if with_params else predictor(x)).astype(jnp.float32)
    if groups == 1:
        return jax.nn.softmax(logits, axis=-1)
    k = logits.shape[-1]
    if k % groups:
        raise ConfigError(f"softmax_groups={groups}: the predictor's {k} output channels do not split into {groups}")
    grouped = jax.nn.softmax(logits.reshape(*logits.shape[:-1], groups, k // groups), axis=-1)
    return grouped.reshape(logits.shape)


_tile_probs = jax.jit(_tile_probs_impl, static_argnums=(0, 1, 2, 3))


def _hashable(obj: Any) -> bool:
    """Whether `obj` can be a static (cached) jit argument; unhashable predictors get private jits."""
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _make_prob_fn(predictor: Callable, params: Any, dtype: str, groups: int = 1) -> Callable[[np.ndarray], jax.Array]:
    """A function tile-batch -> probabilities, compiled once per (predictor, dtype, groups, batch shape)."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} unknown; use one of {tuple(COMPUTE_DTYPES)}")
    with_params = params is not None
    if not _hashable(predictor):  # a private jit (compiled once per call of tiled_inference)
        private = jax.jit(functools.partial(_tile_probs_impl, predictor, dtype, with_params, groups))
        return lambda x: private(params, x)
    return lambda x: _tile_probs(predictor, dtype, with_params, groups, params, x)


def tile_overlap(
    origin: Sequence[int], tile: Sequence[int], left: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where a tile at `origin` (padded-grid coordinates) meets the unpadded volume.

    The padded grid is the volume shifted by `left` (centred zero padding, `pad_to_multiple`). Returns
    (volume slices, tile slices), one per axis, selecting the same voxels in the volume and in the tile;
    the rest of the tile lies in the zero padding. An empty overlap gives empty slices.
    """
    vol_sl, tile_sl = [], []
    for o, t, lo, n in zip(origin, tile, left, shape):
        a, b = max(o - lo, 0), min(o - lo + t, n)
        b = max(a, b)
        vol_sl.append(slice(a, b))
        tile_sl.append(slice(a - (o - lo), b - (o - lo)))
    return tuple(vol_sl), tuple(tile_sl)


def _tiled_pass(
    volume: np.ndarray,
    prob_fn,
    tile: tuple,
    step: tuple,
    batch_size: int,
    w: np.ndarray,
    cover_end: bool,
    progress: Progress | None,
    done: int,
    total: int,
) -> tuple[np.ndarray, int]:
    """One blended pass over `volume` (D, H, W, C); returns (probabilities (D, H, W, K) float32, done).

    Memory: the padded volume is never built. Each tile is cut from `volume` (which may be a non-contiguous
    view, e.g. a TTA flip) into a zero-filled batch buffer, so the part of a tile reaching into the centred
    padding reads zeros exactly as `np.pad` would; the accumulators cover only the unpadded volume (padding
    voxels are cropped anyway), float32 `(D, H, W, K)` + `(D, H, W)`, and the first one is returned as the
    result. Every voxel of the volume receives the same float32 terms in the same order as with a padded
    accumulator, so the values are bit-identical to pad -> accumulate -> crop.
    """
    shape = volume.shape[:3]
    pads = pad_to_multiple(shape, tile)
    left = [p[0] for p in pads]
    padded_shape = [n + a + b for n, (a, b) in zip(shape, pads)]
    origins = tile_origins(padded_shape, tile, step, cover_end)
    acc = None
    wsum = np.zeros(shape, np.float32)
    expect = (batch_size,) + tile

    def accumulate(out, batch_overlaps):
        nonlocal acc, done
        probs = np.asarray(out)
        if acc is None:
            acc = np.zeros(shape + (probs.shape[-1],), np.float32)
        for j, (vol_sl, tile_sl) in enumerate(batch_overlaps):
            wt = w[tile_sl]
            acc[vol_sl] += probs[j][tile_sl] * wt[..., None]
            wsum[vol_sl] += wt
        done += len(batch_overlaps)
        if progress is not None:
            progress(done, total)

    pending = None
    for b in range(0, len(origins), batch_size):
        overlaps = [tile_overlap(o, tile, left, shape) for o in origins[b : b + batch_size]]
        # A fresh buffer per batch: the previous one may still be read by the asynchronous model call.
        batch = np.zeros(expect + (volume.shape[-1],), np.float32)  # padding and the last batch's spare tiles: 0
        for j, (vol_sl, tile_sl) in enumerate(overlaps):
            batch[j][tile_sl] = volume[vol_sl]
        out = prob_fn(batch)  # dispatched asynchronously; host work on the previous batch overlaps it
        if out.ndim != 5 or tuple(out.shape[:4]) != expect:
            raise ConfigError(
                f"predictor returned shape {tuple(out.shape)} for input {batch.shape}; "
                f"expected logits {expect + ('K',)}"
            )
        if pending is not None:
            accumulate(*pending)
        pending = (out, overlaps)
    if pending is not None:
        accumulate(*pending)
    zero = wsum <= 0
    wsum[zero] = 1.0
    acc /= wsum[..., None]
    acc[zero] = 0.0  # zero-weight rule: probabilities (0, 0) -> background
    return acc, done


TILE_BATCHES_PER_CALL = 8
"""Tile batches per compiled call of the device pass (`_device_pass`): progress is reported between calls."""


def tiles_on_device_default() -> bool:
    """Whether `tiled_inference(tiles_on_device=None)` keeps the volume on the device: on accelerators only.

    On a GPU the host path's per-tile cutting, transfers and numpy blending cost more than the network
    (measured on an H200, BENCHMARKS.md "GPU suite": ~10 of the 16 s of stage B); on CPU the host path is
    the lighter one (no padded copy of the volume, accumulators over the unpadded volume only).
    """
    return jax.default_backend() != "cpu"


def _device_chunk_impl(predictor, dtype_name, with_params, groups, tile, params, acc, wsum, vol, w, origins, valid, n):
    """`n` tile batches of the device pass: cut, predict, blend, all on the device.

    vol `(Dp, Hp, Wp, C)` the zero-padded volume; acc `(Dp, Hp, Wp, K)` and wsum `(Dp, Hp, Wp)` float32
    accumulators (donated); w `tile` float32 weight map; origins `(n_max, B, 3)` int32 padded-grid tile
    origins, valid `(n_max, B)` float32 (0 for the spare tiles of the last batch); n <= n_max batches run.
    Tiles are blended one after another in origin order, as in the host pass.
    """
    c = vol.shape[-1]

    def cut(o):
        return jax.lax.dynamic_slice(vol, (o[0], o[1], o[2], 0), (*tile, c))

    def body(i, carry):
        acc, wsum = carry
        probs = _tile_probs_impl(predictor, dtype_name, with_params, groups, params, jax.vmap(cut)(origins[i]))
        for j in range(origins.shape[1]):
            o = origins[i, j]
            wt = w * valid[i, j]
            a = jax.lax.dynamic_slice(acc, (o[0], o[1], o[2], 0), (*tile, acc.shape[-1]))
            acc = jax.lax.dynamic_update_slice(acc, a + probs[j] * wt[..., None], (o[0], o[1], o[2], 0))
            s = jax.lax.dynamic_slice(wsum, (o[0], o[1], o[2]), tile)
            wsum = jax.lax.dynamic_update_slice(wsum, s + wt, (o[0], o[1], o[2]))
        return acc, wsum

    return jax.lax.fori_loop(0, n, body, (acc, wsum))


@functools.lru_cache(maxsize=32)
def _device_chunk_cached(predictor, dtype_name, with_params, groups, tile):
    return jax.jit(
        functools.partial(_device_chunk_impl, predictor, dtype_name, with_params, groups, tile), donate_argnums=(1, 2)
    )


def _device_tiler(
    predictor, params, dtype: str, tile: tuple, batch_size: int, channels: int, groups: int = 1
) -> tuple[Callable, int]:
    """(the compiled chunk function of the device pass, the number of classes K), made once per
    `tiled_inference` call: the chunk is shared across calls for a hashable predictor (one compile per shape),
    private to this call otherwise; K comes from tracing the predictor once (raises ConfigError for a wrong
    output shape)."""
    with_params = params is not None
    shape = (batch_size, *tile, channels)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    if _hashable(predictor):
        chunk = _device_chunk_cached(predictor, dtype, with_params, groups, tile)
        probe = jax.eval_shape(lambda p, v: _tile_probs(predictor, dtype, with_params, groups, p, v), params, x)
    else:
        chunk = _device_chunk_cached.__wrapped__(predictor, dtype, with_params, groups, tile)
        probe = jax.eval_shape(lambda p, v: _tile_probs_impl(predictor, dtype, with_params, groups, p, v), params, x)
    if probe.ndim != 5 or tuple(probe.shape[:4]) != shape[:4]:
        raise ConfigError(
            f"predictor returned shape {tuple(probe.shape)} for input {shape}; expected logits {(*shape[:4], 'K')}"
        )
    return chunk, int(probe.shape[-1])


@functools.partial(jax.jit, static_argnums=(2,))
def _device_finish(acc, wsum, crop):
    """acc / wsum with the zero-weight rule, cropped to the unpadded volume: `(D, H, W, K)` float32."""
    sl = tuple(slice(a, a + n) for a, n in crop)
    acc, wsum = acc[sl], wsum[sl]
    zero = wsum <= 0
    return jnp.where(zero[..., None], 0.0, acc / jnp.where(zero, 1.0, wsum)[..., None])


def _device_pass(
    volume: np.ndarray,
    tiler: tuple[Callable, int],
    params,
    tile: tuple,
    step: tuple,
    batch_size: int,
    w: np.ndarray,
    cover_end: bool,
    progress: Progress | None,
    done: int,
    total: int,
) -> tuple[np.ndarray, int]:
    """`_tiled_pass` with the padded volume and the accumulators on the default device: the same tiles,
    weights and tile order (so the same result up to float32 rounding), cut and blended inside compiled
    calls of TILE_BATCHES_PER_CALL batches (`tiler`: `_device_tiler`'s chunk function and K). Device memory:
    the padded volume, `(Dp, Hp, Wp, K)` + `(Dp, Hp, Wp)` float32 accumulators and the model's activations.
    Returns (probabilities (D, H, W, K) float32, done)."""
    shape = volume.shape[:3]
    pads = pad_to_multiple(shape, tile)
    padded_shape = tuple(n + a + b for n, (a, b) in zip(shape, pads))
    origins = np.asarray(tile_origins(padded_shape, tile, step, cover_end), np.int32).reshape(-1, 3)
    n_batches = -(-len(origins) // batch_size)
    per_call = TILE_BATCHES_PER_CALL
    n_calls = -(-n_batches // per_call)
    slots = n_calls * per_call * batch_size
    o = np.zeros((slots, 3), np.int32)
    o[: len(origins)] = origins
    valid = np.zeros(slots, np.float32)
    valid[: len(origins)] = 1.0
    o = o.reshape(n_calls, per_call, batch_size, 3)
    valid = valid.reshape(n_calls, per_call, batch_size)
    vol = jnp.pad(jnp.asarray(volume), tuple(pads) + ((0, 0),))
    chunk, n_classes = tiler
    acc = jnp.zeros(padded_shape + (n_classes,), jnp.float32)
    wsum = jnp.zeros(padded_shape, jnp.float32)
    w_dev = jnp.asarray(w)
    for k in range(n_calls):
        n = min(per_call, n_batches - k * per_call)
        acc, wsum = chunk(params, acc, wsum, vol, w_dev, o[k], valid[k], np.int32(n))
        done += int(valid[k].sum())
        if progress is not None:
            progress(done, total)
    out = _device_finish(acc, wsum, tuple((a, n) for (a, _), n in zip(pads, shape)))
    return np.array(jax.device_get(out)), done  # a writable host copy (TTA sums into it)


def tiled_inference(
    volume: np.ndarray,
    predictor: Callable,
    *,
    tile_shape: Sequence[int] = (128, 96, 96),
    step: Sequence[int] = (64, 48, 48),
    batch_size: int = 1,
    blend: str = "central",
    dtype: str = "float32",
    tta: bool = False,
    progress: Progress | None = None,
    params: Any = None,
    cover_end: bool = False,
    tiles_on_device: bool | None = None,
    softmax_groups: int = 1,
    on_pass: Callable[[tuple[bool, bool, bool], np.ndarray], None] | None = None,
) -> np.ndarray:
    """Whole-volume class probabilities by overlapping tiles (the original TMTV-Net dense inference).

    Args:
      volume: `(D, H, W, C)` float (cast to float32 on the host), the network input channels on one grid.
      predictor: `f(x) -> logits`, or `f(params, x)` if `params` is given; x `(batch_size, *tile_shape, C)`,
        logits `(batch_size, *tile_shape, K)`. Traced once under `jax.jit` (see module docstring).
      tile_shape: tile size (z, y, x) in voxels; stage A 128x96x96, stage B 96^3. For a U-Net each size must
        be divisible by 16.
      step: distance between tile origins (z, y, x); the original uses tile / 2 (50 % overlap).
      batch_size: tiles per model call (fixed; the last batch is padded with zero tiles, results discarded).
      blend: "central" (original weight map, zero on the tile's outer faces), "constant" or "gaussian".
      dtype: compute dtype of the tiles fed to the predictor, "float32" or "bfloat16" (the predictor's own
        weights keep their dtype); softmax and accumulation are always float32.
      tta: average the probabilities of all 8 flip combinations of the 3 spatial axes (each pass tiles the
        flipped volume, its result is flipped back). 8x the cost.
      progress: optional callback `progress(tiles_done, tiles_total)` after every batch.
      params: optional pytree passed to the predictor as a traced argument (model weights).
      cover_end: add a last tile flush with the end of each axis when `step` does not reach it (not in the
        original; irrelevant when step divides the padded size minus the tile, e.g. step = tile / 2).
      tiles_on_device: keep the padded volume and the accumulators on the default device and cut, predict and
        blend inside compiled calls (`_device_pass`); False: cut and blend on the host (`_tiled_pass`, the
        lighter one in memory); None (default): `tiles_on_device_default()`, i.e. on accelerators. Both give
        the same result up to float32 rounding (tested).
      softmax_groups: the softmax runs over each of this many consecutive, equal channel groups of the logits
        (1: over all K). E.g. an ensemble predictor returning its own 2 logits followed by each member's 2
        (`Ensemble.logits_with_members`) with `softmax_groups = 1 + n_members` gives every member's
        probabilities in the same pass (channels 2g, 2g + 1 = group g).
      on_pass: optional `on_pass(flip, probs)` after every TTA pass (once without TTA), with the flip
        (z, y, x) and that pass's `(D, H, W, K)` probabilities flipped back (read-only: copy what you keep),
        e.g. to measure how much the flips disagree.
    Returns:
      `(D, H, W, K)` float32 probabilities; each voxel sums to 1, except zero-weight voxels which are all 0:
      with blend="central" these are the outer planes of the *padded* volume (z-planes for 128x96x96, all
      faces for 96^3), i.e. real data only on sides that needed no padding; and voxels no tile covers.
      With tta=True and an odd padding difference the padding (and so the zero planes) is not
      flip-symmetric, as in the original.
    Raises:
      DataError if `volume` is not 4-D or not finite; ConfigError for bad tile/step/batch/blend/dtype or a
      predictor returning the wrong shape.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 4:
        raise DataError(f"tiled_inference: volume shape {vol.shape} must be (D, H, W, C)")
    if not all(np.isfinite(vol[z : z + 16]).all() for z in range(0, vol.shape[0], 16)):  # slabs: no full-size mask
        raise DataError("tiled_inference: volume contains NaN or Inf; check the input images")
    tile = zyx_triple(tile_shape, "tile_shape")
    stp = zyx_triple(step, "step")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    w = weight_map(tile, blend)
    if int(softmax_groups) < 1:
        raise ConfigError(f"softmax_groups={softmax_groups} must be >= 1")
    prob_fn = _make_prob_fn(predictor, params, dtype, int(softmax_groups))
    on_device = tiles_on_device_default() if tiles_on_device is None else bool(tiles_on_device)
    if on_device:
        tiler = _device_tiler(predictor, params, dtype, tile, int(batch_size), vol.shape[-1], int(softmax_groups))
    flips = list(itertools.product((False, True), repeat=3)) if tta else [(False, False, False)]
    padded_shape = [n + left + right for n, (left, right) in zip(vol.shape[:3], pad_to_multiple(vol.shape[:3], tile))]
    total = len(flips) * len(tile_origins(padded_shape, tile, stp, cover_end))
    result, done = None, 0
    for flip in flips:
        axes = tuple(a for a in range(3) if flip[a])
        v = np.flip(vol, axes) if axes else vol
        if on_device:
            p, done = _device_pass(
                np.ascontiguousarray(v),
                tiler,
                params,
                tile,
                stp,
                int(batch_size),
                w,
                cover_end,
                progress,
                done,
                total,
            )
        else:
            p, done = _tiled_pass(v, prob_fn, tile, stp, int(batch_size), w, cover_end, progress, done, total)
        p = np.flip(p, axes) if axes else p
        if on_pass is not None:
            view = p.view()
            view.flags.writeable = False
            on_pass(flip, view)
        if result is None:
            result = np.ascontiguousarray(p)  # the pass's own accumulator: no copy (the first pass is unflipped)
        else:
            result += p  # in place: same float32 sums as result + p
        del p
    if len(flips) > 1:
        result /= len(flips)
    return result


def sliding_window_inference(
    inputs: np.ndarray,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Callable,
    overlap: float = 0.5,
    mode: str = "central",
    *,
    dtype: str = "float32",
    tta: bool = False,
    progress: Progress | None = None,
    params: Any = None,
) -> np.ndarray:
    """MONAI-like front end of `tiled_inference` (same names as `monai.inferers.sliding_window_inference`).

    Mapping: `roi_size` -> tile_shape; `sw_batch_size` -> batch_size; step per axis =
    max(1, int(roi * (1 - overlap))) (MONAI's scan interval; overlap 0.5 with even roi = the original's
    tile / 2); `mode` -> blend ("central" default, or MONAI's "constant" / "gaussian" with sigma_scale 0.125).
    Differences from MONAI: channels-last arrays, the output is softmax *probabilities* (not raw predictor
    outputs), the volume is padded to a multiple of the roi (centred zeros) rather than to at least the roi,
    and a last window flush with the end of each axis is always added (`cover_end=True`).

    Args:
      inputs: `(N, D, H, W, C)` or `(D, H, W, C)` float.
      roi_size, sw_batch_size, predictor, overlap (in [0, 1)), mode: see above.
      dtype, tta, progress, params: as `tiled_inference` (progress restarts for every sample).
    Returns:
      probabilities `(N, D, H, W, K)` or `(D, H, W, K)` float32, matching the input rank.
    """
    if not 0.0 <= float(overlap) < 1.0:
        raise ConfigError(f"overlap={overlap} must be in [0, 1)")
    roi = zyx_triple(roi_size, "roi_size")
    step = tuple(max(1, int(r * (1.0 - float(overlap)))) for r in roi)
    arr = np.asarray(inputs)
    if arr.ndim not in (4, 5):
        raise DataError(f"sliding_window_inference: inputs shape {arr.shape} must be (N, D, H, W, C) or (D, H, W, C)")
    kw = dict(
        tile_shape=roi,
        step=step,
        batch_size=sw_batch_size,
        blend=mode,
        dtype=dtype,
        tta=tta,
        progress=progress,
        params=params,
        cover_end=True,
    )
    if arr.ndim == 4:
        return tiled_inference(arr, predictor, **kw)
    return np.stack([tiled_inference(a, predictor, **kw) for a in arr])


# ----------------------------------------------------------------------------------------------------------
# Post-processing and cascade helpers
# ----------------------------------------------------------------------------------------------------------


def argmax_mask(probs: np.ndarray) -> np.ndarray:
    """Class index per voxel, uint8 `(D, H, W)`, from probabilities `(D, H, W, K)`.

    Ties go to the lower class index; for K = 2 lesion <=> p1 > p0 (so zero-weight voxels with (0, 0) are
    background), the only threshold of the original pipeline.
    """
    p = np.asarray(probs)
    if p.ndim != 4:
        raise DataError(f"argmax_mask: probabilities shape {p.shape} must be (D, H, W, K)")
    out = np.empty(p.shape[:3], np.uint8)
    for z in range(0, p.shape[0], 16):  # slabs: no full-size int64 index array
        out[z : z + 16] = np.argmax(p[z : z + 16], axis=-1)
    return out


def _linear_axis(x: np.ndarray, axis: int, n_out: int, scale: float) -> np.ndarray:
    """SimpleITK-style linear resampling along one axis at continuous source index i * scale.

    Source positions outside [-0.5, n_in - 0.5) give 0; inside, neighbours are clamped to [0, n_in - 1].
    """
    n_in = x.shape[axis]
    c = np.arange(n_out, dtype=np.float64) * scale
    inside = (c >= -0.5) & (c < n_in - 0.5)
    i0 = np.floor(c).astype(np.int64)
    f = c - i0
    a = np.take(x, np.clip(i0, 0, n_in - 1), axis=axis)
    b = np.take(x, np.clip(i0 + 1, 0, n_in - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = n_out
    f = f.reshape(shape)
    return np.where(inside.reshape(shape), a * (1.0 - f) + b * f, 0.0)


def upsample_probability(
    prob6: np.ndarray,
    native_shape: Sequence[int],
    native_spacing_mm: Sequence[float],
    coarse_spacing_mm: float | Sequence[float] = 6.0,
) -> np.ndarray:
    """Stage-A coarse probability -> native PET grid (the refiner's cascade channel; `inference_fn` in
    `main/main.py` of qurit-frizi/TMTV-Net).

    Index-space mapping: native voxel i sits at continuous coarse index i * s_native / s_coarse per axis (both
    grids share voxel 0, the coarse grid being `Geometry.resampled` of the native one). Trilinear
    interpolation with SimpleITK `Resample` semantics: a position outside [-0.5, n - 0.5) on any axis gives 0;
    inside that band neighbours are clamped to the edge (so [-0.5, 0) takes the first voxel's value).

    Args:
      prob6: `(d, h, w)` coarse lesion probability.
      native_shape: `(z, y, x)` native PET voxels.
      native_spacing_mm: `(z, y, x)` native spacing in mm (positive).
      coarse_spacing_mm: coarse spacing in mm, one number or (z, y, x); default 6.
    Returns:
      `(z, y, x)` float32 (computed in float64), values within the range of `prob6` or 0.
    """
    p = np.asarray(prob6, dtype=np.float64)
    if p.ndim != 3:
        raise DataError(f"upsample_probability: coarse probability shape {p.shape} must be (d, h, w)")
    shape = zyx_triple(native_shape, "native_shape")
    sn = np.broadcast_to(np.asarray(native_spacing_mm, np.float64), (3,))
    sc = np.broadcast_to(np.asarray(coarse_spacing_mm, np.float64), (3,))
    if not (np.all(np.isfinite(sn)) and np.all(sn > 0) and np.all(np.isfinite(sc)) and np.all(sc > 0)):
        raise DataError(f"upsample_probability: spacings {tuple(sn)} / {tuple(sc)} mm must be positive")
    for axis in range(3):
        p = _linear_axis(p, axis, shape[axis], sn[axis] / sc[axis])
    return p.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# NNX models as predictors
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NNXPredictor:
    """Predictor `(state, x) -> logits` rebuilding an NNX model from its graph definition inside `jit`.

    Hashable by the graph definition (and the method name), so every model of the same architecture shares one
    compiled tile function; the weights travel as the traced `params` argument of `tiled_inference`.
    `method`: the model's method to call, "__call__" (the logits) or e.g. "logits_with_members" of an
    `Ensemble`.
    """

    graphdef: Any
    method: str = "__call__"

    def __call__(self, state: Any, x: jax.Array) -> jax.Array:
        from flax import nnx

        return getattr(nnx.merge(self.graphdef, state), self.method)(x)


def nnx_predictor(model: Any, method: str = "__call__") -> tuple[NNXPredictor, Any]:
    """Split an NNX model (`x (B, D, H, W, C) -> logits`) into `(predictor, params)` for `tiled_inference`.

    Usage: `pred, state = nnx_predictor(model); probs = tiled_inference(volume, pred, params=state)`.
    `method`: another method of the model with the same input, e.g. `Ensemble.logits_with_members`.
    """
    from flax import nnx

    if not callable(getattr(model, method, None)):
        raise ConfigError(f"{type(model).__name__} has no method {method!r}")
    graphdef, state = nnx.split(model)
    return NNXPredictor(graphdef, method), state


def is_predictor_pair(model: Any) -> bool:
    """Whether `model` is a `(predictor, params)` pair (a 2-tuple whose first item is callable)."""
    return isinstance(model, tuple) and len(model) == 2 and callable(model[0])


def as_predictor(model: Any) -> tuple[Callable, Any]:
    """`(predictor, params)` for `tiled_inference` from what callers hold as "the model".

    Args:
      model: a `(predictor, params)` pair (returned as is; `params` may be None for `predictor(x)`), a Flax
        NNX module (`nnx_predictor`: one compilation per architecture, weights as a traced argument), or a
        plain callable `predictor(x (B, D, H, W, C) float32) -> logits (B, D, H, W, K)` (params None).
    Raises:
      ConfigError for anything else.
    """
    from flax import nnx

    if is_predictor_pair(model):
        return model[0], model[1]
    if isinstance(model, nnx.Module):
        return nnx_predictor(model)
    if callable(model):
        return model, None
    raise ConfigError(f"model {type(model).__name__}: pass an NNX module, a (predictor, params) pair or a callable")
