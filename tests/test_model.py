"""Model-level tests that need no PyTorch: shapes, errors, upsampling, curriculum-by-smoothing hook.

(Layer-for-layer parity with a PyTorch reference and the converter are tested in test_parity.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from clips_jax.errors import ConfigError, ShapeError
from clips_jax.model import Ensemble, Refiner, UNet, gaussian_smooth, upsample2x_linear

SMALL = dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3)


@nnx.jit(static_argnames=("ds",))
def run(model, x, sigma=None, ds=False):
    """Jitted call (one compilation is much faster than eager op-by-op dispatch on CPU)."""
    return model(x, sigma, deep_supervision=True) if ds else model(x, sigma)


def test_upsample_matches_independent_linear_resize():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 3))
    ours = upsample2x_linear(x)
    ref = jax.image.resize(x, (2, 6, 8, 10, 3), "linear")  # half-pixel centres = align_corners=False
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_gaussian_smooth_identity_at_zero_and_matches_scipy():
    x = jax.random.normal(jax.random.key(1), (1, 6, 7, 8, 2))
    assert jnp.array_equal(gaussian_smooth(x, 0.0), x)
    sigma = 0.8
    a = np.exp(-1 / (2 * sigma**2))
    k1 = np.array([a, 1, a]) / (1 + 2 * a)
    k3 = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    ref = np.stack([ndimage.convolve(np.asarray(x[0, ..., c], np.float64), k3, mode="constant") for c in range(2)], -1)
    np.testing.assert_allclose(gaussian_smooth(x, sigma)[0], ref, atol=1e-5)


def test_unet_shapes_and_size_error():
    net = UNet(in_channels=5, rngs=nnx.Rngs(0), **SMALL)
    x = jnp.zeros((1, 32, 16, 16, 5))
    assert run(net, x).shape == (1, 32, 16, 16, 2)
    ds = run(net, x, ds=True)
    assert [o.shape[1:4] for o in ds] == [(4, 2, 2), (8, 4, 4), (16, 8, 8), (32, 16, 16)]
    with pytest.raises(ShapeError, match="divisible by 16"):
        net(jnp.zeros((1, 40, 16, 16, 5)))
    with pytest.raises(ShapeError, match="5"):
        net(jnp.zeros((1, 16, 16, 16, 4)))


def test_smoothing_at_sigma_zero_equals_plain_model_and_changes_output_otherwise():
    net = UNet(rngs=nnx.Rngs(0), **SMALL)
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 16, 5))
    plain = run(net, x)
    # The smoothing op is exactly the identity at sigma 0 (test above); compiled whole networks may still fuse
    # differently around the lax.cond, hence float32 rounding tolerance here.
    np.testing.assert_allclose(run(net, x, jnp.float32(0.0)), plain, rtol=0, atol=1e-5)
    assert float(jnp.abs(run(net, x, jnp.float32(1.0)) - plain).max()) > 1e-3
    ref = Refiner(features=4, n_blocks=2, rngs=nnx.Rngs(0))
    x6 = jax.random.normal(jax.random.key(3), (1, 8, 8, 8, 6))
    np.testing.assert_allclose(run(ref, x6, jnp.float32(0.0)), run(ref, x6), rtol=0, atol=1e-5)


def test_changing_sigma_never_recompiles():
    net = UNet(rngs=nnx.Rngs(0), **SMALL)
    traces = []

    @nnx.jit
    def f(model, x, sigma):
        traces.append(1)  # runs only while tracing
        return model(x, sigma)

    x = jnp.ones((1, 16, 16, 16, 5))
    outs = [f(net, x, jnp.float32(s)) for s in (1.0, 0.5, 0.1, 0.0)]
    assert len(traces) == 1
    assert not jnp.array_equal(outs[0], outs[-1])


def test_ensemble_is_softmax_members_then_stacking_conv():
    ens = Ensemble(unet_kwargs=SMALL, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 16, 16, 16, 5))
    probs = jnp.stack([jax.nn.softmax(run(ens.member(i), x), -1)[..., 1] for i in range(4)], -1)
    w = ens.stacking.kernel[...].reshape(4, 2)
    expected = probs @ w + ens.stacking.bias[...]
    np.testing.assert_allclose(run(ens, x), expected, atol=1e-5)
    # Members are distinct initialisations.
    assert not jnp.allclose(ens.member(0).init_block.conv.kernel[...], ens.member(1).init_block.conv.kernel[...])


@pytest.mark.parametrize(
    "kernel,stride,shape", [(3, 1, (2, 9, 10, 11)), (3, 2, (1, 9, 10, 11)), (9, 1, (1, 12, 8, 8)), (1, 1, (1, 7, 6, 5))]
)
def test_conv_as_2d_convolutions_equals_lax_conv_and_its_gradients(kernel, stride, shape, monkeypatch):
    from clips_jax.model.layers import CONV3D_ENV, conv_general_3d

    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(*shape, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel,) * 3 + (3, 4)), jnp.float32)
    pad, strides = [(kernel // 2,) * 2] * 3, (stride,) * 3

    dn = ("NDHWC", "DHWIO", "NDHWC")

    def conv(x, w):
        return conv_general_3d(x, w, strides, pad, dimension_numbers=dn)

    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w)))

    monkeypatch.setenv(CONV3D_ENV, "lax")  # the same function now calls lax.conv_general_dilated
    ref, gref = conv(x, w), jax.grad(loss, argnums=(0, 1))(x, w)
    direct = jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=dn)
    np.testing.assert_array_equal(ref, direct)
    scale = float(jnp.abs(ref).max())
    for mode in ("2d", "fold", "auto"):  # per-tap sum, depth taps folded into channels, the CPU default
        monkeypatch.setenv(CONV3D_ENV, mode)
        got, ggot = conv(x, w), jax.grad(loss, argnums=(0, 1))(x, w)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)
        for a, b in zip(ggot, gref):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * float(jnp.abs(b).max()))  # float32 sums, ~1e3 terms
    monkeypatch.setenv(CONV3D_ENV, "bogus")
    with pytest.raises(ConfigError, match=CONV3D_ENV):
        conv(x, w)


def test_conv_layers_really_take_the_configured_path(monkeypatch):
    from clips_jax.model.layers import CONV3D_ENV, conv3d

    layer = conv3d(3, 4, 3, stride=2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, 8, 3))

    def conv_ranks():
        jaxpr = jax.make_jaxpr(lambda v: layer(v))(x)
        return sorted({e.invars[0].aval.ndim for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"})

    monkeypatch.setenv(CONV3D_ENV, "2d")
    assert conv_ranks() == [4]  # only 2-D convolutions (N, H, W, C)
    monkeypatch.setenv(CONV3D_ENV, "fold")
    assert conv_ranks() == [4]

    def n_convs():
        jaxpr = jax.make_jaxpr(lambda v: layer(v))(x)
        return sum(e.primitive.name == "conv_general_dilated" for e in jaxpr.jaxpr.eqns)

    assert n_convs() == 1  # the three depth taps folded into one 2-D convolution
    monkeypatch.setenv(CONV3D_ENV, "2d")
    assert n_convs() == 3  # one 2-D convolution per depth tap
    monkeypatch.setenv(CONV3D_ENV, "lax")
    assert conv_ranks() == [5]  # the native 3-D convolution


def test_accelerators_fold_the_few_channel_first_layers(monkeypatch):
    """On accelerators (`auto`), convolutions with < 8 input channels run as one depth-folded 2-D convolution
    (faster on an H200, BENCHMARKS.md); wider ones stay native 3-D; values and gradients equal lax's."""
    from clips_jax.model import layers

    monkeypatch.setenv(layers.CONV3D_ENV, "auto")
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    conv3d = layers.conv3d
    narrow, wide = conv3d(6, 4, 3, rngs=nnx.Rngs(0)), conv3d(8, 4, 3, rngs=nnx.Rngs(1))
    xn, xw = jax.random.normal(jax.random.key(2), (1, 8, 6, 5, 6)), jnp.ones((1, 8, 6, 5, 8))

    def ranks(layer, x):
        jaxpr = jax.make_jaxpr(lambda v: layer(v))(x)
        return [e.invars[0].aval.ndim for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]

    assert ranks(narrow, xn) == [4] and ranks(wide, xw) == [5]
    assert ranks(conv3d(6, 4, 3, stride=2, rngs=nnx.Rngs(0)), xn) == [5]  # strided: native

    def value_and_grad(layer, x):
        g, st = nnx.split(layer)
        return jax.value_and_grad(lambda s, v: jnp.sum(nnx.merge(g, s)(v) ** 2), argnums=(0, 1))(st, x)

    folded = value_and_grad(narrow, xn)
    monkeypatch.setenv(layers.CONV3D_ENV, "lax")
    assert ranks(narrow, xn) == [5]
    native = value_and_grad(narrow, xn)
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(native)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.abs(b).max()))


