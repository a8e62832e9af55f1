"""TMTV-Net's stage-A ensemble: 4 identical U-Nets fused by a learned 1x1x1 "stacking" conv (original:
`ModelStacking` in `main/src/model_stacking.py` of qurit-frizi/TMTV-Net).

Forward: for each member, p_i = softmax(logits_i)[..., 1] (lesion probability); the 4 maps are concatenated in
member order `(N, D, H, W, 4)` and mapped by a 1x1x1 conv (4 -> 2, with bias) to the ensemble logits.

The members are stored stacked (every parameter has a leading axis of size `n_members`) and run with
`jax.vmap` (GPU) or `lax.map` (CPU: one member after the other, since vmapped kernels would turn every
convolution into a slow grouped one; at inference the activations of one member at a time), so the network
compiles once instead of four times. `ensemble.member(i)` returns one member as an
ordinary `UNet` (e.g. to fine-tune it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clips_jax.model.layers import ModelConfig, conv3d, prefer_2d_convs
from clips_jax.model.unet import PRETRAINED_CHANNELS, UNet


class Ensemble(nnx.Module):
    """Ensemble of `n_members` U-Nets + stacking conv.

    Args:
      n_members: number of U-Nets (4 in TMTV-Net).
      unet_kwargs: keyword arguments of `UNet` (in_channels, channels, ...); all members share them.
      dtype: computation dtype (None = float32).

    Call: `ensemble(x, sigma=None)` with x `(N, D, H, W, C)` (D, H, W divisible by 16) -> logits
    `(N, D, H, W, 2)`; apply softmax for probabilities.
    """

    def __init__(self, n_members: int = 4, *, unet_kwargs: dict | None = None, dtype=None, rngs: nnx.Rngs):
        unet_kwargs = dict(unet_kwargs or {})
        unet_kwargs.setdefault("channels", PRETRAINED_CHANNELS)
        self.n_members = n_members
        self.config = ModelConfig(n_members=n_members, unet_kwargs=unet_kwargs)

        @nnx.split_rngs(splits=n_members)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return UNet(**unet_kwargs, dtype=dtype, rngs=r)

        self.members = make(rngs)
        out_ch = unet_kwargs.get("out_channels", 2)
        self.stacking = conv3d(n_members, out_ch, 1, dtype=dtype, rngs=rngs)

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

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        p = self.member_probabilities(x, sigma)
        return self.stacking(
            p.astype(self.stacking.kernel[...].dtype if self.stacking.dtype is None else self.stacking.dtype)
        )

    def member(self, i: int) -> UNet:
        """Member `i` as a standalone `UNet` (a copy of its parameters)."""
        if not 0 <= i < self.n_members:
            raise IndexError(f"member {i} out of range: the ensemble has {self.n_members} members")
        graphdef, state = nnx.split(self.members)
        one = jax.tree.map(lambda a: a[i], state)
        return nnx.merge(graphdef, one)
