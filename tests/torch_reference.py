"""A plain-PyTorch reference of TMTV-Net's three networks, written from a description of the original models
(qurit-frizi/TMTV-Net: `main/src/layers/`, `main/src/model_stacking.py`,
`main/src/model_refiner_multiclass_deepsupervision_configured_v1.py`), used by the parity tests and the forward
benchmark. Not the original code (research-use-only).

The module nesting reproduces the original state_dict names exactly (checked against tmtv-net-state-dict.json by
tests/test_parity.py): e.g. `model.backbone.downs.0.ops.ops.0.ops.0.weight` comes from
TorchUNet.model(_DeepSup).backbone(_Backbone).downs[0](_Wrap).ops(_CNA).ops[0](_Conv).ops[0](Conv3d).
Layout is PyTorch's NCDHW. Widths/depths are parameters so narrow variants can be built for fast tests.

    unet = TorchUNet()                         # 21,594,530 parameters; unet(x) -> logits (N, 2, D, H, W)
    unet(x, deep_supervision=True)             # list of the 4 head outputs [1/8, 1/4, 1/2, full]
    ens = TorchEnsemble()                      # 4 U-Nets + staking_blocks (86,378,130)
    ref = TorchRefiner()                       # 361,796
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRETRAINED_CHANNELS = (64, 96, 128, 156)


class _Conv(nn.Module):
    """`ops = [Conv3d]` with padding k//2 (the original BlockConv)."""

    def __init__(self, cin, cout, k, stride=1, bias=True):
        super().__init__()
        self.ops = nn.Sequential(nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=bias))

    def forward(self, x):
        return self.ops(x)


class _CNA(nn.Module):
    """`ops = [_Conv, InstanceNorm3d(affine, eps 1e-5), LeakyReLU(0.01)]` (activation optional)."""

    def __init__(self, cin, cout, k, stride=1, bias=True, activation=True):
        super().__init__()
        layers = [_Conv(cin, cout, k, stride, bias), nn.InstanceNorm3d(cout, affine=True, eps=1e-5)]
        if activation:
            layers.append(nn.LeakyReLU(0.01))
        self.ops = nn.Sequential(*layers)

    def forward(self, x):
        return self.ops(x)


class _Wrap(nn.Module):
    """One more `.ops` level (the original Down / LatentConv wrappers)."""

    def __init__(self, inner):
        super().__init__()
        self.ops = inner

    def forward(self, x):
        return self.ops(x)


