"""Training losses for lesion segmentation: soft Dice, cross-entropy, focal, Mumford-Shah, deep supervision.

Where this fits: the trainer's compiled step calls `deep_supervision_loss` (U-Net with 4 heads) or
`combined_loss` (one output) on a batch and gets one loss value **per sample** back, plus a dict of the
individual per-sample terms for logging and for curricula (self-paced learning and bandit teachers need
per-case losses). Reducing over the batch is the caller's job.

Conventions (the whole module):
* channels-last: `logits` are `(N, D, H, W, K)` (K = 2: background, lesion), float (any float dtype; computed
  in float32); `labels` are `(N, D, H, W)` integers in {0, ..., K-1}; `image` is the network input
  `(N, D, H, W, M)`.
* Every function is pure `jax.numpy`, jit-able and differentiable; sums run over the spatial axes of one
  sample; nothing is averaged over the batch.

Formulas follow the TMTV-Net paper (Yousefirizi et al. 2024, EJNMMI, Eq. 1-2), Kim & Ye 2019 ("Mumford-Shah
loss functional for image segmentation with deep learning", IEEE TIP) and the public TMTV-Net code
(`LossDiceCrossEntropyFocal2` in `main/src/model_unet_multiclass_deepsupervision.py`, `LossDiceMulticlass` in
`main/src/losses.py`, `DeepSupervision` in `main/src/layers/deep_supervision.py`, qurit-frizi/TMTV-Net):
* `soft_dice_loss`: the original TMTV-Net form (softmax, background dropped, per sample).
* `cross_entropy`, `focal_loss`: per-sample voxel means.
* `mumford_shah_loss`: Kim & Ye 2019 level-set term + anisotropic L1 TV, plain sums per sample.
* `combined_loss`: TMTV-Net paper Eq. 1, alpha*MS + beta*Dice + lambda*CE (semi-supervised masking), or the
  public code's Dice + 0.5*focal(gamma=1) (`form="original"`).
* `deep_supervision_loss`: heads resized with trilinear align_corners=True (`resize_align_corners`), weighted
  (0.125, 0.25, 0.5, 1.0) and summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clips_jax.errors import ConfigError

Array = jax.Array

_FORMS = ("ms_dice_ce", "original")


def _spatial_sum(x: Array) -> Array:
    """Sum over every axis but the first (batch)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _spatial_mean(x: Array) -> Array:
    """Mean over every axis but the first (batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# The class axis K is tiny (2): reductions over it are written as K-1 elementwise operations on class slices, so
# that XLA fuses them into the surrounding elementwise kernels (a reduction over a minor axis of size 2 becomes a
# separate, slow kernel on CPU; measured in BENCHMARKS.md, "CPU training step of the default job"). Same
# formulas as jax.nn.softmax / logsumexp; sums over K > 2 classes run left to right (float32 round-off only).


def _class_max(x: Array) -> Array:
    """Max over the last (class) axis, unrolled."""
    m = x[..., 0]
    for k in range(1, x.shape[-1]):
        m = jnp.maximum(m, x[..., k])
    return m


def _class_sum(x: Array) -> Array:
    """Sum over the last (class) axis, unrolled."""
    s = x[..., 0]
    for k in range(1, x.shape[-1]):
        s = s + x[..., k]
    return s


@jax.custom_jvp
def _softmax(x: Array) -> Array:
    """`jax.nn.softmax(x, axis=-1)` (same formula and derivative rule) with the class reductions unrolled."""
    e = jnp.exp(x - _class_max(x)[..., None])
    return e / _class_sum(e)[..., None]


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = _softmax(x)
    return y, y * (x_dot - _class_sum(y * x_dot)[..., None])


def _check_logits_labels(logits: Array, labels: Array) -> None:
    if logits.ndim != 5 or labels.shape != logits.shape[:-1]:
        raise ConfigError(
            f"losses: logits {logits.shape} must be (N, D, H, W, K) and labels {labels.shape} must be "
            f"(N, D, H, W) with the same N, D, H, W; resize deep-supervision heads first"
        )


def soft_dice_loss(logits: Array, labels: Array, smooth: float = 1e-3, eps: float = 1e-5) -> Array:
    """Per-sample soft Dice loss of the lesion class, as in the original TMTV-Net code.

    p = softmax(logits)[..., 1], y = (labels == 1); per sample
    `1 - (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + eps + smooth)`; the background class is dropped.

    Args:
      logits: `(N, D, H, W, K)` float, K >= 2 (class 1 = lesion).
      labels: `(N, D, H, W)` int.
      smooth, eps: numerator/denominator smoothing (original: 1e-3 and 1e-5).
    Returns:
      `(N,)` float32 in [0, 1). Edge case: an empty label map gives `1 - smooth / (sum(p) + eps + smooth)`,
      i.e. a false-positive penalty that pushes p1 to 0 (about 0 when the prediction is also empty).
    """
    _check_logits_labels(logits, labels)
    p = _softmax(logits.astype(jnp.float32))[..., 1]
    y = (labels == 1).astype(jnp.float32)
    inter = _spatial_sum(p * y)
    return 1.0 - (2.0 * inter + smooth) / (_spatial_sum(p) + _spatial_sum(y) + eps + smooth)


def _voxel_ce(logits: Array, labels: Array) -> Array:
    """Per-voxel softmax cross-entropy `(N, D, H, W)` float32 (labels clipped into the valid range).

    `logsumexp(logits) - logits[label]`, as `optax.softmax_cross_entropy_with_integer_labels` (max-shifted
    logsumexp, the max a constant for differentiation), with the class reductions and the label pick unrolled.
    """
    k = logits.shape[-1]
    lab = jnp.clip(labels.astype(jnp.int32), 0, k - 1)
    x = logits.astype(jnp.float32)
    m = jax.lax.stop_gradient(_class_max(x))
    lse = jnp.log(_class_sum(jnp.exp(x - m[..., None]))) + m
    picked = x[..., 0]
    for c in range(1, k):
        picked = jnp.where(lab == c, x[..., c], picked)
    return lse - picked


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-sample mean softmax cross-entropy (natural log), computed from logits.

    Args:
      logits: `(N, D, H, W, K)` float.
      labels: `(N, D, H, W)` int in {0..K-1} (values outside are clipped into range; mask such samples out).
    Returns:
      `(N,)` float32, >= 0; the mean over the D*H*W voxels of each sample.
    """
    _check_logits_labels(logits, labels)
    return _spatial_mean(_voxel_ce(logits, labels))


