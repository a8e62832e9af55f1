"""The embedded default: train a narrow TMTV-Net U-Net on built-in synthetic PET/CT phantoms (CPU, minutes).

    python -m clips_jax.train                                   # this config
    python -m clips_jax.train --config default:tiny  # seconds; what the tests run

Everything that changes a result is here; a run's `workdir/config.json` reproduces it.
"""

import ml_collections

from clips_jax.data import cohort


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The training config; `variant` "" (the default job) or "tiny" (`--config default:tiny`)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 300
    c.num_devices = 0  # 0 = all devices (all hosts)
    c.log_every = 10
    c.steps_per_call = 0  # device data path: training steps per compiled call (lax.scan); logging,
    # validation and checkpoints happen between calls. 0 = auto: 10 on
    # accelerators, 1 on CPU (XLA:CPU runs scan bodies ~12x slower)
    c.max_nonfinite = 5  # stop after this many non-finite steps in a row
    c.quiet = False

    c.data = ml_collections.ConfigDict()
    c.data.store = ""  # a case store from `python -m clips_jax.data.prepare`; "" = built-in phantoms
    c.data.teacher = ""  # transfer-teacher scores to read (a teacher id of the store); "" = its default
    c.data.spacing_mm = 6.0  # phantom store grid (TMTV-Net stage A: 6 mm isotropic; 0 = native, refiner)
    c.data.patch_shape = (32, 32, 32)  # (z, y, x) voxels, divisible by 16 (TMTV-Net: 128 x 96 x 96)
    c.data.batch_size = 2  # global batch (all devices)
    c.data.p_foreground = 0.5  # probability of centring a patch on a lesion voxel (original: 0)
    c.data.p_hot_negative = 0.0  # else: probability of centring it on SUV >= hot_suv outside lesions (hard negatives)
    c.data.hot_suv = 2.5  # g/ml
    c.data.augment = True
    c.data.num_workers = 0  # grain worker processes (0 = threads in this process; host path only)
    c.data.pipeline = "auto"  # "device": store on the accelerator, crops + augmentation in the compiled step;
    # "host": grain pipeline; "auto": device when the store fits device_store_gb
    c.data.device_store_gb = 4.0  # per-device memory budget (GiB) for the device path's case store
    c.data.use_unlabeled = False  # also train on cases without SEG (Mumford-Shah term only)
    c.data.phantoms = ml_collections.ConfigDict()
    c.data.phantoms.cases = 24
    c.data.phantoms.seed = 0
    c.data.phantoms.size = "full"
    c.data.phantoms.cache = "cache"
    # their split: "" = prepare's seeded 70/15/15; "study" = the difficulty-stratified split of
    # clips_jax/data/cohort.py with the three counts below (lesion-bearing test, lesion-free test, validation cases);
    # or the path of a split JSON file {"train": [ids], "val": [...], "test": [...]} (docs/data.md)
    c.data.phantoms.split = ""
    for key, count in cohort.STUDY_DEFAULTS.items():
        c.data.phantoms[key] = count

    c.model = ml_collections.ConfigDict()
    c.model.kind = "unet"  # "unet" | "stacking" | "refiner"
    c.model.channels = (8, 16, 32, 32)  # TMTV-Net: (64, 96, 128, 156)
    c.model.init_channels = 8  # TMTV-Net: 32
    c.model.bottleneck_kernel = 3  # TMTV-Net: 9
    c.model.refiner_features = 32
    c.model.refiner_blocks = 4
    c.model.init_weights = ""  # converted TMTV-Net weights directory (fine-tuning)
    c.model.init_member = 0  # which ensemble member to fine-tune
    c.model.require_init_weights = False  # True: refuse to start without init_weights (fine-tuning configs)
    c.model.dtype = "float32"  # or "bfloat16" (parameters stay float32)

    c.loss = ml_collections.ConfigDict()
    c.loss.form = "ms_dice_ce"  # alpha*MumfordShah + beta*Dice + lam*CE; "original" = Dice + 0.5*focal
    c.loss.alpha = 1e-5
    c.loss.beta = 1.0
    c.loss.lam = 2.0
    c.loss.eta = 1e-3  # Mumford-Shah total-variation weight
    c.loss.deep_supervision = True
    c.loss.ds_weights = (0.125, 0.25, 0.5, 1.0)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-2  # a short CPU run needs a high rate (TMTV-Net from scratch: 1e-3)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-6
    c.optim.clip_norm = 1.0
    c.optim.restart_steps = 0  # cosine warm-restart period (0 = the whole run)
    c.optim.restart_decay = 0.9
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.0  # > 0: validate and keep the best of a moving average of the weights (e.g. 0.998;
    # time constant 1 / (1 - decay) steps; trainer.weight_average). 0 = the trained weights themselves

    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.name = "none"  # a preset of clips_jax.curricula.PRESETS (see docs/curricula.md)
    c.curriculum.options = ml_collections.ConfigDict()
    c.curriculum.steps_per_epoch = 10  # the unit curricula count epochs in
    c.curriculum.stage_steps = 10  # sampling weights are recomputed every stage

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "val"
    c.eval.every_steps = 50
    c.eval.at_start = True  # also evaluate the untrained model (step 0)
    c.eval.max_cases = 0  # 0 = all
    # Tiles = the training patch: InstanceNorm statistics of a bigger tile (more background) differ from
    # those seen in training (measured: val Dice 0.12 with 96 x 80 x 80 tiles, 0.27 with 32^3, same training settings).
    c.eval.tile_shape = (32, 32, 32)  # phantoms at 6 mm are ~163 x 68 x 68
    c.eval.tile_step = (24, 24, 24)  # 128 tiles per case, with the evaluator's last tile flush with each axis' end
    c.eval.batch_size = 2

    # Stop at a plateau: end the run at the first validation from step `after_steps` at which the best validation
    # Dice of the last 20 % of its steps is at most 0.01 above the best before (clips_jax/convergence.py, the rule
    # the curriculum comparison judges runs by), with at least `min_last_evals` validations in that last 20 %.
    # `steps` is then the most the run trains (and what the learning-rate schedule spans).
    c.stop_at_plateau = ml_collections.ConfigDict()
    c.stop_at_plateau.enabled = False
    c.stop_at_plateau.after_steps = 0
    c.stop_at_plateau.min_last_evals = 3

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3

    c.debug = ml_collections.ConfigDict()
    c.debug.poison_steps = ()  # steps whose batch is replaced by NaN (tests the non-finite guard)
    c.debug.stop_after_steps = -1  # >= 0: exit after that many steps of this run (simulated interruption)

    if variant == "tiny":
        c.steps = 6
        c.log_every = 2
        c.data.phantoms.cases = 6
        c.data.phantoms.size = "small"
        c.data.patch_shape = (32, 16, 16)
        c.model.channels = (4, 4, 8, 8)
        c.model.init_channels = 4
        c.curriculum.steps_per_epoch = 2
        c.curriculum.stage_steps = 2
        c.eval.every_steps = 6
        c.eval.tile_shape = (32, 16, 16)
        c.eval.tile_step = (16, 8, 8)
        c.checkpoint.every_steps = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of clips_jax/configs/default.py (use '' or 'tiny')")
    return c