class _Head(nn.Module):
    """C(k): a CNA with norm and activation removed, i.e. `ops = [_Conv]` (output conv and DS heads)."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.ops = nn.Sequential(_Conv(cin, cout, k))

    def forward(self, x):
        return self.ops(x)


class _UpDeconvSkipConv(nn.Module):
    """Upsample x2 trilinear (align_corners=False) -> Conv3d(3) -> IN -> LReLU; concat [skip, x]; CNA(3)."""

    def __init__(self, cin, skip, cout):
        super().__init__()
        self.ops_deconv = _Wrap(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                nn.Conv3d(cin, cout, 3, padding=1),
                nn.InstanceNorm3d(cout, affine=True, eps=1e-5),
                nn.LeakyReLU(0.01),
            )
        )
        self.ops_conv = _CNA(skip + cout, cout, 3)

    def forward(self, x, skip):
        return self.ops_conv(torch.cat([skip, self.ops_deconv(x)], dim=1))


class _Up(nn.Module):
    def __init__(self, cin, skip, cout):
        super().__init__()
        self.ops = _UpDeconvSkipConv(cin, skip, cout)

    def forward(self, x, skip):
        return self.ops(x, skip)


class _Backbone(nn.Module):
    def __init__(self, cin, channels, init_channels, bottleneck_kernel, cout):
        super().__init__()
        widths = (init_channels,) + tuple(channels)
        self.init_block = _CNA(cin, init_channels, 3)
        self.downs = nn.ModuleList([_Wrap(_CNA(widths[i], widths[i + 1], 3, stride=2)) for i in range(len(channels))])
        self.middle_block = _Wrap(_CNA(channels[-1], channels[-1], bottleneck_kernel))
        self.ups = nn.ModuleList([_Up(widths[-1 - i], widths[-2 - i], widths[-2 - i]) for i in range(len(channels))])
        self.output = _Head(init_channels, cout, 3)

    def forward(self, x):
        """Returns the decoder outputs [dec1, ..., decL] (coarse to fine); `output` is not evaluated."""
        h = self.init_block(x)
        skips = [h]
        for d in self.downs:
            h = d(h)
            skips.append(h)
        h = self.middle_block(h)
        feats = []
        for i, u in enumerate(self.ups):
            h = u(h, skips[-2 - i])
            feats.append(h)
        return feats


class _DeepSup(nn.Module):
    def __init__(self, cin, channels, init_channels, bottleneck_kernel, cout):
        super().__init__()
        self.backbone = _Backbone(cin, channels, init_channels, bottleneck_kernel, cout)
        widths = (init_channels,) + tuple(channels)
        self.outputs = nn.ModuleList([_Head(widths[-2 - i], cout, 1) for i in range(len(channels))])

    def forward(self, x):
        return [head(f) for head, f in zip(self.outputs, self.backbone(x))]


class TorchUNet(nn.Module):
    """Large-FOV U-Net with deep supervision (state_dict prefix `model.`). forward(x NCDHW) -> logits of head L-1,
    or all heads with deep_supervision=True."""

    def __init__(
        self, in_channels=5, out_channels=2, channels=PRETRAINED_CHANNELS, init_channels=None, bottleneck_kernel=9
    ):
        super().__init__()
        self.model = _DeepSup(
            in_channels, tuple(channels), init_channels or channels[0] // 2, bottleneck_kernel, out_channels
        )

    def forward(self, x, deep_supervision=False):
        outs = self.model(x)
        return outs if deep_supervision else outs[-1]


class TorchEnsemble(nn.Module):
    """`base_models` (n U-Nets) + `staking_blocks` Conv3d(n, 2, 1). forward -> ensemble logits."""

    def __init__(self, n_members=4, **unet_kwargs):
        super().__init__()
        self.base_models = nn.ModuleList([TorchUNet(**unet_kwargs) for _ in range(n_members)])
        self.staking_blocks = nn.Conv3d(n_members, unet_kwargs.get("out_channels", 2), 1)

    def forward(self, x):
        p = torch.cat([F.softmax(m(x), dim=1)[:, 1:2] for m in self.base_models], dim=1)
        return self.staking_blocks(p)


class _ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1 = _CNA(c, c, 3, bias=False)
        self.block_2 = _CNA(c, c, 3, bias=False, activation=False)

    def forward(self, x):
        return F.leaky_relu(x + self.block_2(self.block_1(x)), 0.01)


class _RefinerNet(nn.Module):
    def __init__(self, cin, cout, features, n_blocks, first_kernel):
        super().__init__()
        self.ops = nn.Sequential(
            _CNA(cin, features, first_kernel, bias=False),
            *[_ResBlock(features) for _ in range(n_blocks)],
            _CNA(features, cout, 1, bias=False),
        )

    def forward(self, x):
        return self.ops(x)


class TorchRefiner(nn.Module):
    """Residual refiner (state_dict prefix `model.ops.`); the logits pass through IN(2) + LReLU."""

    def __init__(self, in_channels=6, out_channels=2, features=32, n_blocks=4, first_kernel=9):
        super().__init__()
        self.model = _RefinerNet(in_channels, out_channels, features, n_blocks, first_kernel)

    def forward(self, x):
        return self.model(x)


def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Give every InstanceNorm random affine parameters (scale in [0.5, 1.5], shift N(0, 0.2)), so a test
    distinguishes scale from shift and catches swapped mappings."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))


def n_params(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
