"""TMTV-Net's stage-A ensemble: 4 identical U-Nets fused by a learned 1x1x1 "stacking" conv (original:
`ModelStacking` in `main/src/model_stacking.py` of qurit-frizi/TMTV-Net).

Forward: for each member, p_i = softmax(logits_i)[..., 1] (lesion probability); the 4 maps are concatenated in
member order `(N, D, H, W, 4)` and mapped by a 1x1x1 conv (4 -> 2, with bias) to the ensemble logits.

Members trained apart (e.g. four runs of `clips-train` with different seeds) have no stacking conv:
`Ensemble.from_members(unets)` builds an ensemble with `combine="mean"`, whose output is the mean of the
members' lesion probabilities (the deep-ensemble average of Lakshminarayanan et al. 2017, NeurIPS), returned as
the logits (log(1 - p), log(p)) so that a softmax gives (1 - p, p) back. `logits_with_members` returns the
ensemble's 2 logits followed by each member's 2 (for `tiled_inference(..., softmax_groups=1 + n_members)`):
one pass gives the ensemble and every member, as the reliability report needs
(`clips_jax.metrics.reliability`).

The members are stored stacked (every parameter has a leading axis of size `n_members`) and run with
`jax.vmap` (GPU) or `lax.map` (CPU: one member after the other, since vmapped kernels would turn every
convolution into a slow grouped one; at inference the activations of one member at a time), so the network
compiles once instead of four times. `ensemble.member(i)` returns one member as an
ordinary `UNet` (e.g. to fine-tune it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clips_jax.errors import ConfigError
from clips_jax.model.layers import ModelConfig, conv3d, prefer_2d_convs
from clips_jax.model.unet import PRETRAINED_CHANNELS, UNet

COMBINE = ("stacking", "mean")
"""How an ensemble combines its members: TMTV-Net's learned stacking conv, or the mean probability."""


def _probability_logits(p: jax.Array) -> jax.Array:
    """Logits (log(1 - p), log(p)) on a new last axis, float32, p clipped to [1e-7, 1 - 1e-7] (softmax -> p)."""
    q = jnp.clip(p.astype(jnp.float32), 1e-7, 1.0 - 1e-7)
    return jnp.stack([jnp.log1p(-q), jnp.log(q)], axis=-1)


class Ensemble(nnx.Module):
    """Ensemble of `n_members` U-Nets + stacking conv.

    Args:
      n_members: number of U-Nets (4 in TMTV-Net).
      unet_kwargs: keyword arguments of `UNet` (in_channels, channels, ...); all members share them.
      dtype: computation dtype (None = float32).
      combine: "stacking" (TMTV-Net: the learned 1x1x1 conv) or "mean" (members trained apart: the mean of
        their lesion probabilities; no stacking parameters).

    Call: `ensemble(x, sigma=None)` with x `(N, D, H, W, C)` (D, H, W divisible by 16) -> logits
    `(N, D, H, W, 2)`; apply softmax for probabilities.
    """

    def __init__(
        self,
        n_members: int = 4,
        *,
        unet_kwargs: dict | None = None,
        dtype=None,
        combine: str = "stacking",
        rngs: nnx.Rngs,
    ):
        if combine not in COMBINE:
            raise ConfigError(f"Ensemble combine={combine!r}: use one of {COMBINE}")
        unet_kwargs = dict(unet_kwargs or {})
        unet_kwargs.setdefault("channels", PRETRAINED_CHANNELS)
        self.n_members = n_members
        self.combine = combine
        extra = {} if combine == "stacking" else {"combine": combine}  # converted weights keep their config
        self.config = ModelConfig(n_members=n_members, unet_kwargs=unet_kwargs, **extra)

        @nnx.split_rngs(splits=n_members)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return UNet(**unet_kwargs, dtype=dtype, rngs=r)

        self.members = make(rngs)
        out_ch = unet_kwargs.get("out_channels", 2)
        if combine == "stacking":
            self.stacking = conv3d(n_members, out_ch, 1, dtype=dtype, rngs=rngs)

    @classmethod
    def from_members(cls, unets: Sequence[UNet]) -> "Ensemble":
        """A `combine="mean"` ensemble of U-Nets trained apart (same architecture; their parameters are copied).

        Raises ConfigError for fewer than 2 members or members of different configs."""
        unets = list(unets)
        if len(unets) < 2:
            raise ConfigError(f"Ensemble.from_members: need at least 2 U-Nets, got {len(unets)}")
        config = unets[0].config
        if any(u.config != config for u in unets[1:]):
            raise ConfigError("Ensemble.from_members: the U-Nets differ in architecture (config); use equal ones")
        kwargs = config.to_json()
        ens = nnx.eval_shape(lambda: cls(len(unets), unet_kwargs=kwargs, combine="mean", rngs=nnx.Rngs(0)))
        graphdef, _ = nnx.split(ens.members)
        states = [nnx.state(u) for u in unets]
        stacked = jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *states)
        ens.members = nnx.merge(graphdef, stacked)
        return ens

    def member_probabilities(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        """Lesion probability of every member, `(N, D, H, W, n_members)` float32."""

        # Plain jax.vmap / lax.map over the split member state (works inside an outer jit/grad, tree-mode clean).
        graphdef, state = nnx.split(self.members)

        def run(s, x, sigma):
            return jax.nn.softmax(nnx.merge(graphdef, s)(x, sigma).astype(jnp.float32), axis=-1)[..., 1]

        if prefer_2d_convs():
            probs = jax.lax.map(lambda s: run(s, x, sigma), state)
        else:
            probs = jax.vmap(run, in_axes=(0, None, None))(state, x, sigma)
        return jnp.moveaxis(probs, 0, -1)

    def _combine(self, p: jax.Array) -> jax.Array:
        """Ensemble logits `(N, D, H, W, 2)` from member probabilities `(N, D, H, W, n_members)`."""
        if self.combine == "mean":
            return _probability_logits(p.mean(axis=-1))
        return self.stacking(
            p.astype(self.stacking.kernel[...].dtype if self.stacking.dtype is None else self.stacking.dtype)
        )

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        return self._combine(self.member_probabilities(x, sigma))

    def logits_with_members(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        """`(N, D, H, W, 2 + 2 n_members)` float32: the ensemble's logits, then member i's as
        (log(1 - p_i), log(p_i)) in channels 2 + 2i, 3 + 2i. A softmax over each pair gives the probabilities
        (`tiled_inference(..., softmax_groups=1 + n_members)`); the network runs once."""
        p = self.member_probabilities(x, sigma)
        members = _probability_logits(p)  # (N, D, H, W, n, 2)
        ens = self._combine(p).astype(jnp.float32)
        return jnp.concatenate([ens, members.reshape(*members.shape[:-2], -1)], axis=-1)

    def member(self, i: int) -> UNet:
        """Member `i` as a standalone `UNet` (a copy of its parameters)."""
        if not 0 <= i < self.n_members:
            raise IndexError(f"member {i} out of range: the ensemble has {self.n_members} members")
        graphdef, state = nnx.split(self.members)
        one = jax.tree.map(lambda a: a[i], state)
        return nnx.merge(graphdef, one)
