"""TMTV-Net's residual refiner (stage B) in Flax NNX (original: `Refiner` in qurit-frizi/TMTV-Net,
`main/src/model_refiner_multiclass_deepsupervision_configured_v1.py`).

Fully convolutional at native PET resolution: ConvNormAct(9) 6->32 (no conv bias) -> 4 residual blocks (32) ->
ConvNormAct(1) 32->2 whose InstanceNorm(2) + LeakyReLU are applied to the logits (unusual, reproduced).
Input channels: `[ct, suv, ct_lung, ct_soft, suv_hot, stage-A lesion probability]`. 361,796 parameters.
Receptive field 25 voxels; any spatial size works.
"""

from __future__ import annotations

import jax
from flax import nnx

from clips_jax.errors import ShapeError
from clips_jax.model.layers import ConvNormAct, ModelConfig, ResBlock


class Refiner(nnx.Module):
    """Residual refiner. Call `refiner(x, sigma=None)` with x `(N, D, H, W, in_channels)` -> logits
    `(N, D, H, W, out_channels)` (after the final InstanceNorm + LeakyReLU, as the original)."""

    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 2,
        features: int = 32,
        n_blocks: int = 4,
        first_kernel: int = 9,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.config = ModelConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            n_blocks=n_blocks,
            first_kernel=first_kernel,
        )
        self.first = ConvNormAct(in_channels, features, first_kernel, use_bias=False, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([ResBlock(features, use_bias=False, dtype=dtype, rngs=rngs) for _ in range(n_blocks)])
        self.last = ConvNormAct(features, out_channels, 1, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None) -> jax.Array:
        c_in = self.config["in_channels"]
        if x.ndim != 5 or x.shape[-1] != c_in:
            raise ShapeError(f"refiner input must be (N, D, H, W, {c_in}), got {tuple(x.shape)}")
        h = self.first(x, sigma)
        for block in self.blocks:
            h = block(h, sigma)
        return self.last(h)
