"""Fine-tune converted TMTV-Net weights on a case store of real data (GPU; the seed's chosen path).

    python -m convert_weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net
    python -m clips_jax.data.prepare --input /data/autopet --output cache/autopet          # 6 mm store
    python -m clips_jax.train --config tmtv_finetune \\
        --config.data.store=cache/autopet --config.model.init_weights=weights/tmtv-net --workdir runs/finetune

Variants (`clips_jax/configs/tmtv_finetune.py:VARIANT`):
  ""          one ensemble member (`model.init_member`) fine-tuned at 6 mm on 128x96x96 patches, the original's
              optimiser (AdamW 1e-3 with cosine warm restarts), the paper's MS + Dice + CE loss
  "stacking"  re-train only the stacking conv of the converted ensemble (members frozen)
  "refiner"   fine-tune the refiner at native resolution; needs a native store with stage-A maps:
              prepare --spacing native, then `python -m clips_jax.stage_a --store S --weights W`
  "scratch"   train a full-width U-Net from random initialisation
"""

import importlib.util
import pathlib

import ml_collections

# Load the sibling default config by path (config files are loaded by path, not as a package).
_spec = importlib.util.spec_from_file_location("clips_default_config", pathlib.Path(__file__).with_name("default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The fine-tuning config; `variant` one of "", "stacking", "refiner", "scratch" (module docstring)."""
    c = default.get_config()
    c.steps = 20000
    c.log_every = 50
    c.data.store = ""  # REQUIRED: --config.data.store=cache/...
    c.data.patch_shape = (128, 96, 96)  # the original's training patch at 6 mm
    c.data.batch_size = 2  # global; must be divisible by the number of devices
    c.data.p_foreground = 0.0  # the original samples patches uniformly
    c.data.p_hot_negative = 0.0
    c.data.num_workers = 4
    c.model.kind = "unet"
    c.model.channels = (64, 96, 128, 156)  # used only without init_weights ("scratch")
    c.model.init_channels = 32
    c.model.bottleneck_kernel = 9
    c.model.init_weights = ""  # REQUIRED except for "scratch": a converted weights directory
    c.model.require_init_weights = True
    c.model.dtype = "bfloat16"  # compute in bf16, parameters in fp32
    c.optim.lr = 1e-4  # fine-tuning: 10x below the original's from-scratch rate
    c.optim.restart_steps = 2000
    c.curriculum.steps_per_epoch = 250
    c.curriculum.stage_steps = 250
    c.eval.every_steps = 1000
    c.eval.max_cases = 0
    c.eval.tile_shape = (128, 96, 96)
    c.eval.tile_step = (64, 48, 48)
    c.eval.batch_size = 4
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    if variant == "stacking":
        c.model.kind = "stacking"
        c.steps = 2000
        c.loss.deep_supervision = False
    elif variant == "refiner":
        c.model.kind = "refiner"
        c.data.spacing_mm = 0.0  # native store (documentation only: the store is given explicitly)
        c.data.patch_shape = (96, 96, 96)
        c.eval.tile_shape = (96, 96, 96)
        c.eval.tile_step = (48, 48, 48)
    elif variant == "scratch":
        c.optim.lr = 1e-3
        c.steps = 100000
        c.model.require_init_weights = False
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of clips_jax/configs/tmtv_finetune.py")
    return c
