"""Building blocks of TMTV-Net in Flax NNX, channels-last `(N, D, H, W, C)`.

Each block reproduces the PyTorch original exactly (`main/src/layers/blocks.py` and `layer_config.py` of
qurit-frizi/TMTV-Net; layout conversion: docs/weights.md, "5. Mapping"):

* convolutions use explicit symmetric padding `k // 2` on every side (never 'SAME': XLA pads stride-2 convs
  asymmetrically, PyTorch does not);
* InstanceNorm is affine with epsilon 1e-5 and two-pass variance (Flax defaults 1e-6 / fast variance differ);
* LeakyReLU slope 0.01;
* x2 trilinear upsampling with align_corners=False.

On CPU, every 3-D convolution runs as a sum over the kernel's depth taps of 2-D convolutions (`conv_general_3d`):
XLA:CPU's 2-D convolutions are ~2x faster than its 3-D ones (measured on a 2-core Xeon: 65 vs 26-31 GFLOP/s for
32 -> 32 channels, 3^3, 64^3 voxels). Small tensors (the default job's narrow U-Net on 32^3 patches) instead fold
the depth taps into the channels: one 2-D convolution with kD * Cin input channels, ~2x faster there than the
per-tap sum, forward and backward (see `conv_general_3d`). Same parameters, same maths up to float32 summation
order; GPUs keep the native 3-D convolution (cuDNN). `CLIPS_CONV3D=auto|lax|2d|fold` (environment, read at trace
time) overrides the choice: `lax` native, `2d` always the per-tap sum, `fold` always the folded form.

Curriculum by smoothing (Sinha et al. 2020): every block takes an optional `sigma`. With `sigma=None` (the
default, used at inference) no smoothing op exists in the graph. With a (traced) scalar sigma, a fixed
depthwise 3x3x3 Gaussian is applied after every convolution of kernel size > 1, before normalisation; at
sigma < 1e-3 it is exactly the identity. Because sigma is an ordinary array argument, changing it never
recompiles a jitted step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from clips_jax.curricula.smoothing import SIGMA_MIN
from clips_jax.errors import ConfigError

LEAKY_SLOPE = 0.01
NORM_EPS = 1e-5

#: Compute dtypes by name (config `model.dtype`, the `--dtype` flags, `tiled_inference(dtype=)`). Parameters stay
#: float32 either way.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dtype(name: str):
    """The networks' `dtype` argument for a compute-dtype name: None (the Flax default, float32) for "float32",
    jnp.bfloat16 (mixed precision) for "bfloat16". ConfigError for any other name."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype={name!r}: use one of {sorted(COMPUTE_DTYPES)}")
    return None if name == "float32" else COMPUTE_DTYPES[name]


class ModelConfig:
    """Hashable, immutable constructor arguments of a network (a read-only mapping name -> value).

    Models keep their config as a static attribute; NNX puts static attributes into the graph definition, which
    must be hashable so that a jitted function keyed by it (e.g. the tile predictor of `tiled_inference`) compiles
    once. Lists become tuples, dicts nested `ModelConfig`s. `to_json()` gives plain dicts and lists back.
    """

    __slots__ = ("_items",)

    def __init__(self, mapping=None, **kwargs):
        items = dict(mapping or {}, **kwargs)
        object.__setattr__(self, "_items", tuple(sorted((k, _freeze(v)) for k, v in items.items())))

    def __setattr__(self, name, value):
        raise AttributeError("ModelConfig is immutable")

    def __getitem__(self, key: str):
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def items(self):
        return self._items

    def __eq__(self, other):
        return isinstance(other, ModelConfig) and self._items == other._items

    def __hash__(self):
        return hash(self._items)

    def __repr__(self):
        return f"ModelConfig({self.to_json()!r})"

    def to_json(self) -> dict:
        """Plain JSON-friendly dict (tuples -> lists, nested configs -> dicts)."""
        return {k: _thaw(v) for k, v in self._items}


