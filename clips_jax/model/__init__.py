"""TMTV-Net in Flax NNX: the large-FOV U-Net, the 4-member ensemble with stacking conv, the residual refiner.

from clips_jax.model import load_pretrained
ensemble, refiner = load_pretrained("weights/tmtv-net")     # a directory written by convert_weights
logits = ensemble(x)                                         # x (N, D, H, W, 5) -> (N, D, H, W, 2)
"""

from clips_jax.model.checkpoint import (
    build_model,
    load_model,
    load_pretrained,
    param_dict,
    read_weights_meta,
    save_weights,
)
from clips_jax.model.ensemble import Ensemble
from clips_jax.model.layers import gaussian_smooth, upsample2x_linear
from clips_jax.model.refiner import Refiner
from clips_jax.model.unet import UNet

__all__ = [
    "Ensemble",
    "Refiner",
    "UNet",
    "build_model",
    "gaussian_smooth",
    "load_model",
    "load_pretrained",
    "param_dict",
    "read_weights_meta",
    "save_weights",
    "upsample2x_linear",
]