def test_ensemble_lax_map_and_vmap_paths_agree(monkeypatch):
    from clips_jax.model.layers import CONV3D_ENV

    ens = Ensemble(n_members=2, unet_kwargs=dict(SMALL), rngs=nnx.Rngs(4))
    graphdef, state = nnx.split(ens)
    x = jax.random.normal(jax.random.key(5), (1, 16, 16, 16, 5))

    @jax.jit
    def value_and_grad(state, sigma):
        return jax.value_and_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, sigma) ** 2))(state)

    # jit caches by function, not by environment: trace each path in its own jit
    monkeypatch.setenv(CONV3D_ENV, "2d")  # members one after the other (lax.map), 2-D convolutions
    a = [value_and_grad(state, jnp.float32(s)) for s in (0.0, 1.0)]
    monkeypatch.setenv(CONV3D_ENV, "lax")  # members vmapped, native 3-D convolutions (the GPU path)
    b = [jax.jit(value_and_grad.__wrapped__)(state, jnp.float32(s)) for s in (0.0, 1.0)]
    for (va, ga), (vb, gb) in zip(a, b):
        np.testing.assert_allclose(va, vb, rtol=1e-4)
        # one scale for all leaves: some gradients are mathematically zero (conv biases before InstanceNorm)
        scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(gb))
        for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-3 * scale)