def _freeze(v):
    if isinstance(v, ModelConfig):
        return v
    if isinstance(v, dict):
        return ModelConfig(v)
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    if isinstance(v, ModelConfig):
        return v.to_json()
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def gaussian_smooth(x: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Depthwise separable 3x3x3 Gaussian smoothing of a `(N, D, H, W, C)` tensor, zero padding 1.

    The 1-D kernel is `[a, 1, a] / (1 + 2a)` with `a = exp(-1 / (2 sigma^2))` (sigma in voxels), i.e. the
    normalised Gaussian sampled at -1, 0, 1; the 3-D kernel is its outer product. For `sigma < 1e-3` the input
    is returned unchanged (exactly), selected with `lax.cond` so sigma may be a traced scalar.
    """
    sigma = jnp.asarray(sigma, jnp.float32)

    def smooth(v):
        s = jnp.maximum(sigma, SIGMA_MIN)
        a = jnp.exp(-1.0 / (2.0 * s * s)).astype(v.dtype)
        norm = 1.0 + 2.0 * a
        for axis in (1, 2, 3):
            pad = [(0, 0)] * v.ndim
            pad[axis] = (1, 1)
            p = jnp.pad(v, pad)
            n = v.shape[axis]
            lo = jax.lax.slice_in_dim(p, 0, n, axis=axis)
            hi = jax.lax.slice_in_dim(p, 2, n + 2, axis=axis)
            v = (v + a * (lo + hi)) / norm
        return v

    return jax.lax.cond(sigma < SIGMA_MIN, lambda v: v, smooth, x)


def upsample2x_linear(x: jax.Array) -> jax.Array:
    """x2 trilinear upsampling of `(N, D, H, W, C)`, align_corners=False (PyTorch `Upsample(scale_factor=2,
    mode='trilinear')`).

    Per axis: `out[2i] = 0.75 x[i] + 0.25 x[i-1]`, `out[2i+1] = 0.75 x[i] + 0.25 x[i+1]`, with the border
    index clamped. Exact, elementwise, and cheaper than a general resize.
    """
    for axis in (1, 2, 3):
        n = x.shape[axis]
        prev = jnp.concatenate(
            [jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis
        )
        nxt = jnp.concatenate(
            [jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis
        )
        even = 0.75 * x + 0.25 * prev
        odd = 0.75 * x + 0.25 * nxt
        x = jnp.stack([even, odd], axis=axis + 1)
        shape = list(x.shape)
        shape[axis : axis + 2] = [2 * n]
        x = x.reshape(shape)
    return x


CONV3D_ENV = "CLIPS_CONV3D"


CONV3D_MODES = ("auto", "lax", "2d", "fold")
# auto on CPU: fold the depth taps into the channels when the folded input has at most this many elements and
# kD * Cin channels at most FOLD_MAX_CHANNELS (the default job's convolutions; measured 2026-11-30, BENCHMARKS.md
# "CPU training step of the default job"); larger tensors keep the per-tap sum measured for the full-width net.
FOLD_MAX_ELEMENTS = 1 << 22
FOLD_MAX_CHANNELS = 256


def conv3d_mode() -> str:
    """`CLIPS_CONV3D` (default "auto"), validated. Raises ConfigError for an unknown value."""
    mode = os.environ.get(CONV3D_ENV, "auto").strip().lower()
    if mode not in CONV3D_MODES:
        raise ConfigError(f"environment variable {CONV3D_ENV}={mode!r}: use auto, lax, 2d or fold (or unset it)")
    return mode


def prefer_2d_convs() -> bool:
    """True where 3-D convolutions run as 2-D ones: `CLIPS_CONV3D=2d|fold`, or `auto` (default) on CPU."""
    mode = conv3d_mode()
    return mode in ("2d", "fold") or (mode == "auto" and jax.default_backend() == "cpu")


def _plain_channels_last_3d(
    lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, **kwargs
) -> bool:
    """True for a plain NDHWC x DHWIO convolution: explicit padding, no dilation, no groups, no extra lax
    options (out_sharding / preferred_element_type). Only such calls may be rewritten by `conv_general_3d`."""
    if any(v is not None for v in kwargs.values()):
        return False
    if lhs.ndim != 5 or rhs.ndim != 5 or isinstance(padding, str) or feature_group_count != 1:
        return False
    if any(v not in (None, 1) for v in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    want = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NDHWC", "DHWIO", "NDHWC"))
    # None means lax's default NCDHW / OIDHW layout: not the channels-last one rewritten here
    return (
        dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want
    )


def _use_2d_convs(lhs, rhs, *conv_args, **kwargs) -> bool:
    """True if `conv_general_3d` may (and should) decompose this call into 2-D convolutions (CPU)."""
    if not prefer_2d_convs():
        return False
    if jnp.dtype(lhs.dtype) != jnp.float32 or jnp.dtype(rhs.dtype) != jnp.float32:
        return False  # keep one fp32-accumulating conv for reduced precision
    return _plain_channels_last_3d(lhs, rhs, *conv_args, **kwargs)


FOLD_FEW_CHANNELS = 8
"""On accelerators, a 3-D convolution with fewer input channels than this (the first layers: 5 CT/PET channels
into the U-Nets, 6 into the refiner) runs with its depth taps folded into the channels (`_conv3d_folded`):
measured on an H200 (BENCHMARKS.md, "Where the GPU time goes"), the refiner's 9^3 6 -> 32 convolution took
2.4 ms folded against 6.7 ms native in bfloat16 (2.5 / 4.1 ms in float32), the U-Net's 3^3 5 -> 32 one 1.6
against 3.1 ms with its gradients (batch 2, 128x96x96); padding the channels to 8 or 16 did not help."""


def _fold_few_channels(lhs, rhs, window_strides, *conv_args, **kwargs) -> bool:
    """True for the accelerator rule above (`CLIPS_CONV3D=auto`, not on CPU, where `_use_2d_convs` decides)."""
    if conv3d_mode() != "auto" or jax.default_backend() == "cpu":
        return False
    if rhs.ndim != 5 or rhs.shape[3] >= FOLD_FEW_CHANNELS or rhs.shape[0] == 1:
        return False
    if any(int(v) != 1 for v in window_strides):
        return False
    return _plain_channels_last_3d(lhs, rhs, *conv_args, **kwargs)


def conv_general_3d(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """Drop-in `lax.conv_general_dilated` for channels-last 3-D convolutions (what `nnx.Conv` calls).

    lhs `(N, D, H, W, Cin)`, rhs `(kD, kH, kW, Cin, Cout)`, explicit `padding` ((lo, hi) per axis) ->
    `(N, D', H', W', Cout)`. On CPU (see the module docstring) it computes
    `sum_a conv2d(x_pad[:, a + s*j], rhs[a])` over the kD depth taps a, with the depth axis folded into the batch
    (float32 in, float32 out), or for small tensors (`_fold_depth`) one 2-D convolution over the taps
    concatenated along the channels (`_conv3d_folded`). On accelerators, convolutions with fewer than
    FOLD_FEW_CHANNELS input channels (stride 1) take the folded form too. Anything else (dilation, groups,
    'SAME' padding, non-float32 on CPU, an `out_sharding` or `preferred_element_type`) goes to
    `lax.conv_general_dilated` unchanged.
    Raises: ConfigError if `CLIPS_CONV3D` holds an unknown value.
    """
    if _fold_few_channels(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, **kwargs
    ):
        return _conv3d_folded(
            lhs,
            rhs,
            tuple(int(v) for v in window_strides),
            tuple(tuple(int(v) for v in pr) for pr in padding),
            precision,
        )
    if not _use_2d_convs(
        lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, **kwargs
    ):
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    # (Training memory: XLA's temporary buffers are ~2x those of the native conv, forward and backward alike,
    # measured on a small U-Net; jax.checkpoint around this path did not change that.)
    strides = tuple(int(v) for v in window_strides)
    padding = tuple(tuple(int(v) for v in pr) for pr in padding)
    if _fold_depth(lhs.shape, rhs.shape, strides, padding):
        return _conv3d_folded(lhs, rhs, strides, padding, precision)
    return _conv3d_as_2d(lhs, rhs, strides, padding, precision)


def _fold_depth(lhs_shape, rhs_shape, strides, padding) -> bool:
    """Whether the 2-D path folds the depth taps into the channels (`_conv3d_folded`) rather than summing
    per-tap 2-D convolutions (`_conv3d_as_2d`): always under `CLIPS_CONV3D=fold`, never under `2d`; under `auto`
    for small tensors (folded input <= FOLD_MAX_ELEMENTS elements, kD * Cin <= FOLD_MAX_CHANNELS)."""
    mode = conv3d_mode()
    if mode != "auto":
        return mode == "fold"
    n, d, h, w, c = lhs_shape
    kd = rhs_shape[0]
    if kd == 1:
        return False  # a single tap: both forms are one 2-D convolution
    d_out = (d + sum(padding[0]) - kd) // strides[0] + 1
    return kd * c <= FOLD_MAX_CHANNELS and n * d_out * h * w * kd * c <= FOLD_MAX_ELEMENTS


def _conv3d_as_2d(lhs, rhs, window_strides, padding, precision):
    """The CPU path of `conv_general_3d`: NDHWC x DHWIO -> NDHWC as a sum of 2-D convolutions."""
    n, d, h, w, c = lhs.shape
    kd = rhs.shape[0]
    sd, sh, sw = window_strides
    (p0, p1), *pad_hw = padding
    x = jnp.pad(lhs, ((0, 0), (p0, p1), (0, 0), (0, 0), (0, 0))) if (p0 or p1) else lhs
    d_out = (d + p0 + p1 - kd) // sd + 1
    out = None
    for a in range(kd):
        taps = jax.lax.slice_in_dim(x, a, a + sd * (d_out - 1) + 1, stride=sd, axis=1)
        y = jax.lax.conv_general_dilated(
            taps.reshape(n * d_out, h, w, c),
            rhs[a],
            (sh, sw),
            pad_hw,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        out = y if out is None else out + y
    return out.reshape(n, d_out, *out.shape[1:])


def _conv3d_folded(lhs, rhs, window_strides, padding, precision):
    """The small-tensor CPU path of `conv_general_3d`: the kD depth taps (strided depth slices of the padded
    input) concatenated along the channels, `(N * D', H, W, kD * Cin)`, convolved in ONE 2-D convolution with
    the kernel reshaped to `(kH, kW, kD * Cin, Cout)` (tap-major channels, matching the concatenation).

    Fewer, larger kernels than `_conv3d_as_2d` (one convolution and one weight-gradient convolution instead of
    kD of each, no partial-sum additions); the concatenated input is kD times the input, so it is only chosen
    for small tensors. Same result up to float32 summation order.
    """
    n, d, h, w, c = lhs.shape
    kd, kh, kw, _, cout = rhs.shape
    sd, sh, sw = window_strides
    (p0, p1), *pad_hw = padding
    x = jnp.pad(lhs, ((0, 0), (p0, p1), (0, 0), (0, 0), (0, 0))) if (p0 or p1) else lhs
    d_out = (d + p0 + p1 - kd) // sd + 1
    taps = jnp.concatenate(
        [jax.lax.slice_in_dim(x, a, a + sd * (d_out - 1) + 1, stride=sd, axis=1) for a in range(kd)], axis=-1
    )  # (N, D', H, W, kD * Cin)
    kernel = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, cout)
    y = jax.lax.conv_general_dilated(
        taps.reshape(n * d_out, h, w, kd * c),
        kernel,
        (sh, sw),
        pad_hw,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    return y.reshape(n, d_out, *y.shape[1:])


def conv3d(
    cin: int, cout: int, kernel: int, *, stride: int = 1, use_bias: bool = True, dtype=None, rngs: nnx.Rngs
) -> nnx.Conv:
    """A 3-D convolution with PyTorch's symmetric padding `kernel // 2` (kernel odd); computed by
    `conv_general_3d` (2-D convolutions on CPU)."""
    p = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel,) * 3,
        strides=(stride,) * 3,
        padding=((p, p),) * 3,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_3d,
        rngs=rngs,
    )


def instance_norm(channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.InstanceNorm:
    """PyTorch `InstanceNorm3d(C, affine=True)`: per sample and channel over D, H, W; eps 1e-5; biased var."""
    return nnx.InstanceNorm(
        channels, epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class ConvNormAct(nnx.Module):
    """Conv3d(k, stride, pad k//2) -> [Gaussian smoothing] -> InstanceNorm(affine) -> [LeakyReLU(0.01)].

    `(N, D, H, W, cin) -> (N, ceil(D/stride), ..., cout)`. `activation=False` drops the LeakyReLU (used by the
    second conv of a residual block).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        use_bias: bool = True,
        activation: bool = True,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.conv = conv3d(cin, cout, kernel, stride=stride, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.norm = instance_norm(cout, dtype=dtype, rngs=rngs)
        self.activation = activation
        self.smoothable = kernel > 1

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        x = self.conv(x)
        if sigma is not None and self.smoothable:
            x = gaussian_smooth(x, sigma)
        x = self.norm(x)
        return jax.nn.leaky_relu(x, LEAKY_SLOPE) if self.activation else x


class UpBlock(nnx.Module):
    """Decoder level: x2 trilinear upsample -> ConvNormAct(3) (cin -> cout) -> concat([skip, x]) ->
    ConvNormAct(3) (skip_ch + cout -> cout). The skip comes first in the concatenation, as in the original."""

    def __init__(self, cin: int, skip_ch: int, cout: int, *, use_bias: bool = True, dtype=None, rngs: nnx.Rngs):
        self.up_conv = ConvNormAct(cin, cout, 3, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.conv = ConvNormAct(skip_ch + cout, cout, 3, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        x = self.up_conv(upsample2x_linear(x), sigma)
        x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
        return self.conv(x, sigma)


class ResBlock(nnx.Module):
    """Post-activation residual block with identity shortcut: LReLU(x + IN(conv(LReLU(IN(conv(x))))))."""

    def __init__(self, channels: int, *, use_bias: bool = False, dtype=None, rngs: nnx.Rngs):
        self.block_1 = ConvNormAct(channels, channels, 3, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.block_2 = ConvNormAct(channels, channels, 3, use_bias=use_bias, activation=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        return jax.nn.leaky_relu(x + self.block_2(self.block_1(x, sigma), sigma), LEAKY_SLOPE)
