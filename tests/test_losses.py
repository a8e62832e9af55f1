"""Tests of clips_jax.losses against independent float64 NumPy computations (loops / explicit formulas)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from clips_jax import losses
from clips_jax.errors import ConfigError

N, D, H, W, M = 2, 4, 5, 6, 3


def _inputs(seed=0, shape=(N, D, H, W)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, shape + (2,)).astype(np.float32)
    labels = (rng.random(shape) < 0.3).astype(np.int32)
    image = rng.random(shape + (M,)).astype(np.float32)
    return logits, labels, image


def _softmax64(logits):
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_ce(logits, labels):
    """Per-voxel CE by the textbook formula -log softmax(z)[label]."""
    p = _softmax64(logits)
    out = np.empty(labels.shape)
    for idx in np.ndindex(labels.shape):
        out[idx] = -np.log(p[idx + (labels[idx],)])
    return out


def _np_dice(logits, labels, smooth=1e-3, eps=1e-5):
    p1 = _softmax64(logits)[..., 1]
    out = []
    for n in range(logits.shape[0]):
        y = (labels[n] == 1).astype(np.float64)
        out.append(1 - (2 * (p1[n] * y).sum() + smooth) / (p1[n].sum() + y.sum() + eps + smooth))
    return np.array(out)


def _np_ms(logits, image, eta, eps=1e-6):
    y = _softmax64(logits)
    x = image.astype(np.float64)
    out = []
    for n in range(x.shape[0]):
        total = 0.0
        for c in range(y.shape[-1]):
            yc = y[n, ..., c]
            mu = [(x[n, ..., m] * yc).sum() / (yc.sum() + eps) for m in range(x.shape[-1])]
            for r in np.ndindex(yc.shape):
                total += sum((x[n][r + (m,)] - mu[m]) ** 2 for m in range(x.shape[-1])) * yc[r]
            tv = 0.0
            for r in np.ndindex(yc.shape):
                for a in range(3):
                    q = list(r)
                    q[a] += 1
                    if q[a] < yc.shape[a]:
                        tv += abs(yc[tuple(q)] - yc[r])
            total += eta * tv
        out.append(total)
    return np.array(out)


def test_soft_dice_matches_numpy():
    logits, labels, _ = _inputs()
    labels[1] = 0  # one empty sample: the false-positive penalty branch
    got = np.asarray(losses.soft_dice_loss(logits, labels))
    np.testing.assert_allclose(got, _np_dice(logits, labels), rtol=1e-5, atol=1e-6)
    assert got.shape == (N,)


def test_cross_entropy_and_focal_match_numpy():
    logits, labels, _ = _inputs(1)
    ce = _np_ce(logits, labels)
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits, labels)), ce.reshape(N, -1).mean(1), rtol=1e-5)
    for gamma in (0.0, 1.0, 2.0):
        pt = np.exp(-ce)
        expect = ((1 - pt) ** gamma * ce).reshape(N, -1).mean(1)
        np.testing.assert_allclose(np.asarray(losses.focal_loss(logits, labels, gamma=gamma)), expect, rtol=1e-5)


def test_sensitivity_matches_numpy():
    logits, labels, _ = _inputs(2)
    p1 = _softmax64(logits)[..., 1]
    expect = [np.mean(1 - p1[n][labels[n] == 1]) * (labels[n].sum() / (labels[n].sum() + 1e-4)) for n in range(N)]
    np.testing.assert_allclose(np.asarray(losses.sensitivity_loss(logits, labels)), expect, rtol=1e-5)


@pytest.mark.parametrize("eta", [1e-3, 0.7])
def test_mumford_shah_matches_numpy(eta):
    logits, _, image = _inputs(3)
    got = np.asarray(losses.mumford_shah_loss(logits, image, eta=eta))
    np.testing.assert_allclose(got, _np_ms(logits, image, eta), rtol=1e-5)


def test_mumford_shah_channel_subset_and_label_independence():
    logits, labels, image = _inputs(4)
    sub = np.asarray(losses.mumford_shah_loss(logits, image, channels=[0, 2]))
    np.testing.assert_allclose(sub, _np_ms(logits, image[..., [0, 2]], 1e-3), rtol=1e-5)
    # The MS term never looks at labels: any labels, or none, give the same combined "ms" term.
    _, t1 = losses.combined_loss(logits, labels, image, np.array([True, True]))
    _, t2 = losses.combined_loss(logits, np.zeros_like(labels), image, np.array([False, False]))
    np.testing.assert_allclose(np.asarray(t1["ms"]), np.asarray(t2["ms"]), rtol=1e-6)


def test_mumford_shah_empty_class_is_finite():
    # Logits making class 1 (numerically) absent: mu guarded by eps, no NaN in value or gradient.
    logits = np.zeros((1, 4, 4, 4, 2), np.float32)
    logits[..., 0] = 200.0
    image = np.random.default_rng(5).random((1, 4, 4, 4, 2)).astype(np.float32)
    val, grad = jax.value_and_grad(lambda z: losses.mumford_shah_loss(z, image).sum())(jnp.asarray(logits))
    assert np.isfinite(np.asarray(val)).all() and np.isfinite(np.asarray(grad)).all()
    # Level term = sum over the single class of squared deviations from the channel means.
    x = image[0].astype(np.float64)
    expect = ((x - x.mean(axis=(0, 1, 2))) ** 2).sum()
    np.testing.assert_allclose(float(val), expect, rtol=1e-4)


def test_combined_loss_forms_and_weights():
    logits, labels, image = _inputs(6)
    lab = np.array([True, True])
    loss, terms = losses.combined_loss(logits, labels, image, lab, alpha=0.3, beta=1.5, lam=2.0)
    ce = _np_ce(logits, labels).reshape(N, -1).mean(1)
    expect = 0.3 * _np_ms(logits, image, 1e-3) + 1.5 * _np_dice(logits, labels) + 2.0 * ce
    np.testing.assert_allclose(np.asarray(loss), expect, rtol=1e-5)
    assert set(terms) == {"ms", "dice", "ce"}
    loss_o, terms_o = losses.combined_loss(logits, labels, image, lab, form="original")
    ce_v = _np_ce(logits, labels)
    focal = ((1 - np.exp(-ce_v)) * ce_v).reshape(N, -1).mean(1)
    np.testing.assert_allclose(np.asarray(loss_o), _np_dice(logits, labels) + 0.5 * focal, rtol=1e-5)
    assert set(terms_o) == {"dice", "focal"}
    with pytest.raises(ConfigError):
        losses.combined_loss(logits, labels, image, lab, form="nope")


def test_unlabeled_samples_only_get_the_ms_term():
    logits, labels, image = _inputs(7)
    labels[1] = -1  # placeholder labels of an unlabelled case must not matter
    lab = np.array([True, False])
    fn = jax.jit(lambda z: losses.combined_loss(z, labels, image, lab))
    (loss, terms) = fn(jnp.asarray(logits))
    ms = _np_ms(logits, image, 1e-3)
    np.testing.assert_allclose(float(loss[1]), 1e-5 * ms[1], rtol=1e-5)
    assert float(terms["dice"][1]) == 0.0 and float(terms["ce"][1]) == 0.0
    ce0 = _np_ce(logits[:1], labels[:1]).mean()
    np.testing.assert_allclose(float(loss[0]), 1e-5 * ms[0] + _np_dice(logits[:1], labels[:1])[0] + 2 * ce0, rtol=1e-5)
    # Gradient of the unlabelled sample comes from MS alone.
    g = jax.grad(lambda z: losses.combined_loss(z, labels, image, lab)[0][1])(jnp.asarray(logits))
    g_ms = jax.grad(lambda z: 1e-5 * losses.mumford_shah_loss(z, image)[1])(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ms), rtol=1e-5, atol=1e-12)
    _, t_orig = losses.combined_loss(logits, labels, image, lab, form="original")
    assert float(t_orig["focal"][1]) == 0.0


def test_gradients_finite():
    logits, labels, image = _inputs(8)
    logits[0, 0, 0, 0] = [50.0, -50.0]  # saturated voxel
    heads = [logits[:, ::2, ::2, ::2], logits]
    for form in ("ms_dice_ce", "original"):
        g = jax.grad(
            lambda hs: losses.deep_supervision_loss(
                hs, labels, image, np.array([True, False]), weights=(0.5, 1.0), form=form
            )[0].sum()
        )([jnp.asarray(h) for h in heads])
        assert all(np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).sum() > 0 for x in g)


def _np_align_corners(x, shape):
    """Independent reference: scipy map_coordinates (order=1) at source coords i*(n_in-1)/(n_out-1)."""
    coords = [np.arange(o) * ((i - 1) / (o - 1) if o > 1 else 0.0) for i, o in zip(x.shape[1:4], shape)]
    grid = np.meshgrid(*coords, indexing="ij")
    out = np.empty((x.shape[0],) + tuple(shape) + (x.shape[-1],))
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
        out[n, ..., c] = ndimage.map_coordinates(x[n, ..., c].astype(np.float64), grid, order=1, mode="nearest")
    return out


@pytest.mark.parametrize("src,dst", [((2, 3, 4), (16, 12, 9)), ((5, 6, 7), (3, 6, 2)), ((1, 4, 3), (4, 1, 5))])
def test_resize_align_corners_matches_scipy(src, dst):
    x = np.random.default_rng(9).normal(size=(2,) + src + (3,)).astype(np.float32)
    got = np.asarray(losses.resize_align_corners(jnp.asarray(x), dst))
    np.testing.assert_allclose(got, _np_align_corners(x, dst), rtol=1e-5, atol=1e-5)
    # Corners coincide with the input corners (the defining property of align_corners=True).
    if min(src) > 1 and min(dst) > 1:
        np.testing.assert_allclose(got[:, -1, -1, -1], x[:, -1, -1, -1], rtol=1e-6)


def test_resize_align_corners_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(10).normal(size=(2, 2, 3, 4, 2)).astype(np.float32)
    got = np.asarray(losses.resize_align_corners(jnp.asarray(x), (16, 12, 8)))
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 4, 1, 2, 3), size=(16, 12, 8), mode="trilinear", align_corners=True
    )
    np.testing.assert_allclose(got, t.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5, atol=1e-6)
    # And it differs from jax.image.resize (align_corners=False), which is why a custom resize exists.
    jr = np.asarray(jax.image.resize(jnp.asarray(x), (2, 16, 12, 8, 2), "linear"))
    assert np.abs(jr - got).max() > 1e-2


def test_deep_supervision_weighted_sum_of_resized_heads():
    rng = np.random.default_rng(11)
    labels = (rng.random((N, 8, 8, 8)) < 0.3).astype(np.int32)
    image = rng.random((N, 8, 8, 8, 2)).astype(np.float32)
    heads = [rng.normal(size=(N, s, s, s, 2)).astype(np.float32) for s in (1, 2, 4, 8)]
    lab = np.array([True, False])
    loss, terms = losses.deep_supervision_loss(heads, labels, image, lab)
    expect = 0.0
    for w, h in zip((0.125, 0.25, 0.5, 1.0), heads):
        up = _np_align_corners(h, (8, 8, 8)).astype(np.float32)
        ce = _np_ce(up, labels).reshape(N, -1).mean(1)
        head = 1e-5 * _np_ms(up, image, 1e-3) + lab * (_np_dice(up, labels) + 2 * ce)
        expect = expect + w * head
    np.testing.assert_allclose(np.asarray(loss), expect, rtol=1e-4)
    assert "head3/dice" in terms and float(terms["head2/ce"][1]) == 0.0
    with pytest.raises(ConfigError):
        losses.deep_supervision_loss(heads[:3], labels, image, lab)


@pytest.mark.parametrize("k", [2, 3])
def test_unrolled_class_reductions_match_jax_optax_and_einsum_forms_with_gradients(k):
    """The losses' unrolled softmax / CE / Mumford-Shah equal the library forms they replace (values and
    gradients, float32 round-off): jax.nn.softmax, optax's integer-label CE, the einsum-based MS means."""
    import optax

    rng = np.random.default_rng(7 + k)
    logits = jnp.asarray(3 * rng.normal(size=(2, 6, 5, 4, k)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, k, size=(2, 6, 5, 4)), jnp.int32)
    image = jnp.asarray(rng.random((2, 6, 5, 4, 3)), jnp.float32)

    def ms_einsum(z, eta=1e-3, eps=1e-6):
        y = jax.nn.softmax(z, axis=-1)
        mu = jnp.einsum("ndhwm,ndhwk->nmk", image, y) / (jnp.sum(y, axis=(1, 2, 3))[:, None, :] + eps)
        level = sum(
            jnp.sum(jnp.sum((image - mu[:, None, None, None, :, c]) ** 2, -1) * y[..., c], axis=(1, 2, 3))
            for c in range(k)
        )
        tv = sum(jnp.sum(jnp.abs(jnp.diff(y, axis=a)), axis=(1, 2, 3, 4)) for a in (1, 2, 3))
        return level + eta * tv

    pairs = [
        (lambda z: losses._softmax(z) ** 2, lambda z: jax.nn.softmax(z, axis=-1) ** 2),
        (lambda z: losses._voxel_ce(z, labels), lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels)),
        (lambda z: losses.mumford_shah_loss(z, image), ms_einsum),
        (
            lambda z: losses.soft_dice_loss(z, labels),
            lambda z: 1.0
            - (2.0 * jnp.sum(jax.nn.softmax(z)[..., 1] * (labels == 1), (1, 2, 3)) + 1e-3)
            / (jnp.sum(jax.nn.softmax(z)[..., 1], (1, 2, 3)) + jnp.sum(labels == 1, (1, 2, 3)) + 1e-5 + 1e-3),
        ),
    ]
    for new, ref in pairs:
        np.testing.assert_allclose(new(logits), ref(logits), rtol=2e-6, atol=1e-6)
        g_new = jax.grad(lambda z: jnp.sum(jnp.sin(new(z))))(logits)
        g_ref = jax.grad(lambda z: jnp.sum(jnp.sin(ref(z))))(logits)
        np.testing.assert_allclose(g_new, g_ref, rtol=0, atol=1e-5 * float(jnp.abs(g_ref).max()))