def focal_loss(logits: Array, labels: Array, gamma: float = 1.0) -> Array:
    """Per-sample mean focal loss without class weighting (original `LossFocalMulticlass`).

    Per voxel: ce = softmax cross-entropy, p_t = exp(-ce), focal = (1 - p_t)^gamma * ce; averaged over the
    voxels of each sample. `gamma = 0` is plain cross-entropy.

    Args:
      logits: `(N, D, H, W, K)` float; labels `(N, D, H, W)` int.
      gamma: focusing exponent >= 0 (a Python float, static).
    Returns:
      `(N,)` float32, >= 0.
    """
    _check_logits_labels(logits, labels)
    if gamma < 0:
        raise ConfigError(f"focal_loss: gamma={gamma} must be >= 0")
    ce = _voxel_ce(logits, labels)
    if gamma == 0:
        return _spatial_mean(ce)
    one_minus_pt = -jnp.expm1(-ce)  # 1 - exp(-ce), accurate when ce is small
    return _spatial_mean(one_minus_pt**gamma * ce)


def sensitivity_loss(logits: Array, labels: Array) -> Array:
    """Per-sample mean of (1 - p1) over lesion voxels: sum(|p1 - y| * y) / (1e-4 + sum(y)) (original term).

    Returns `(N,)` float32 in [0, 1]; 0 for samples without lesion voxels.
    """
    _check_logits_labels(logits, labels)
    p1 = _softmax(logits.astype(jnp.float32))[..., 1]
    y = (labels == 1).astype(jnp.float32)
    return _spatial_sum(jnp.abs(p1 - y) * y) / (1e-4 + _spatial_sum(y))


