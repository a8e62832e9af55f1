"""Tests of clips_jax.inference: weight map table, tiling, blending, zero-weight rule, batching, TTA, compile count,
cascade upsampling. Stand-in predictors only (tiny pure-JAX functions), small volumes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from clips_jax import inference as inf
from clips_jax.errors import ConfigError, DataError


def _closed_form_weights(tile):
    """Independent weight map: chessboard distance to the core box is max over axes of the 1-D distance."""
    d = np.zeros(tile)
    for a, n in enumerate(tile):
        lo, hi = n // 2 - (n // 2) // 2, n // 2 + (n // 2) // 2 - 1  # inclusive core bounds
        i = np.arange(n)
        da = np.maximum(np.maximum(lo - i, i - hi), 0).reshape([-1 if b == a else 1 for b in range(3)])
        d = np.maximum(d, da)
    return 1 - np.sqrt(d) / np.sqrt(d.max())


def test_central_weight_map_matches_reference_table():
    w = inf.central_weight_map((128, 96, 96))
    assert w.dtype == np.float32 and w.shape == (128, 96, 96)
    profile = [0, 0.065, 0.134, 0.209, 0.293, 0.388, 0.5, 0.646, 1, 1]  # z = 0, 4, ..., 36 (original central_weighting)
    np.testing.assert_allclose(w[0:40:4, 48, 48], profile, atol=1e-3)
    assert np.all(w[0] == 0) and np.all(w[127] == 0)  # the two z-faces
    np.testing.assert_allclose(w[64, 0, 48], 1 - np.sqrt(24 / 32), rtol=1e-6)  # y-face centre ~0.134
    np.testing.assert_allclose(w[64, 48, 95], 1 - np.sqrt(24 / 32), rtol=1e-6)  # x-face centre
    assert np.all(w[32:96, 24:72, 24:72] == 1) and w[31, 48, 48] < 1 and w[32:96, 24:72, 24:72].size == 64 * 48 * 48
    np.testing.assert_allclose(w, _closed_form_weights((128, 96, 96)), atol=1e-6)

    c = inf.central_weight_map((96, 96, 96))
    for face in (c[0], c[-1], c[:, 0], c[:, -1], c[:, :, 0], c[:, :, -1]):
        assert np.all(face == 0)
    assert np.all(c[24:72, 24:72, 24:72] == 1) and c[23, 48, 48] < 1
    np.testing.assert_allclose(inf.central_weight_map((8, 12, 6)), _closed_form_weights((8, 12, 6)), atol=1e-6)
    with pytest.raises(ConfigError):
        inf.central_weight_map((3, 8, 8))


def test_padding_and_tiles_cover_every_voxel():
    assert inf.pad_to_multiple(
        (
            12,
            10,
            9,
        ),
        (8, 8, 8),
    ) == [(2, 2), (3, 3), (3, 4)]
    assert inf.pad_to_multiple((16, 1, 128), (8, 8, 128)) == [(0, 0), (3, 4), (0, 0)]
    for shape, tile in [((45, 30, 50), (16, 8, 16)), ((128, 96, 96), (128, 96, 96)), ((200, 130, 97), (128, 96, 96))]:
        padded = [n + sum(p) for n, p in zip(shape, inf.pad_to_multiple(shape, tile))]
        assert all(p % t == 0 for p, t in zip(padded, tile))
        count = np.zeros(padded, int)
        step = tuple(t // 2 for t in tile)
        for o in inf.tile_origins(padded, tile, step):
            count[tuple(slice(a, a + t) for a, t in zip(o, tile))] += 1
        assert count.min() >= 1 and count.max() <= 8
    # A step that does not divide: the original grid leaves a tail uncovered, cover_end closes it.
    assert [o[0] for o in inf.tile_origins((20, 8, 8), (8, 8, 8), (5, 8, 8))] == [0, 5, 10]
    assert [o[0] for o in inf.tile_origins((20, 8, 8), (8, 8, 8), (5, 8, 8), cover_end=True)] == [0, 5, 10, 12]


def _pointwise(x):
    """Logits (0, x0): p1 = sigmoid(x0), independent of the tile."""
    return jnp.stack([jnp.zeros_like(x[..., 0]), x[..., 0]], axis=-1)


def _tile_dependent(x):
    """Logits depend on the channel value AND the position inside the tile (so blending weights matter)."""
    local = jnp.arange(x.shape[1], dtype=x.dtype)[None, :, None, None] / x.shape[1]
    return jnp.stack([jnp.zeros_like(x[..., 0]), 2.0 * x[..., 0] + 3.0 * local], axis=-1)


def _smooth(x):
    """Flip-equivariant (symmetric 3^3 box mean, zero 'SAME' padding) non-pointwise predictor."""
    s = jax.lax.reduce_window(x[..., 0], 0.0, jax.lax.add, (1, 3, 3, 3), (1, 1, 1, 1), "SAME") / 27.0
    return jnp.stack([-s, s + x[..., 1]], axis=-1)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def test_known_tile_dependent_field_is_blended_exactly():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(12, 10, 9, 1)).astype(np.float32)
    got = inf.tiled_inference(vol, _tile_dependent, tile_shape=(8, 8, 8), step=(4, 4, 4))
    # Independent expectation: padded (16, 16, 16) with left pads (2, 3, 3) (hand-computed), origins 0/4/8.
    pv = np.zeros((16, 16, 16))
    pv[2:14, 3:13, 3:12] = vol[..., 0]
    w = _closed_form_weights((8, 8, 8))
    acc, wsum = np.zeros((16, 16, 16)), np.zeros((16, 16, 16))
    for oz, oy, ox in itertools.product((0, 4, 8), repeat=3):
        sl = (slice(oz, oz + 8), slice(oy, oy + 8), slice(ox, ox + 8))
        p1 = _sigmoid(2.0 * pv[sl] + 3.0 * (np.arange(8) / 8)[:, None, None])
        acc[sl] += w * p1
        wsum[sl] += w
    acc, wsum = acc[2:14, 3:13, 3:12], wsum[2:14, 3:13, 3:12]
    assert wsum.min() > 0  # the zero-weight voxels (outer padded planes) are all cropped away here
    expect = acc / wsum
    np.testing.assert_allclose(got[..., 1], expect, atol=2e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


def test_zero_weight_rule_on_outer_planes_and_pointwise_identity():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(16, 10, 9, 1)).astype(np.float32)  # z needs no padding -> outer z-planes are real
    got = inf.tiled_inference(vol, _pointwise, tile_shape=(8, 8, 8), step=(4, 4, 4))
    assert np.all(got[0] == 0) and np.all(got[15] == 0)
    assert np.all(inf.argmax_mask(got)[[0, 15]] == 0)
    np.testing.assert_allclose(got[1:15, ..., 1], _sigmoid(vol[1:15, ..., 0].astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(got[1:15].sum(-1), 1.0, atol=1e-6)
    # With constant blending every covered voxel has weight: no zero planes.
    const = inf.tiled_inference(vol, _pointwise, tile_shape=(8, 8, 8), step=(4, 4, 4), blend="constant")
    np.testing.assert_allclose(const[..., 1], _sigmoid(vol[..., 0].astype(np.float64)), atol=1e-6)


def test_batch_size_does_not_change_the_result_and_progress_counts_tiles():
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(16, 12, 10, 2)).astype(np.float32)
    calls = []
    a = inf.tiled_inference(vol, _smooth, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=1)
    b = inf.tiled_inference(
        vol, _smooth, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=3, progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_allclose(a, b, atol=1e-6)
    n_tiles = 3 * 3 * 3  # padded (16, 16, 16): origins 0, 4, 8 per axis
    assert calls[-1] == (n_tiles, n_tiles) and len(calls) == 9


def test_tta_with_flip_equivariant_predictor_equals_no_tta():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(16, 12, 10, 2)).astype(np.float32)  # padding differences 0, 4, 6: all even
    plain = inf.tiled_inference(vol, _smooth, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=4)
    tta = inf.tiled_inference(vol, _smooth, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=4, tta=True)
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    # A predictor that is NOT flip-equivariant changes under TTA (the test can fail).
    skew = inf.tiled_inference(vol, _tile_dependent, tile_shape=(8, 8, 8), step=(4, 4, 4), tta=True)
    assert np.abs(skew - inf.tiled_inference(vol, _tile_dependent, tile_shape=(8, 8, 8), step=(4, 4, 4))).max() > 1e-3


def test_predictor_compiles_once_for_many_tiles():
    traces = []

    def counted(x):
        traces.append(x.shape)
        return _pointwise(x) * 1.5

    vol = np.random.default_rng(4).normal(size=(20, 20, 20, 1)).astype(np.float32)
    out = inf.tiled_inference(vol, counted, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=4)
    assert len(traces) == 1 and traces[0] == (4, 8, 8, 8, 1)  # 125 tiles, 32 batches (last one padded)
    inf.tiled_inference(vol, counted, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=4, tta=True)
    assert len(traces) == 1  # same predictor, same shapes: reused across calls and TTA passes
    np.testing.assert_allclose(out[2:-2, 2:-2, 2:-2, 1], _sigmoid(1.5 * vol[2:-2, 2:-2, 2:-2, 0]), atol=1e-6)


def test_params_bfloat16_and_errors():
    vol = np.random.default_rng(5).normal(size=(8, 8, 8, 1)).astype(np.float32)
    pred = lambda p, x: _pointwise(x) * p["scale"]  # noqa: E731
    f32 = inf.tiled_inference(vol, pred, tile_shape=(8, 8, 8), step=(4, 4, 4), params={"scale": 2.0}, blend="constant")
    np.testing.assert_allclose(f32[..., 1], _sigmoid(2.0 * vol[..., 0]), atol=1e-6)
    bf = inf.tiled_inference(
        vol, pred, tile_shape=(8, 8, 8), step=(4, 4, 4), params={"scale": 2.0}, blend="constant", dtype="bfloat16"
    )
    assert bf.dtype == np.float32 and np.abs(bf - f32).max() < 2e-2
    with pytest.raises(DataError):
        inf.tiled_inference(vol[..., 0], _pointwise, tile_shape=(8, 8, 8))
    with pytest.raises(ConfigError):
        inf.tiled_inference(vol, _pointwise, tile_shape=(8, 8, 8), dtype="float16")
    with pytest.raises(ConfigError):
        inf.tiled_inference(vol, lambda x: x[:, :4], tile_shape=(8, 8, 8))


def test_sliding_window_inference_mapping():
    vol = np.random.default_rng(6).normal(size=(2, 12, 10, 9, 2)).astype(np.float32)
    got = inf.sliding_window_inference(vol, (8, 8, 8), 2, _smooth, overlap=0.5)
    assert got.shape == (2, 12, 10, 9, 2)
    for n in range(2):
        ref = inf.tiled_inference(vol[n], _smooth, tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=2)
        np.testing.assert_allclose(got[n], ref, atol=1e-6)
    # overlap 0.3 -> step int(8 * 0.7) = 5, which does not divide; the end window still covers everything.
    const = inf.sliding_window_inference(vol[0], (8, 8, 8), 1, _pointwise, overlap=0.3, mode="gaussian")
    np.testing.assert_allclose(const[..., 1], _sigmoid(vol[0, ..., 0]), atol=1e-6)
    with pytest.raises(ConfigError):
        inf.sliding_window_inference(vol, (8, 8, 8), 1, _pointwise, overlap=1.0)


def test_argmax_mask_ties_go_to_background():
    p = np.array([[0, 0], [0.5, 0.5], [0.4, 0.6], [0.6, 0.4]], np.float32).reshape(1, 1, 4, 2)
    m = inf.argmax_mask(p)
    assert m.dtype == np.uint8 and m.ravel().tolist() == [0, 0, 1, 0]
    q = np.random.default_rng(9).random((37, 5, 4, 3)).astype(np.float32)  # several z-slabs, K = 3
    np.testing.assert_array_equal(inf.argmax_mask(q), np.argmax(q, axis=-1))


def test_upsample_probability_hand_values_and_scipy():
    # 1-D along z: coarse [0, 1], native 2 mm -> coarse index i/3; band ends at 1.5 (outside -> 0).
    p6 = np.array([0.0, 1.0]).reshape(2, 1, 1)
    up = inf.upsample_probability(p6, (8, 1, 1), (2.0, 6.0, 6.0))
    np.testing.assert_allclose(up.ravel(), [0, 1 / 3, 2 / 3, 1, 1, 0, 0, 0], atol=1e-6)
    assert up.dtype == np.float32

    rng = np.random.default_rng(7)
    p6 = rng.random((5, 4, 6))
    shape, sp = (14, 11, 20), (2.0, 2.5, 1.6)
    got = inf.upsample_probability(p6, shape, sp)
    coords = [np.arange(n) * s / 6.0 for n, s in zip(shape, sp)]
    inside = np.ones(shape, bool)
    for a, (c, n) in enumerate(zip(coords, p6.shape)):
        inside &= ((c >= -0.5) & (c < n - 0.5)).reshape([-1 if b == a else 1 for b in range(3)])
    ref = ndimage.map_coordinates(p6, np.meshgrid(*coords, indexing="ij"), order=1, mode="nearest") * inside
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert inside.sum() < inside.size  # the test exercises the outside-band zeros
    with pytest.raises(DataError):
        inf.upsample_probability(p6, shape, (0.0, 2.0, 2.0))


def test_nnx_predictor_matches_direct_model_call():
    from flax import nnx

    model = nnx.Conv(2, 2, kernel_size=(1, 1, 1), rngs=nnx.Rngs(0))
    vol = np.random.default_rng(8).normal(size=(8, 8, 8, 2)).astype(np.float32)
    pred, state = inf.nnx_predictor(model)
    got = inf.tiled_inference(vol, pred, params=state, tile_shape=(8, 8, 8), step=(4, 4, 4), blend="constant")
    expect = np.asarray(jax.nn.softmax(model(jnp.asarray(vol)[None]), axis=-1))[0]
    np.testing.assert_allclose(got, expect, atol=1e-6)


def test_cascade_finds_a_hot_sphere():
    from clips_jax.cascade import cascade
    from clips_jax.data.geometry import Geometry

    shape, sp = (48, 40, 40), (2.0, 2.0, 2.0)
    z, y, x = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, sp)], indexing="ij")
    sphere = (z**2 + y**2 + x**2) <= 12.0**2
    suv = np.where(sphere, 8.0, 1.0).astype(np.float32)
    ct = np.zeros(shape, np.float32)
    geom = Geometry.from_spacing(shape, sp)
    # Stand-ins: the ensemble calls lesion where suv_hot (channel 4) > 0.4; the refiner trusts the cascade
    # channel (channel 5) above 0.5.
    ens = lambda v: jnp.stack([jnp.zeros_like(v[..., 0]), 30.0 * (v[..., 4] - 0.4)], -1)  # noqa: E731
    ref = lambda v: jnp.stack([jnp.zeros_like(v[..., 0]), 30.0 * (v[..., 5] - 0.5)], -1)  # noqa: E731
    stages = set()
    res = cascade(
        ct,
        suv,
        geom,
        ens,
        ref,
        stage_a_tile=(8, 8, 8),
        stage_a_step=(4, 4, 4),
        stage_b_tile=(16, 16, 16),
        stage_b_step=(8, 8, 8),
        progress=lambda s, d, t: stages.add(s),
    )
    assert res.stage_a_geometry.shape == geom.resampled(6.0).shape == res.stage_a_prob.shape == (16, 13, 13)
    assert res.mask.shape == shape and res.mask.dtype == np.uint8 and res.probs.shape == shape + (2,)
    np.testing.assert_allclose(res.cascade_channel, inf.upsample_probability(res.stage_a_prob, shape, sp), atol=1e-6)
    dice = 2 * (res.mask.astype(bool) & sphere).sum() / (res.mask.sum() + sphere.sum())
    assert dice > 0.8, dice
    assert stages == {"A", "B"}


def _reference_tiled(vol, predictor, tile, step, batch_size, blend, cover_end, tta):
    """The straightforward algorithm (the original's `inference_process_wholebody_3d`, `main/main.py` of
    qurit-frizi/TMTV-Net): np.pad centred, every tile through `predictor` one batch
    at a time, float32 accumulation on the padded grid, zero-weight rule, crop; TTA averages the 8 flips.
    Written independently of `inference._tiled_pass` (only the weight map and the tile grid are shared,
    both tested above), as the pre-memory-optimisation implementation was."""
    w = inf.weight_map(tile, blend)
    probs = jax.jit(lambda x: jax.nn.softmax(predictor(x).astype(jnp.float32), axis=-1))
    flips = list(itertools.product((False, True), repeat=3)) if tta else [(False, False, False)]
    result = None
    for flip in flips:
        axes = tuple(a for a in range(3) if flip[a])
        v = np.flip(vol, axes) if axes else vol
        diffs = [-(-n // t) * t - n for n, t in zip(v.shape[:3], tile)]
        pads = [(d // 2, d - d // 2) for d in diffs]
        padded = np.pad(v, pads + [(0, 0)])
        per_axis = []
        for n, t, s in zip(padded.shape[:3], tile, step):
            o = list(range(0, n - t + 1, s))
            if cover_end and o[-1] + t < n:
                o.append(n - t)
            per_axis.append(o)
        origins = list(itertools.product(*per_axis))
        acc = np.zeros(padded.shape[:3] + (2,), np.float32)
        wsum = np.zeros(padded.shape[:3], np.float32)
        for b in range(0, len(origins), batch_size):
            chunk = origins[b : b + batch_size]
            x = np.zeros((batch_size,) + tile + (vol.shape[-1],), np.float32)
            for j, o in enumerate(chunk):
                x[j] = padded[tuple(slice(a, a + t) for a, t in zip(o, tile))]
            p = np.asarray(probs(x))
            for j, o in enumerate(chunk):
                sl = tuple(slice(a, a + t) for a, t in zip(o, tile))
                acc[sl] += p[j] * w[..., None]
                wsum[sl] += w
        zero = wsum <= 0
        acc = np.where(zero[..., None], 0.0, acc / np.where(zero, 1.0, wsum)[..., None]).astype(np.float32)
        crop = tuple(slice(a, n - b) for (a, b), n in zip(pads, padded.shape[:3]))
        out = np.flip(acc[crop], axes) if axes else acc[crop]
        result = out.copy() if result is None else result + out
    return result / len(flips) if tta else result


@pytest.mark.parametrize(
    "shape, tile, step, batch_size, blend, cover_end, tta",
    [
        ((13, 11, 9), (8, 8, 8), (4, 4, 4), 1, "central", False, False),  # odd padding on every axis
        ((13, 11, 9), (8, 8, 8), (4, 4, 4), 3, "central", False, True),  # TTA, odd pads (not flip-symmetric)
        ((17, 10, 7), (8, 8, 8), (3, 5, 6), 2, "central", False, False),  # steps that leave tails uncovered
        ((17, 10, 7), (8, 8, 8), (3, 5, 6), 4, "gaussian", True, False),  # cover_end closes the tails
        ((9, 15, 12), (8, 12, 8), (5, 4, 3), 5, "constant", True, True),  # non-cubic tile, TTA + cover_end
        ((16, 8, 5), (8, 8, 8), (8, 8, 8), 2, "central", False, False),  # no padding on z/y, no overlap
    ],
)
def test_unpadded_tiling_equals_pad_then_crop_reference_exactly(shape, tile, step, batch_size, blend, cover_end, tta):
    rng = np.random.default_rng(sum(shape) + batch_size)
    vol = rng.normal(size=shape + (2,)).astype(np.float32)
    got = inf.tiled_inference(
        vol,
        _tile_dependent_3d,
        tile_shape=tile,
        step=step,
        batch_size=batch_size,
        blend=blend,
        cover_end=cover_end,
        tta=tta,
    )
    ref = _reference_tiled(vol, _tile_dependent_3d, tile, step, batch_size, blend, cover_end, tta)
    assert got.shape == shape + (2,) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)  # bit-identical, zero-weight voxels included
    assert 0 < np.count_nonzero(got.sum(-1)) <= got[..., 0].size


def _tile_dependent_3d(x):
    """Logits depending on both channels and on the position inside the tile along every axis (so a tile
    cut at the wrong place, or padding read as anything but zeros, changes the result)."""
    pos = sum(
        jnp.arange(n, dtype=x.dtype).reshape([-1 if a == ax else 1 for a in range(3)]) * (ax + 1) / n
        for ax, n in enumerate(x.shape[1:4])
    )
    return jnp.stack([x[..., 1] - 0.3 * pos, 2.0 * x[..., 0] + pos], axis=-1)


@pytest.mark.parametrize(
    "shape, tile, step, batch_size, blend, cover_end, tta",
    [
        ((13, 11, 9), (8, 8, 8), (4, 4, 4), 3, "central", False, True),  # TTA, odd pads, partial last batch
        ((17, 10, 7), (8, 8, 8), (3, 5, 6), 4, "gaussian", True, False),  # cover_end
        ((9, 15, 12), (8, 12, 8), (5, 4, 3), 5, "constant", True, True),  # non-cubic tile, TTA + cover_end
        ((20, 20, 20), (8, 8, 8), (4, 4, 4), 1, "central", False, False),  # 125 tiles: 16 compiled calls
    ],
)
def test_device_pass_equals_host_pass(shape, tile, step, batch_size, blend, cover_end, tta):
    """The accelerator path (volume and accumulators on the device, tiles cut and blended inside compiled
    calls) gives the host path's probabilities, tile count and progress, on the same tiles."""
    rng = np.random.default_rng(sum(shape) + 7 * batch_size)
    vol = rng.normal(size=shape + (2,)).astype(np.float32)
    kw = dict(tile_shape=tile, step=step, batch_size=batch_size, blend=blend, cover_end=cover_end, tta=tta)
    host_calls, dev_calls = [], []
    host = inf.tiled_inference(
        vol, _tile_dependent_3d, tiles_on_device=False, progress=lambda d, t: host_calls.append((d, t)), **kw
    )
    dev = inf.tiled_inference(
        vol, _tile_dependent_3d, tiles_on_device=True, progress=lambda d, t: dev_calls.append((d, t)), **kw
    )
    assert dev.shape == host.shape and dev.dtype == np.float32 and dev.flags.writeable
    np.testing.assert_allclose(dev, host, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(dev.sum(-1) == 0, host.sum(-1) == 0)  # the same zero-weight voxels
    assert dev_calls[-1] == host_calls[-1]  # every tile counted once
    assert len(dev_calls) == -(-host_calls[-1][1] // (batch_size * inf.TILE_BATCHES_PER_CALL * (8 if tta else 1))) * (
        8 if tta else 1
    )


def test_device_pass_params_compile_once_and_errors():
    traces = []

    def counted(p, x):
        traces.append(x.shape)
        return _pointwise(x) * p["scale"]

    vol = np.random.default_rng(8).normal(size=(20, 20, 20, 1)).astype(np.float32)
    kw = dict(tile_shape=(8, 8, 8), step=(4, 4, 4), batch_size=4, tiles_on_device=True)
    out = inf.tiled_inference(vol, counted, params={"scale": 1.5}, **kw)
    n = len(traces)
    inf.tiled_inference(vol, counted, params={"scale": 0.5}, tta=True, **kw)  # new weights: no new compile
    assert len(traces) == n
    np.testing.assert_allclose(out[2:-2, 2:-2, 2:-2, 1], _sigmoid(1.5 * vol[2:-2, 2:-2, 2:-2, 0]), atol=1e-6)
    with pytest.raises(ConfigError):
        inf.tiled_inference(vol, lambda x: x[:, :4], tile_shape=(8, 8, 8), tiles_on_device=True)
