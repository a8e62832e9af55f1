"""TMTV-Net's large-FOV 3-D U-Net (stage A) in Flax NNX (original: `UNetBase` with `DeepSupervision` heads in
`SimpleMulticlassUNet_dice_ce_fov_v9_ds_lung_soft_hot_boundary`, qurit-frizi/TMTV-Net
`main/src/model_unet_multiclass_deepsupervision_configured_v1.py`).

Pretrained shape (the default): input 5 channels `[ct, suv, ct_lung, ct_soft, suv_hot]` at 6 mm;
init ConvNormAct(3) 5->32; 4 encoder levels, each ONE stride-2 ConvNormAct(3) (32->64->96->128->156); a 9x9x9
ConvNormAct bottleneck at 1/16 resolution; 4 decoder UpBlocks (156->128->96->64->32, skip first in the
concatenation); four 1x1x1 deep-supervision heads (-> 2 logits) on the decoder outputs; and the backbone's own
3x3x3 output conv, which exists in the pretrained file but is never evaluated (kept so conversion is strict).
21,594,530 parameters. Inference logits come from head 3 (the full-resolution decoder level).

Width, depth and bottleneck kernel are configurable so a narrow variant trains on a laptop CPU.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from clips_jax.errors import ShapeError
from clips_jax.model.layers import ConvNormAct, ModelConfig, UpBlock, conv3d

PRETRAINED_CHANNELS = (64, 96, 128, 156)


class UNet(nnx.Module):
    """3-D U-Net with deep supervision, channels-last.

    Args:
      in_channels: input channels C (5 for TMTV-Net stage A).
      out_channels: logits per voxel (2: background, lesion).
      channels: encoder widths, one per stride-2 level (pretrained: 64, 96, 128, 156).
      init_channels: width of the full-resolution init block (default `channels[0] // 2` = 32).
      bottleneck_kernel: kernel of the bottleneck ConvNormAct (pretrained: 9).
      dtype: computation dtype (None = float32; jnp.bfloat16 for mixed precision). Parameters stay float32.

    Call: `unet(x, sigma=None, deep_supervision=False)` with x `(N, D, H, W, in_channels)`, D, H, W divisible by
    `2 ** len(channels)` (16). Returns logits `(N, D, H, W, out_channels)`, or with `deep_supervision=True` a
    list of 4 logits tensors `[1/8, 1/4, 1/2, full resolution]` (heads 0..3, for 4 levels). `sigma` is the
    curriculum-by-smoothing width (None: no smoothing).
    """

    def __init__(
        self,
        in_channels: int = 5,
        out_channels: int = 2,
        channels: Sequence[int] = PRETRAINED_CHANNELS,
        init_channels: int | None = None,
        bottleneck_kernel: int = 9,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        channels = tuple(int(c) for c in channels)
        init_channels = int(init_channels or channels[0] // 2)
        self.config = ModelConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            init_channels=init_channels,
            bottleneck_kernel=bottleneck_kernel,
        )
        self.levels = len(channels)
        self.init_block = ConvNormAct(in_channels, init_channels, 3, dtype=dtype, rngs=rngs)
        widths = (init_channels,) + channels
        self.downs = nnx.List(
            [ConvNormAct(widths[i], widths[i + 1], 3, stride=2, dtype=dtype, rngs=rngs) for i in range(len(channels))]
        )
        self.middle_block = ConvNormAct(channels[-1], channels[-1], bottleneck_kernel, dtype=dtype, rngs=rngs)
        ups, heads = [], []
        for i in range(len(channels)):
            cin, cout = widths[-1 - i], widths[-2 - i]
            ups.append(UpBlock(cin, cout, cout, dtype=dtype, rngs=rngs))
            heads.append(conv3d(cout, out_channels, 1, dtype=dtype, rngs=rngs))
        self.ups = nnx.List(ups)
        self.heads = nnx.List(heads)
        # Present in the pretrained state_dict, never evaluated (the original backbone's `output` conv): kept for
        # strict conversion.
        self.output = conv3d(init_channels, out_channels, 3, dtype=dtype, rngs=rngs)

    def check_input(self, x: jax.Array) -> None:
        """Raise ShapeError unless x is (N, D, H, W, C_in) with D, H, W divisible by 2**levels."""
        m = 2**self.levels
        c_in = self.config["in_channels"]
        if x.ndim != 5 or x.shape[-1] != c_in:
            raise ShapeError(f"U-Net input must be (N, D, H, W, {c_in}), got {tuple(x.shape)}")
        if any(s % m for s in x.shape[1:4]):
            raise ShapeError(
                f"U-Net spatial size {tuple(x.shape[1:4])} must be divisible by {m} on every axis "
                f"(pad or crop the volume, e.g. tiles of 128x96x96)"
            )

    def __call__(self, x: jax.Array, sigma: jax.Array | None = None, *, deep_supervision: bool = False):
        self.check_input(x)
        h = self.init_block(x, sigma)
        skips = [h]
        for down in self.downs:
            h = down(h, sigma)
            skips.append(h)
        h = self.middle_block(h, sigma)
        feats = []
        for i, up in enumerate(self.ups):
            h = up(h, skips[-2 - i], sigma)
            feats.append(h)
        if deep_supervision:
            return [head(f) for head, f in zip(self.heads, feats)]
        return self.heads[-1](feats[-1])