def mumford_shah_loss(
    logits: Array, image: Array, eta: float = 1e-3, eps: float = 1e-6, channels: Sequence[int] | None = None
) -> Array:
    """Per-sample Mumford-Shah loss of Kim & Ye 2019 on the softmax output (no labels needed).

    With y_c = softmax(logits)[..., c] and image channels x_m:

        L = sum_c sum_r sum_m (x_m(r) - mu_{m,c})^2 y_c(r)  +  eta * sum_c sum_r |grad y_c(r)|
        mu_{m,c} = sum_r x_m(r) y_c(r) / (sum_r y_c(r) + eps)

    |grad f| is the anisotropic L1 total variation with forward differences along D, H and W
    (sum over axes of |f(r + e_axis) - f(r)|, only pairs inside the volume). Plain sums over classes, channels
    and voxels of one sample (as Kim & Ye's code), so the value scales with the patch size: that is why the
    TMTV-Net weight alpha is 1e-5. Gradients flow through mu (at eps = 0 the mu-gradient of the level term
    vanishes anyway).

    Args:
      logits: `(N, D, H, W, K)` float.
      image: `(N, D, H, W, M)` float, the network input (TMTV-Net: [ct, suv, ct_lung, ct_soft, suv_hot], all
        in [0, 1]).
      eta: weight of the length (TV) term relative to the level term. Default 1e-3, Kim & Ye's LiTS setting
        (total = CE + lambda_A * (L_level + 0.001 * L_TV)); TMTV-Net does not report its value.
      eps: guard of the class mass in mu (a class absent from the patch gives mu = 0, no NaN).
      channels: indices of the image channels that enter the level term; default None = all M input channels.
    Returns:
      `(N,)` float32, >= 0.
    """
    if logits.ndim != 5 or image.ndim != 5 or image.shape[:4] != logits.shape[:4]:
        raise ConfigError(
            f"mumford_shah_loss: logits {logits.shape} and image {image.shape} must be "
            f"(N, D, H, W, K) and (N, D, H, W, M) with equal N, D, H, W"
        )
    y = _softmax(logits.astype(jnp.float32))  # (N, D, H, W, K)
    x = image.astype(jnp.float32)
    if channels is not None:
        x = x[..., tuple(int(c) for c in channels)]
    # Per class c and channel m (K, M are small): elementwise products and full-volume sums that XLA fuses,
    # instead of an einsum over the channel/class axes (a badly shaped matrix product on CPU, forward and
    # backward).
    xs = [x[..., m] for m in range(x.shape[-1])]  # M x (N, D, H, W)
    level = jnp.zeros(logits.shape[0], jnp.float32)
    tv = jnp.zeros(logits.shape[0], jnp.float32)
    for c in range(logits.shape[-1]):
        yc = y[..., c]
        mass = _spatial_sum(yc)  # (N,)
        diff2 = None
        for xm in xs:
            mu = _spatial_sum(xm * yc) / (mass + eps)  # (N,)
            d2 = (xm - mu[:, None, None, None]) ** 2
            diff2 = d2 if diff2 is None else diff2 + d2
        level = level + _spatial_sum(diff2 * yc)
        for axis in (1, 2, 3):
            tv = tv + _spatial_sum(jnp.abs(jnp.diff(yc, axis=axis)))
    return level + eta * tv


