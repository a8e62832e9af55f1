"""Whole-volume evaluation of a model on case-store cases: tiled inference -> one metric row per case.

Where this fits: the one evaluation loop of the project, between the data (`clips_jax.data`: the case store
and `make_eval_cases`) and tiled inference (`clips_jax.inference.tiled_inference`) below it, and its three
users above it:

* `clips_jax.trainer.evaluate_cases`: validation during training (`validation_row`);
* `clips_jax.experiments.compare_curricula.evaluate_test`: test evaluation of a finished run (`test_row`);
* `clips_jax.experiments.teacher.score_cases`: the transfer teacher's per-case loss (`predict_cases` +
  `teacher_row`).

Per case: the 5 image channels of the stored grid plus the model's extra input channels (`model_channels`:
the refiner's stage-A lesion probability) -> `tiled_inference(..., cover_end=True)` with central blending ->
lesion probability `(z, y, x)` float32 -> a row function `row_fn(prob, case) -> dict` of floats.

Tiles reach the end of every axis (`cover_end=True`: a last tile flush with the end is added where the step
does not land there, as MONAI's `sliding_window_inference` does). Without it (the original TMTV-Net tiling,
`main/main.py` `inference_process_wholebody_3d` in the original repository) a step that does not divide the
padded size minus the tile leaves the trailing voxels without any tile; they get probability (0, 0), i.e.
background, so false positives there are never counted (the project's earlier default validation tiles, 32^3
every 24 voxels on a 163 x 68 x 68 phantom, left 9.8 % of every case uncovered). `check_coverage` refuses, per
case and before running the network, tilings that leave any voxel with zero total blending weight other than
the outer planes of the padded volume (the zero faces of the central weight map, documented in
`clips_jax.inference.central_weight_map` and `tiled_inference`).

This module imports neither the trainer nor the curricula; the pure per-case teacher losses live in
`clips_jax.metrics.case_losses`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from clips_jax import batch
from clips_jax.checks import zyx_triple
from clips_jax.data.pipeline import make_eval_cases
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError
from clips_jax.inference import (
    as_predictor,
    is_predictor_pair,
    pad_to_multiple,
    tile_origins,
    tile_overlap,
    tiled_inference,
    weight_map,
)
from clips_jax.metrics import case_metrics, dice
from clips_jax.metrics.case_losses import case_loss
from clips_jax.metrics.lesions import fpv_fnv_ml, lesion_overlaps

RowFn = Callable[[np.ndarray, Mapping[str, Any]], dict]
"""`row_fn(prob, case) -> {metric: value}`: prob `(z, y, x)` float32 lesion probability, case a dict of
`clips_jax.data.pipeline.make_eval_cases`."""

IMAGE_CHANNELS = 5
"""Image input channels of every model: [ct, suv, ct_lung, ct_soft, suv_hot] (`clips_jax.data.channels`)."""


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def model_channels(model: Any) -> tuple[str, ...]:
    """The extra input channels a model takes after the `IMAGE_CHANNELS` image channels, in order.

    Args:
      model: a Flax NNX module (`x (N, D, H, W, C) -> logits (N, D, H, W, 2)`), or a `(predictor, params)`
        pair as `clips_jax.inference.tiled_inference` takes it.
    Returns:
      `("stage_a",)` (the stage-A lesion probability on the same grid, a per-case array of the case store)
      for a `clips_jax.model.Refiner`; `()` for any other module and for a pair (whose input channels cannot
      be seen: pass `extra_channels` explicitly where one needs more).
    Raises:
      ConfigError for anything that is neither an NNX module nor a pair.
    """
    if is_predictor_pair(model):
        return ()
    from flax import nnx

    from clips_jax.model import Refiner

    if not isinstance(model, nnx.Module):
        raise ConfigError(f"model {type(model).__name__}: pass an NNX module or a (predictor, params) pair")
    return ("stage_a",) if isinstance(model, Refiner) else ()


# ---------------------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------------------


def _axis_origins(
    padded_shape: Sequence[int], tile: Sequence[int], step: Sequence[int], cover_end: bool
) -> list[list[int]]:
    """Per axis, the sorted tile origins of `tile_origins` (which is their Cartesian product)."""
    origins = tile_origins(padded_shape, tile, step, cover_end)
    return [sorted({o[a] for o in origins}) for a in range(3)]


def _separable_support(w: np.ndarray) -> list[np.ndarray] | None:
    """Per-axis boolean vectors q_a with (w > 0) == q_z (x) q_y (x) q_x (outer AND), or None if the positive
    set of the weight map is not such a product.

    The central weight map is 1 - sqrt(d)/sqrt(max d) with d the chessboard distance to the core box, and the
    chessboard distance to a box is the maximum of the per-axis distances, so its zero set is a union of
    per-axis slabs (the faces of the axes whose half-margin equals the largest one) and its positive set such
    a product; "constant" and "gaussian" maps are positive everywhere. This is checked, not assumed.
    """
    pos = np.asarray(w) > 0
    q = [pos.any(axis=tuple(b for b in range(3) if b != a)) for a in range(3)]
    prod = q[0][:, None, None] & q[1][None, :, None] & q[2][None, None, :]
    return q if np.array_equal(prod, pos) else None


@functools.lru_cache(maxsize=128)
def _coverage_gaps(
    shape: tuple[int, int, int], tile: tuple[int, int, int], step: tuple[int, int, int], blend: str, cover_end: bool
) -> tuple[int, str]:
    """(voxels of the volume with zero total blending weight beyond the padded volume's outer planes,
    a short description of where); (0, "") when there are none."""
    pads = pad_to_multiple(shape, tile)
    left = [p[0] for p in pads]
    padded = [n + a + b for n, (a, b) in zip(shape, pads)]
    w = weight_map(tile, blend)
    # Outer planes of the padded volume: zero weight is allowed there (the original's zero-weight faces). They
    # hold real voxels only on the sides that needed no padding.
    allowed = []
    for n, (a, b) in zip(shape, pads):
        v = np.zeros(n, bool)
        if a == 0:
            v[0] = True
        if b == 0:
            v[-1] = True
        allowed.append(v)
    q = _separable_support(w)
    if q is not None:
        # weight sum > 0 at v  <=>  on every axis some covering tile origin o has q_a[v_a - o]
        good = []
        for a, origins in enumerate(_axis_origins(padded, tile, step, cover_end)):
            g = np.zeros(padded[a], bool)
            for o in origins:
                g[o : o + tile[a]] |= q[a]
            good.append(g[left[a] : left[a] + shape[a]])
        # bad voxel: some axis not good, and on no allowed plane
        free = [~al for al in allowed]
        n_bad = math.prod(int(f.sum()) for f in free) - math.prod(int((g & f).sum()) for g, f in zip(good, free))
        if n_bad == 0:
            return 0, ""
        where = []
        for a, name in enumerate("zyx"):
            planes = np.flatnonzero(~good[a] & free[a])
            if planes.size:
                shown = ", ".join(str(int(p)) for p in planes[:6]) + (", ..." if planes.size > 6 else "")
                where.append(f"{name} = {shown}")
        return n_bad, "volume planes " + "; ".join(where)
    # Not a product (no built-in blend): accumulate the positive support of every tile (booleans, volume-sized).
    pos = w > 0
    covered = np.zeros(shape, bool)
    for o in tile_origins(padded, tile, step, cover_end):
        vol_sl, tile_sl = tile_overlap(o, tile, left, shape)
        covered[vol_sl] |= pos[tile_sl]
    bad = ~covered
    bad &= ~allowed[0][:, None, None]
    bad &= ~allowed[1][None, :, None]
    bad &= ~allowed[2][None, None, :]
    n_bad = int(bad.sum())
    if n_bad == 0:
        return 0, ""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return n_bad, f"first voxel (z, y, x) = {first}"


def check_coverage(
    shape: Sequence[int],
    tile_shape: Sequence[int],
    step: Sequence[int],
    *,
    blend: str = "central",
    case: str = "",
    cover_end: bool = True,
) -> None:
    """Refuse a tiling that leaves voxels of a volume without blending weight (they would be background).

    With the tiling of `tiled_inference(..., cover_end=cover_end)` (centred zero padding to a multiple of the
    tile, origins every `step` per axis, plus a last one flush with the end when `cover_end`), a voxel's
    total weight is the sum of the blend weights (`clips_jax.inference.weight_map`) of the tiles covering it.
    Zero total weight is accepted only on the outer planes of the *padded* volume: with central blending the
    weight is 0 on the outer faces of every tile (`clips_jax.inference.central_weight_map`), so those planes
    are zero-weight in the original TMTV-Net too (`tiled_inference` documents them); they hold real voxels only
    on sides that needed no padding. Anything else, e.g. a gap of a step larger than the tile, interior planes
    where only the zero faces of neighbouring tiles meet (central blending with step >= tile - 1), or the
    trailing voxels of `cover_end=False`, is refused.

    Cost: per axis (the positive set of the built-in weight maps is a product of per-axis sets, checked from
    the tile-sized map), so O(tile + padded sizes); a non-separable map falls back to a boolean volume. Results
    are cached per (shape, tiles, step, blend, cover_end).

    Args:
      shape: volume (z, y, x) voxels.
      tile_shape, step: tile size and step (z, y, x) voxels, as `tiled_inference`.
      blend: "central" (default), "constant" or "gaussian" (`weight_map`).
      case: case id for the message.
      cover_end: the tiling checked; the evaluator always uses True (False: the original tiling).
    Raises:
      ConfigError naming the case, the shape, tiles, step, how many voxels (and where) would have zero weight,
      and what to do; also for invalid sizes.
    """
    shp, tile, stp = zyx_triple(shape, "shape"), zyx_triple(tile_shape, "tile_shape"), zyx_triple(step, "step")
    n_bad, where = _coverage_gaps(shp, tile, stp, str(blend), bool(cover_end))
    if n_bad:
        total = math.prod(shp)
        half = tuple(max(1, t // 2) for t in tile)
        raise ConfigError(
            f"case {case or '?'}: tiles {tile} every {stp} voxels (blend {blend!r}, "
            f"{'tiles reaching the end of each axis' if cover_end else 'original tiling, no tile flush with the end'})"
            f" leave {n_bad} of {total} voxels ({100.0 * n_bad / total:.2f} %) of the {shp} volume with zero "
            f"blending weight ({where}): they would be forced to background and their errors never counted. "
            f"Use a step of at most tile - 2 voxels per axis (each tile's outer faces have weight 0 with central "
            f"blending), e.g. half the tile {half} (config eval.tile_step)"
            + ("." if cover_end else ", and tiles reaching the end of each axis (cover_end=True).")
        )


# ---------------------------------------------------------------------------------------------------------
# Prediction and evaluation
# ---------------------------------------------------------------------------------------------------------


def _store(store: Any) -> CaseStore:
    return store if isinstance(store, CaseStore) else CaseStore(store)


def _predict(
    case: Mapping[str, Any], predictor: Callable, params: Any, tile: tuple, step: tuple, batch_size: int, dtype: str
) -> np.ndarray:
    """Coverage check + tiled inference of one case; lesion probability (z, y, x) float32 (own array)."""
    check_coverage(case["image"].shape[:3], tile, step, case=str(case["id"]))
    probs = tiled_inference(
        case["image"],
        predictor,
        params=params,
        tile_shape=tile,
        step=step,
        batch_size=int(batch_size),
        dtype=dtype,
        cover_end=True,
    )
    return np.array(probs[..., 1], dtype=np.float32)  # a copy: the (z, y, x, 2) array is freed


def predict_cases(
    model: Any,
    store: Any,
    indices: Sequence[int],
    *,
    tile_shape: Sequence[int],
    step: Sequence[int],
    batch_size: int = 1,
    dtype: str = "float32",
    extra_channels: Sequence[str] | None = None,
) -> Iterator[tuple[dict, np.ndarray]]:
    """Tiled inference of store cases, one at a time.

    Args:
      model: NNX module or `(predictor, params)` pair (`as_predictor`); split once for all cases.
      store: a `CaseStore` or its folder.
      indices: store indices (int sequence), in the order wanted.
      tile_shape, step: tiles and step (z, y, x) voxels of the store grid (multiples of 16 for a U-Net).
      batch_size: tiles per model call; dtype: compute dtype "float32" or "bfloat16" (`tiled_inference`).
      extra_channels: input arrays after the 5 image channels; None = `model_channels(model)` (the refiner
        gets its stage-A probability). Checked for every selected case before the first is run.
    Yields:
      `(case, prob)`: case the dict of `clips_jax.data.pipeline.make_eval_cases` ("id", "image", "label",
      "suv", "geometry", ...), prob the lesion probability `(z, y, x)` float32 in [0, 1] on the store grid
      (central blending, tiles reaching the end of every axis; 0 on the zero-weight outer planes).
    Raises:
      ConfigError when a case's tiling leaves voxels uncovered (`check_coverage`, before running it) or an
      extra channel is missing; whatever `tiled_inference` raises.
    """
    st = _store(store)
    predictor, params = as_predictor(model)
    extra = model_channels(model) if extra_channels is None else tuple(extra_channels)
    tile, stp = zyx_triple(tile_shape, "tile_shape"), zyx_triple(step, "step")
    for case in make_eval_cases(st, np.asarray(indices, dtype=np.int64).reshape(-1), extra_channels=extra):
        yield case, _predict(case, predictor, params, tile, stp, batch_size, dtype)


def evaluate_cases(
    model: Any,
    store: Any,
    indices: Sequence[int],
    *,
    tile_shape: Sequence[int],
    step: Sequence[int],
    batch_size: int = 1,
    dtype: str = "float32",
    row_fn: RowFn | None = None,
    extra_channels: Sequence[str] | None = None,
    failed: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    id_key: str = "case",
) -> list[dict]:
    """One metric row per store case: `predict_cases` then `row_fn(prob, case)`.

    Args:
      model, store, indices, tile_shape, step, batch_size, dtype, extra_channels: as `predict_cases`.
      row_fn: `row_fn(prob, case) -> dict` (`validation_row` (default), `test_row`, `teacher_row` or any).
      failed: None: an exception of any case propagates (missing extra channels are found before the first
        case is run). A dict: each failing case is recorded as `case id -> one-line error`, reported via `log`
        and skipped, and the others are evaluated (batch commands carry on).
      log: optional one-line progress sink (one line per case, and per failure).
      id_key: key of the case id in each row ("case": metrics.csv convention; the trainer uses "id").
    Returns:
      `[{id_key: case id, **row_fn(prob, case)}, ...]` in the order of `indices`, failed cases left out.
    """
    st = _store(store)
    row_fn = validation_row if row_fn is None else row_fn
    pair = as_predictor(model)
    extra = model_channels(model) if extra_channels is None else tuple(extra_channels)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    kw = dict(tile_shape=tile_shape, step=step, batch_size=batch_size, dtype=dtype, extra_channels=extra)
    rows: list[dict] = []
    t0 = time.time()

    def add(k: int, case: Mapping[str, Any], prob: np.ndarray) -> str:
        rows.append({id_key: case["id"], **row_fn(prob, case)})
        return f"evaluated ({time.time() - t0:.0f} s)"

    if failed is None:
        for k, (case, prob) in enumerate(predict_cases(pair, st, idx, **kw)):
            message = add(k, case, prob)
            if log is not None:
                log(f"[{k + 1}/{len(idx)}] {case['id']}: {message}")
        return rows
    position = {st.ids[int(i)]: k for k, i in enumerate(idx)}  # ids are unique (for_each_case checks)

    def one_case(cid: str):
        k = position[cid]
        case, prob = next(predict_cases(pair, st, idx[k : k + 1], **kw))
        return batch.done(add(k, case, prob))

    batch.for_each_case([st.ids[int(i)] for i in idx], one_case, log=log, on_failure=failed.__setitem__)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Row functions: (prob (z, y, x) float32, case dict) -> {metric: float}
# ---------------------------------------------------------------------------------------------------------


def validation_row(prob: np.ndarray, case: Mapping[str, Any]) -> dict[str, float]:
    """The trainer's validation metrics of one case (store grid; volumes in ml).

    Mask = prob > 0.5: the argmax of the two blended class probabilities (ties, e.g. the (0, 0) of zero-weight
    voxels, go to background), lesion = label > 0. Returns, in this order: "dice" (NaN for a lesion-free
    case), "tmtv_pred_ml", "tmtv_true_ml", "fpv_ml" / "fnv_ml" (autoPET false-positive / false-negative
    component volumes, 18-connectivity, `clips_jax.metrics.lesions.fpv_fnv_ml`), "tmtv_abs_err_ml"
    (|pred - true|).
    """
    pred = np.asarray(prob) > 0.5
    truth = np.asarray(case["label"]) > 0
    vox_ml = case["geometry"].voxel_volume_ml
    fpv, fnv = fpv_fnv_ml(lesion_overlaps(pred, truth), vox_ml)
    tmtv_pred, tmtv_true = float(pred.sum() * vox_ml), float(truth.sum() * vox_ml)
    return {
        "dice": dice(pred, truth) if truth.any() else float("nan"),
        "tmtv_pred_ml": tmtv_pred,
        "tmtv_true_ml": tmtv_true,
        "fpv_ml": fpv,
        "fnv_ml": fnv,
        "tmtv_abs_err_ml": abs(tmtv_pred - tmtv_true),
    }


def test_row(prob: np.ndarray, case: Mapping[str, Any]) -> dict[str, float]:
    """The full metric row of one test case: `clips_jax.metrics.case_metrics(prob > 0.5, label > 0,
    spacing_mm of the store grid, suv)` (columns of metrics.csv, docs/metrics.md)."""
    return case_metrics(np.asarray(prob) > 0.5, np.asarray(case["label"]) > 0, case["geometry"].spacing_mm, case["suv"])


test_row.__test__ = False  # not a pytest test when imported into a test module


def teacher_row(prob: np.ndarray, case: Mapping[str, Any], *, loss: str = "soft_dice") -> dict[str, float]:
    """{"teacher_loss": `clips_jax.metrics.case_losses.case_loss(prob, label, loss)`} of one case: "soft_dice"
    (1 - soft Dice of the probabilities) or "combined" (training Dice + 2 * CE); NaN for an unlabeled or
    lesion-free case. Use `functools.partial(teacher_row, loss="combined")` as a `row_fn` for the other kind."""
    return {"teacher_loss": case_loss(prob, case["label"] if case.get("labeled", True) else None, loss)}


__all__ = [
    "IMAGE_CHANNELS",
    "RowFn",
    "as_predictor",
    "check_coverage",
    "evaluate_cases",
    "model_channels",
    "predict_cases",
    "teacher_row",
    "test_row",
    "validation_row",
]