def combined_loss(
    logits: Array,
    labels: Array,
    image: Array,
    labeled: Array,
    *,
    alpha: float = 1e-5,
    beta: float = 1.0,
    lam: float = 2.0,
    form: str = "ms_dice_ce",
    eta: float = 1e-3,
    ms_channels: Sequence[int] | None = None,
    gamma: float = 1.0,
    ce_factor: float = 0.5,
    sensitivity: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Per-sample training loss of one output head, semi-supervised.

    `form="ms_dice_ce"` (TMTV-Net paper Eq. 1): `alpha * MS + beta * Dice + lam * CE`.
    `form="original"` (public TMTV-Net code): `Dice + ce_factor * focal(gamma) [+ sensitivity * Sens]`;
    alpha/beta/lam are ignored and there is no MS term.

    Semi-supervised masking: for samples with `labeled == False` the supervised terms (Dice, CE, focal,
    sensitivity) are replaced by exactly 0 (`jnp.where`, so their labels may hold anything, e.g. -1, without
    NaN in value or gradient); only `alpha * MS` remains (so under `form="original"` such a sample's loss is 0).
    Normalisation: nothing is renormalised here. A plain `loss.mean()` over the batch weights every sample
    1/N, so the supervised part is effectively scaled by the labelled fraction of the batch; to average the
    supervised terms over labelled samples only (Kim & Ye), divide `sum(terms[...])` by `max(sum(labeled), 1)`.

    Args:
      logits: `(N, D, H, W, K)` float; labels `(N, D, H, W)` int; image `(N, D, H, W, M)` float (the network
        input, only used by the MS term); labeled `(N,)` bool.
      alpha, beta, lam: weights of MS, Dice, CE (paper: 1e-5, 1, 2).
      form: "ms_dice_ce" or "original".
      eta, ms_channels: passed to `mumford_shah_loss` (eta = TV weight, channels = image channels used).
      gamma, ce_factor, sensitivity: focal exponent and factors of the original form (0.5, 1.0, 0).
    Returns:
      (loss `(N,)` float32, terms): terms are the *unweighted*, masked per-sample values, keys
      "ms", "dice", "ce" (ms_dice_ce) or "dice", "focal" and, if sensitivity != 0, "sensitivity" (original).
    """
    if form not in _FORMS:
        raise ConfigError(f"combined_loss: form={form!r} unknown; use one of {_FORMS}")
    labeled = jnp.asarray(labeled, dtype=bool).reshape(-1)
    if labeled.shape[0] != logits.shape[0]:
        raise ConfigError(f"combined_loss: labeled has {labeled.shape[0]} entries for a batch of {logits.shape[0]}")

    def masked(v: Array) -> Array:
        return jnp.where(labeled, v, 0.0)

    # Labels of unlabelled samples are replaced by 0 before use, so any placeholder value is safe.
    safe_labels = jnp.where(labeled[:, None, None, None], labels, 0)
    terms: dict[str, Array] = {"dice": masked(soft_dice_loss(logits, safe_labels))}
    if form == "ms_dice_ce":
        terms["ms"] = mumford_shah_loss(logits, image, eta=eta, channels=ms_channels)
        terms["ce"] = masked(cross_entropy(logits, safe_labels))
        loss = alpha * terms["ms"] + beta * terms["dice"] + lam * terms["ce"]
    else:
        terms["focal"] = masked(focal_loss(logits, safe_labels, gamma=gamma))
        loss = terms["dice"] + ce_factor * terms["focal"]
        if sensitivity:
            terms["sensitivity"] = masked(sensitivity_loss(logits, safe_labels))
            loss = loss + sensitivity * terms["sensitivity"]
    return loss, terms


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation at source coords i*(n_in-1)/(n_out-1)."""
    m = np.zeros((n_out, n_in), np.float64)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0  # torch: a single input is replicated; a single output samples source index 0
        return m
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 2)
    frac = src - i0
    rows = np.arange(n_out)
    m[rows, i0] += 1.0 - frac
    m[rows, i0 + 1] += frac
    return m


def resize_align_corners(x: Array, shape: Sequence[int]) -> Array:
    """Trilinear resize with align_corners=True semantics (torch `interpolate(..., align_corners=True)`).

    Output voxel i along an axis samples the input at continuous index `i * (n_in - 1) / (n_out - 1)`, so the
    first and last voxels of input and output coincide (`jax.image.resize` is align_corners=False and gives a
    different result). Separable: one small interpolation matrix per axis applied with `einsum` (static shapes,
    cheap, exact gradients). Works for up- and down-sampling; an axis of size 1 (in or out) follows torch
    (replicate / take index 0).

    Args:
      x: `(N, D, H, W, C)` float.
      shape: target spatial size `(D', H', W')`.
    Returns:
      `(N, D', H', W', C)` in x's dtype (computed in float32). Identity when the shape already matches.
    """
    shape = tuple(int(s) for s in shape)
    if x.ndim != 5 or len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"resize_align_corners: need x (N, D, H, W, C) and a 3-D target, got {x.shape} -> {shape}")
    if tuple(x.shape[1:4]) == shape:
        return x
    y = x.astype(jnp.float32)
    for axis, (n_in, n_out) in enumerate(zip(x.shape[1:4], shape), start=1):
        if n_in == n_out:
            continue
        m = jnp.asarray(_align_corners_matrix(n_in, n_out), jnp.float32)
        y = jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(y, axis, 0), axes=(1, 0)), 0, axis)
    return y.astype(x.dtype)


def deep_supervision_loss(
    logits_list: Sequence[Array],
    labels: Array,
    image: Array,
    labeled: Array,
    weights: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    **kw,
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum over deep-supervision heads of `combined_loss` (original: `DeepSupervision`,
    `main/src/layers/deep_supervision.py` of qurit-frizi/TMTV-Net).

    Each head's logits are resized to the label size with `resize_align_corners` (trilinear,
    align_corners=True, applied to the logits before the softmax, as the original), then scored against the
    full-resolution labels and image; the per-head losses are multiplied by `weights` and summed.

    Args:
      logits_list: heads `[dec1 (1/8 res), dec2 (1/4), dec3 (1/2), dec4 (full)]`, each `(N, d, h, w, K)`.
      labels: `(N, D, H, W)` int; image `(N, D, H, W, M)`; labeled `(N,)` bool.
      weights: one weight per head (original: size ratio 0.125, 0.25, 0.5, 1.0).
      **kw: forwarded to `combined_loss` (alpha, beta, lam, form, eta, ...).
    Returns:
      (loss `(N,)` float32, terms): terms hold, per head i, "head{i}/loss" (unweighted head loss) and
      "head{i}/<term>" for each term of `combined_loss`.
    """
    if len(logits_list) != len(weights):
        raise ConfigError(f"deep_supervision_loss: {len(logits_list)} heads but {len(weights)} weights")
    target = tuple(labels.shape[1:4])
    total = jnp.zeros(labels.shape[0], jnp.float32)
    terms: dict[str, Array] = {}
    for i, (head, w) in enumerate(zip(logits_list, weights)):
        head_loss, head_terms = combined_loss(resize_align_corners(head, target), labels, image, labeled, **kw)
        total = total + w * head_loss
        terms[f"head{i}/loss"] = head_loss
        terms.update({f"head{i}/{k}": v for k, v in head_terms.items()})
    return total, terms
