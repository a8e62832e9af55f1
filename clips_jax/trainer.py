"""Training: the compiled data-parallel train step, the curriculum-driven loop, validation and checkpoints.

`train_and_evaluate(config, workdir)` is everything `python -m clips_jax.train` does:

1. Data: the case store named by `config.data.store`, or (empty) built-in phantoms generated and prepared
   into `config.data.phantoms.cache` on first use.
2. Model: a U-Net (from scratch, or initialised from converted TMTV-Net weights: fine-tuning), the refiner,
   or only the stacking conv of a converted ensemble (`config.model.kind`).
3. One pure train step `step(state, batch, sigma) -> (state, metrics)` compiled once with `jax.jit`, the
   state donated and replicated, the batch sharded over a 1-D `Mesh` of all devices (axis "data"):
   gradients of the global-mean loss are all-reduced by the compiler (GSPMD). Non-finite loss or gradient:
   the update is skipped inside the step and counted; after `max_nonfinite` in a row the run stops.
4. The curriculum (`clips_jax.curricula`) gives per-case sampling weights per stage of
   `curriculum.stage_steps` steps (the grain pipeline is rebuilt at each stage), a smoothing sigma per step
   (a traced argument: never recompiles), and is updated after every step with the per-case losses (and, for
   the bandit, the prediction gain measured by a second forward pass on the same batch).
5. Validation every `eval.every_steps` steps by whole-volume tiled inference on the validation split
   (Dice, TMTV error, FP/FN volumes); metrics as JSON lines in `workdir/metrics.jsonl`. With
   `optim.ema_decay` > 0 the step also keeps an exponential moving average of the weights
   (`weight_average`), and validation and the best checkpoint use that average instead of the last weights.
6. Orbax checkpoints in `workdir/checkpoints/last` (the last `checkpoint.keep`) and
   `workdir/checkpoints/best` (best validation Dice): parameters, optimizer state, step, curriculum state,
   data-iterator state and stage. Re-running the same command resumes exactly where the last checkpoint was.
7. Optionally (`stop_at_plateau.enabled`) the run ends early at the first validation, from step
   `stop_at_plateau.after_steps`, at which it has plateaued by the rule the curriculum comparison judges runs by
   (`clips_jax.convergence.stop_due`); `steps` is then the most it trains, and summary.json records the step.

Multi-host: call `maybe_initialize_distributed()` first (train.py does); every process runs this same code,
reads its slice of each global batch and takes part in every checkpoint save.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clips_jax import convergence, curricula, evaluation, losses, runs
from clips_jax.data.pipeline import make_train_iterator
from clips_jax.data.store import CaseStore
from clips_jax.errors import ClipsError, ConfigError
from clips_jax.fileio import exclusive_lock, write_text_atomic
from clips_jax.metrics import finite_mean
from clips_jax.model import Refiner, UNet, load_model, read_weights_meta
from clips_jax.model.layers import COMPUTE_DTYPES, model_dtype
from clips_jax.provenance import run_provenance
from clips_jax.runs import MetricsWriter, read_metrics  # noqa: F401 - re-exported (tests, scripts)


class TrainingDiverged(ClipsError):
    """Raised when the loss or gradient stayed non-finite for `max_nonfinite` steps in a row."""


# ---------------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Call `jax.distributed.initialize` when this process is one of several, else do nothing.

    Explicit launch (e.g. two processes on one machine): set `CLIPS_COORDINATOR=host:port`,
    `CLIPS_NUM_PROCESSES=N` and `CLIPS_PROCESS_ID=i` in each process's environment. On a cluster JAX detects
    SLURM / Open MPI / Kubernetes itself when `CLIPS_DISTRIBUTED=auto` is set. Must run before any other JAX
    call.
    """
    coord = os.environ.get("CLIPS_COORDINATOR")
    if coord:
        # Cross-process collectives of the CPU backend (only used when the devices are CPUs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["CLIPS_NUM_PROCESSES"]),
            process_id=int(os.environ["CLIPS_PROCESS_ID"]),
        )
    elif os.environ.get("CLIPS_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh (axis "data") over the first `num_devices` devices (0 = all, all hosts)."""
    devices = jax.devices()
    n = len(devices) if num_devices in (0, None) else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices={num_devices}: {len(devices)} devices available")
    return jax.sharding.Mesh(np.asarray(devices[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ---------------------------------------------------------------------------------------------------------
# Model, optimiser, state
# ---------------------------------------------------------------------------------------------------------


def build_training_model(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Callable]:
    """The network to train and a filter selecting its trainable parameters, from a training config.

    (Not `clips_jax.model.build_model`, which instantiates one network from its class name and constructor
    config.)

    `config.model.kind`:
      "unet": `UNet(5 -> 2)` with `channels`, `init_channels`, `bottleneck_kernel`; or, if `init_weights` names
        a converted weights directory, its "unet" model or member `init_member` of its "ensemble" (then the
        architecture comes from the weights). All parameters train.
      "stacking": the converted "ensemble" of `init_weights`; only the stacking conv trains (the original
        trains its 4 members separately and freezes them under the stacking conv).
      "refiner": `Refiner(6 -> 2)` (or the converted "refiner"); the 6th input channel is the stage-A lesion
        probability stored in the case store: prepare it at native resolution (`python -m
        clips_jax.data.prepare ... --spacing native`) and add the stage-A maps (`python -m clips_jax.stage_a
        --store CACHE --weights W`). All parameters train.
    """
    m = config.model
    if m.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"model.dtype={m.dtype!r}: use one of {sorted(COMPUTE_DTYPES)}")
    dtype = model_dtype(m.dtype)
    rngs = nnx.Rngs(int(config.seed))
    weights = m.get("init_weights", "")
    if m.get("require_init_weights", False) and not weights:
        raise ConfigError(
            "this config fine-tunes converted TMTV-Net weights: set --config.model.init_weights=DIR "
            "(convert them with `python -m convert_weights --ensemble e_latest.model --refiner "
            "r_latest.model --out DIR`; see docs/weights.md)"
        )
    if m.kind == "unet":
        if weights:
            names = read_weights_meta(weights)["models"]
            if "unet" in names:
                model = load_model(weights, "unet", dtype=dtype)
            elif "ensemble" in names:
                model = load_model(weights, "ensemble", dtype=dtype).member(int(m.init_member))
            else:
                raise ConfigError(f"{weights}: has no 'unet' or 'ensemble' model to fine-tune ({sorted(names)})")
        else:
            model = UNet(
                5,
                2,
                channels=tuple(m.channels),
                init_channels=m.get("init_channels") or None,
                bottleneck_kernel=int(m.bottleneck_kernel),
                dtype=dtype,
                rngs=rngs,
            )
        return model, nnx.Param
    if m.kind == "stacking":
        if not weights:
            raise ConfigError("model.kind='stacking' needs model.init_weights: a converted ensemble directory")
        model = load_model(weights, "ensemble", dtype=dtype)
        return model, nnx.All(nnx.Param, nnx.PathContains("stacking"))
    if m.kind == "refiner":
        if weights:
            model = load_model(weights, "refiner", dtype=dtype)
        else:
            model = Refiner(
                6, 2, features=int(m.refiner_features), n_blocks=int(m.refiner_blocks), dtype=dtype, rngs=rngs
            )
        return model, nnx.Param
    raise ConfigError(f"model.kind={m.kind!r}: use 'unet', 'stacking' or 'refiner'")


def cosine_restarts_schedule(lr: float, period_steps: int, decay: float = 0.9, warmup_steps: int = 0) -> optax.Schedule:
    """Cosine annealing with warm restarts (the original's `CosineAnnealingWarmRestartsDecayed`,
    `main/corelib/src/optimizers_v2.py` of qurit-frizi/TMTV-Net): within each period of `period_steps` the rate goes
    from `lr * decay**k` (k = completed periods) down to 0 along a half cosine; optional linear warm-up."""
    period = max(1, int(period_steps))

    def schedule(count):
        t = jnp.maximum(count - warmup_steps, 0)
        k = t // period
        frac = (t % period) / period
        value = lr * (decay**k) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        if warmup_steps:
            value = jnp.where(count < warmup_steps, lr * (count + 1) / warmup_steps, value)
        return value

    return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 1e-6) after global-norm clipping (1.0), with
    cosine warm restarts (period `optim.restart_steps`, x0.9 per restart)."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The run's learning-rate schedule (step -> lr) from `config.optim` (see `cosine_restarts_schedule`)."""
    o = config.optim
    return cosine_restarts_schedule(o.lr, o.restart_steps or config.steps, o.restart_decay, o.warmup_steps)


def init_train_state(
    model: nnx.Module, trainable, tx: optax.GradientTransformation, ema_decay: float = 0.0
) -> tuple[Any, dict]:
    """Split the model into (graphdef, state). `state` is the pytree the step donates and checkpoints:
    `{"params": trainable params, "rest": everything else, "opt_state", "step", "nonfinite", "skipped"}`, plus
    "ema" (an `optax.EmaState` over the trainable params) when `ema_decay` > 0 (`weight_average`)."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    state = {
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }
    if ema_decay > 0:
        state["ema"] = weight_average(ema_decay).init(params)
    return graphdef, state


def ema_decay_of(config) -> float:
    """`config.optim.ema_decay` (0.0 when absent: configs and runs written before it existed); ConfigError
    outside [0, 1)."""
    decay = float(config.optim.get("ema_decay", 0.0) or 0.0)
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"optim.ema_decay={decay}: use 0 (no weight average) or a decay in (0, 1), e.g. 0.998")
    return decay


def weight_average(decay: float) -> optax.GradientTransformation:
    """The exponential moving average of the trained weights kept when `optim.ema_decay` > 0: `optax.ema`
    applied to the parameters after each update, `ema <- decay * ema + (1 - decay) * params` from zeros, read
    out bias-corrected (`averaged_params`). Iterate averaging (Polyak & Juditsky 1992, SIAM J. Control Optim.
    30:838) in its exponential form (e.g. Morales-Brotons et al. 2024, "Exponential moving average of weights in
    deep learning: dynamics and benefits", TMLR): validation, the best checkpoint and
    `clips_jax.runs.load_run_model` see the average, which smooths the step-to-step noise of the weights but
    lags a model that is still improving by about its time constant, 1 / (1 - decay) steps
    (docs/experiments.md, "A weight average and longer runs", measures both on the curriculum study)."""
    return optax.ema(decay, debias=True)


def averaged_params(params, ema_state, decay: float):
    """The bias-corrected moving average of an `optax.EmaState` (`weight_average`): the mean of the weights
    after each of the n = `ema_state.count` updates so far, weighted by decay**age and divided by
    1 - decay**n (computed as -expm1(n * log1p(-(1 - decay))), accurate in float32 for a decay near 1);
    `params` (the current weights, same tree) before the first update (n = 0). Same tree, shapes and dtypes
    as `params`."""
    count = ema_state.count
    n = jnp.maximum(count, 1).astype(jnp.float32)
    norm = -jnp.expm1(n * jnp.log1p(jnp.float32(-(1.0 - decay))))
    return jax.tree.map(lambda a, p: jnp.where(count > 0, a / norm, p).astype(p.dtype), ema_state.ema, params)


def eval_params(state: dict, decay: float):
    """The trainable weights that validation and the best checkpoint use: the moving average
    (`averaged_params`) when the state keeps one (`optim.ema_decay` > 0), else the trained weights."""
    if "ema" not in state:
        return state["params"]
    return averaged_params(state["params"], state["ema"], decay)


def supervised_loss(per_sample: jax.Array, terms: dict, config: ml_collections.ConfigDict, deep: bool) -> jax.Array:
    """Per-sample supervised loss of the full-resolution head: its loss without the alpha * Mumford-Shah term.

    That is beta * Dice + lam * CE ("ms_dice_ce") or Dice + focal terms ("original"): the part that compares
    the prediction with the label, the difficulty signal of the self-paced and bandit curricula (the MS term
    follows the CT content of the crop, not how well the lesion is segmented). Args: per_sample (B,) the
    total loss (used when there is no deep supervision); terms: the loss terms of `losses.combined_loss` /
    `losses.deep_supervision_loss`. Returns float32 (B,).
    """
    lc = config.loss
    prefix = ""
    head = per_sample
    if deep:
        last = len(tuple(lc.ds_weights)) - 1
        prefix, head = f"head{last}/", terms[f"head{last}/loss"]
    ms = terms.get(f"{prefix}ms")
    return head if ms is None else head - jnp.float32(lc.alpha) * ms


def make_loss_fn(graphdef, config: ml_collections.ConfigDict, use_sigma: bool) -> Callable:
    """`loss_fn(params, rest, batch, sigma) -> (mean loss, (per-sample loss (B,), supervised loss (B,)))`;
    the supervised loss is `supervised_loss` (full-resolution head, no Mumford-Shah term)."""
    lc = config.loss
    kw = dict(alpha=lc.alpha, beta=lc.beta, lam=lc.lam, form=lc.form, eta=lc.eta)
    deep = config.model.kind == "unet" and lc.deep_supervision

    def loss_fn(params, rest, batch, sigma):
        model = nnx.merge(graphdef, params, rest)
        x = batch["image"]
        s = sigma if use_sigma else None
        if deep:
            outs = [o.astype(jnp.float32) for o in model(x, s, deep_supervision=True)]
            per_sample, terms = losses.deep_supervision_loss(
                outs, batch["label"], x, batch["labeled"], weights=tuple(lc.ds_weights), **kw
            )
        else:
            logits = model(x, s).astype(jnp.float32)
            per_sample, terms = losses.combined_loss(logits, batch["label"], x, batch["labeled"], **kw)
        return jnp.mean(per_sample), (per_sample, supervised_loss(per_sample, terms, config, deep))

    return loss_fn


def make_train_step(
    graphdef, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, use_sigma: bool, with_gain: bool
) -> Callable:
    """The pure train step `(state, batch, sigma) -> (state, metrics)` (not yet jitted).

    batch: `{"image": (B, D, H, W, C) float32, "label": (B, D, H, W) int32, "labeled": (B,) bool}`.
    metrics: scalar "loss", "grad_norm", "finite" (bool: update applied); "per_sample" (B,) losses;
    "supervised" (B,) supervised losses (`supervised_loss`); with `with_gain` also "gain" (B,): the
    per-sample prediction gain of the supervised loss, L(x; theta) - L(x; theta') on the same batch before and
    after the update (Graves et al. 2017, section 3.1).
    A non-finite loss or gradient norm leaves params, optimizer state and the weight average (state "ema", when
    `optim.ema_decay` > 0: `weight_average`) unchanged (the step still counts).
    """
    loss_fn = make_loss_fn(graphdef, config, use_sigma)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    decay = ema_decay_of(config)
    average = weight_average(decay)

    def step(state, batch, sigma):
        if ("ema" in state) != (decay > 0):
            raise ConfigError(
                f"optim.ema_decay={decay:g} but the train state {'holds' if 'ema' in state else 'lacks'} a weight "
                "average: build it with init_train_state(..., ema_decay=trainer.ema_decay_of(config))"
            )
        (loss, (per_sample, supervised)), grads = grad_fn(state["params"], state["rest"], batch, sigma)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new = dict(state)
        new["params"] = keep(params, state["params"])
        new["opt_state"] = keep(opt_state, state["opt_state"])
        if "ema" in state:  # the weight average (`weight_average`) takes in the new weights
            new["ema"] = keep(average.update(params, state["ema"])[1], state["ema"])
        new["step"] = state["step"] + 1
        new["nonfinite"] = jnp.where(finite, 0, state["nonfinite"] + 1)
        new["skipped"] = state["skipped"] + (~finite).astype(jnp.int32)
        metrics = {
            "loss": loss,
            "per_sample": per_sample,
            "supervised": supervised,
            "grad_norm": gnorm,
            "finite": finite,
        }
        if with_gain:
            _, (_, after) = loss_fn(new["params"], state["rest"], batch, sigma)
            metrics["gain"] = supervised - after
        return new, metrics

    return step


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def phantom_dirs(config: ml_collections.ConfigDict) -> tuple[Path, Path]:
    """(raw phantom folder, case-store folder) of the built-in phantoms of `config.data.phantoms`: the raw
    studies (`<case_id>/{CTres,SUV,SEG}.nii.gz + truth.json`) and the store prepared from them at
    `config.data.spacing_mm`, both under `config.data.phantoms.cache`. A store with an explicit split
    (`data.phantoms.split`, `clips_jax.data.cohort`) has its own folder (`cohort.split_tag`)."""
    from clips_jax.data.cohort import split_tag

    d, ph = config.data, config.data.phantoms
    cache = Path(ph.cache).expanduser()
    grid = "native" if not d.spacing_mm else f"{float(d.spacing_mm):g}mm"
    store = f"store_{ph.size}_n{ph.cases}_s{ph.seed}_{grid}{split_tag(ph)}"
    return cache / f"phantoms_{ph.size}_s{ph.seed}", cache / store


#: The lock file, in `data.phantoms.cache`, held while the built-in phantoms are generated and prepared.
PHANTOM_CACHE_LOCK = ".phantoms.lock"


def ensure_store(config: ml_collections.ConfigDict, log: Callable[[str], None]) -> CaseStore:
    """Open `config.data.store`, or generate + prepare the built-in phantoms (cached) when it is empty.

    The phantoms' split: prepare's seeded one, or the explicit split of `data.phantoms.split`
    (`clips_jax.data.cohort.phantom_split`, e.g. "study"), kept in the store folder as `split.json`.
    Generation and preparation are resumable: phantoms and prepared cases already present are skipped.
    Processes of one machine that share the cache (e.g. a comparison run as two processes) build one at a time:
    the others wait for the cache's lock (`PHANTOM_CACHE_LOCK`) and then find the store complete. On several
    hosts process 0 builds and every process waits at a barrier, so all of them must call this function.
    ConfigError when the cache cannot be created or locked."""
    d = config.data
    if d.store:
        return CaseStore(d.store)
    ph = d.phantoms
    raw, store_dir = phantom_dirs(config)
    if jax.process_index() == 0 and not _store_complete(store_dir, ph.cases):
        cache = raw.parent
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cache_lock_error(cache)("open", e) from e
        # One lock for the whole cache: stores of other grids or splits share the raw phantoms folder.
        with exclusive_lock(cache / PHANTOM_CACHE_LOCK, _cache_lock_error(cache)):
            if not _store_complete(store_dir, ph.cases):
                _build_phantom_store(config, raw, store_dir, log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("phantoms")
    return CaseStore(store_dir)


def _store_complete(store_dir: Path, cases: int) -> bool:
    """Whether the phantom store at `store_dir` has its manifest and all `cases` cases."""
    return (store_dir / "manifest.json").is_file() and len(CaseStore(store_dir)) >= cases


def _cache_lock_error(cache: Path) -> Callable[[str, OSError], ClipsError]:
    """The error `ensure_store` raises when the phantom cache's lock cannot be opened or taken."""

    def error(stage: str, e: OSError) -> ClipsError:
        what = "is not writable" if stage == "open" else "is on a file system without file locks"
        return ConfigError(
            f"{cache}: the phantom cache {what} ({e}); set data.phantoms.cache to a writable local folder"
        )

    return error


def _build_phantom_store(
    config: ml_collections.ConfigDict, raw: Path, store_dir: Path, log: Callable[[str], None]
) -> None:
    """Generate the built-in phantoms into `raw` and prepare them into `store_dir` (both resumable: cases
    already there are skipped), with the explicit split of `data.phantoms.split` when there is one."""
    from clips_jax.data.cohort import phantom_split
    from clips_jax.data.phantoms import write_phantoms
    from clips_jax.data.prepare import prepare_dataset

    d, ph = config.data, config.data.phantoms
    log(f"generating {ph.cases} synthetic PET/CT phantoms ({ph.size}) into {raw} (first run only)")
    paths = write_phantoms(raw, ph.cases, ph.seed, ph.size)
    split = phantom_split(ph, raw, [p.name for p in paths])
    if split is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(store_dir / "split.json", json.dumps(split, indent=1))
    prepare_dataset(raw, store_dir, spacing_mm=d.spacing_mm or "native", seed=ph.seed, split_json=split, log=log)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def extra_channels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Input channels beyond the 5 image channels: the refiner's stage-A probability ("stage_a")."""
    return ("stage_a",) if config.model.kind == "refiner" else ()


def evaluate_cases(model: nnx.Module, store: CaseStore, indices, config: ml_collections.ConfigDict) -> dict:
    """Whole-volume tiled inference on store cases; returns mean metrics and per-case rows.

    `clips_jax.evaluation.evaluate_cases` with the `config.eval` tiles (reaching the end of every axis, the
    coverage checked per case), the model's extra input channels (`extra_channels(config)`) and
    `clips_jax.evaluation.validation_row`: per case on the store grid, mask = lesion probability > 0.5
    (argmax of the two blended probabilities), Dice (NaN for a lesion-free case), predicted and true TMTV,
    absolute TMTV error, autoPET FP and FN component volumes (ml, 18-connectivity).
    Returns `{"val_dice": mean Dice over lesion cases, "val_tmtv_abs_err_ml", "val_fpv_ml", "val_fnv_ml",
    "cases": [{"id": case id, **validation_row}, ...]}` (means ignore NaN; NaN when no case defines one).
    """
    e = config.eval
    rows = evaluation.evaluate_cases(
        model,
        store,
        indices,
        tile_shape=tuple(e.tile_shape),
        step=tuple(e.tile_step),
        batch_size=int(e.batch_size),
        row_fn=evaluation.validation_row,
        extra_channels=extra_channels(config),
        id_key="id",
    )
    mean = lambda k: finite_mean(r[k] for r in rows)  # noqa: E731
    return {
        "val_dice": mean("dice"),
        "val_tmtv_abs_err_ml": mean("tmtv_abs_err_ml"),
        "val_fpv_ml": mean("fpv_ml"),
        "val_fnv_ml": mean("fnv_ml"),
        "cases": rows,
    }


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

#: Config keys that define the training data stream (with the curriculum's). A checkpoint records them; resuming
#: with other values would continue a different stream than the one checkpointed, so it is refused.
STREAM_KEYS = (
    "seed",
    "data.store",
    "data.patch_shape",
    "data.batch_size",
    "data.p_foreground",
    "data.p_hot_negative",
    "data.hot_suv",
    "data.augment",
    "data.use_unlabeled",
    "curriculum.name",
    "curriculum.steps_per_epoch",
    "curriculum.stage_steps",
)


def curriculum_settings(curriculum) -> dict:
    """The `curriculum` section of a config (ConfigDict or the dict of a run's config.json) as plain JSON values:
    name, options, steps_per_epoch, stage_steps. A run's summary.json records it, so that a finished run can be
    checked against the settings a comparison would train it with (`compare_curricula.check_run_curriculum`)."""
    if hasattr(curriculum, "to_json_best_effort"):
        return json.loads(curriculum.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(curriculum, sort_keys=True))


#: Config keys of the optimisation a checkpoint continues: resuming with other values would go on along another
#: learning-rate schedule, or without the weight average the state holds (or with one it lacks), or end the run by
#: another rule (`stop_at_plateau`), so it is refused.
SCHEDULE_KEYS = (
    "steps",
    "optim.lr",
    "optim.restart_steps",
    "optim.restart_decay",
    "optim.warmup_steps",
    "stop_at_plateau.enabled",
    "stop_at_plateau.after_steps",
    "stop_at_plateau.min_last_evals",
)


def _settings(config, keys) -> dict:
    """{dotted key: JSON value} of `keys` in `config` (a ConfigDict or the dict of a run's config.json; absent
    keys give None, tuples become lists)."""
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        out[key] = list(node) if isinstance(node, tuple) else node
    return out


def schedule_settings(config) -> dict:
    """{dotted key: JSON value} of `SCHEDULE_KEYS` (absent keys give None) and "optim.ema_decay"
    (`ema_decay_of`: 0.0 when absent) of a ConfigDict or a run's config.json dict."""
    return {**_settings(config, SCHEDULE_KEYS), "optim.ema_decay": ema_decay_of(ml_collections.ConfigDict(config))}


def settings_changed(saved: Mapping, now: Mapping) -> str:
    """ "key: saved -> now, ..." for the keys of `saved` whose value differs in `now` ("" when none; keys an older
    run lacks are not compared)."""
    return ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved) if saved[k] != now.get(k))


def stream_settings(config, teacher: str | None = None) -> dict:
    """{dotted key: JSON value} of `STREAM_KEYS` plus `curriculum.options` (absent keys give None) and
    "data.teacher": the teacher whose scores the case table holds (`teacher`: `data.teacher` resolved to the
    store's default teacher; None when the store has no teacher scores)."""
    out: dict = {"data.teacher": teacher, **_settings(config, STREAM_KEYS)}
    opts = config.curriculum.get("options")
    out["curriculum.options"] = json.loads(opts.to_json_best_effort(sort_keys=True)) if opts is not None else {}
    return out


def check_stop_settings(config) -> None:
    """ConfigError for `stop_at_plateau` settings a run cannot follow or that could never stop it: `after_steps`
    < 0, `min_last_evals` < 1, no validations (`eval.every_steps` 0; an empty validation split is checked when
    the data is open), or validations too sparse or too late for the rule before `steps`
    (`convergence.can_stop`)."""
    c = config.get("stop_at_plateau")
    if c is None or not c.enabled:
        return
    if int(c.after_steps) < 0 or int(c.min_last_evals) < 1:
        raise ConfigError(
            f"stop_at_plateau.after_steps={c.after_steps}, min_last_evals={c.min_last_evals}: use after_steps >= 0 "
            "and min_last_evals >= 1"
        )
    every, steps = int(config.eval.every_steps), int(config.steps)
    if not convergence.can_stop(steps, every, after_steps=int(c.after_steps), min_last_evals=int(c.min_last_evals)):
        raise ConfigError(
            f"stop_at_plateau.enabled, but with validations every {every} steps (eval.every_steps) from step "
            f"{c.after_steps} (after_steps) a run of {steps} steps could never stop: the rule needs "
            f"{convergence.MIN_EVALS} validations and {c.min_last_evals} (min_last_evals) in the last "
            f"{100 * convergence.LAST_FRACTION:g} % of the steps before `steps`. Validate more often, lower "
            "after_steps or min_last_evals, or disable stop_at_plateau"
        )


def choose_pipeline(config: ml_collections.ConfigDict, store: CaseStore, train_idx: np.ndarray) -> str:
    """ "device" or "host": the data path of a run (`config.data.pipeline`).

    "auto" takes the device path (`clips_jax.data.device`: the store on the accelerator, crops and augmentation
    inside the compiled step) when the store is on a resampled grid and its training cases fit
    `data.device_store_gb` GiB per device; otherwise (native-resolution refiner stores, very large cohorts) the
    host grain pipeline. ConfigError for an unknown value.
    """
    choice = str(config.data.get("pipeline", "auto"))
    if choice not in ("auto", "device", "host"):
        raise ConfigError(f"data.pipeline={choice!r}: use 'auto', 'device' or 'host'")
    if choice != "auto":
        return choice
    from clips_jax.data import device

    if store.manifest.get("spacing_mm") is None:  # a native-grid store: large, varying shapes
        return "host"
    need = device.device_store_bytes(store, train_idx, extra_channels=extra_channels(config))
    return "device" if need <= float(config.data.get("device_store_gb", 4.0)) * 2**30 else "host"


class _Run:
    """Everything one training run holds: data, curriculum, model, compiled functions, checkpoints, summary.

    Built by `train_and_evaluate` step by step; the loops (`_host_loop`, `_device_loop`) advance `state`,
    `cur_state` and `step`, and share evaluation, logging, checkpointing and the stop rules below.
    """

    def __init__(self, config, workdir: Path):
        self.config, self.workdir = config, workdir
        self.writer = MetricsWriter(workdir, quiet=bool(config.get("quiet", False)))
        self.summary: dict[str, Any] = {
            "curriculum": config.curriculum.name,
            "curriculum_settings": curriculum_settings(config.curriculum),
            "provenance": run_provenance(),  # of the process that trains its last part; see start_step
        }
        self.steps_done, self.t0 = 0, time.time()
        self.val_curve: list[tuple[int, float]] = []  # (step, validation Dice) of this run so far (resumes too)
        self.stopped_at: int | None = None  # the step the run stopped at by `stop_at_plateau`

    # -- set-up steps ---------------------------------------------------------------------------------------
    def open_data(self) -> None:
        """The case store and the training / validation cases."""
        c = self.config
        self.store = ensure_store(c, self.writer.log)
        train_idx = self.store.split_indices("train")
        self.val_idx = self.store.split_indices(c.eval.split)[: int(c.eval.max_cases) or None]
        if len(train_idx) == 0:
            raise ConfigError(f"case store {self.store.cache_dir}: no training cases (split 'train' is empty)")
        if not c.data.use_unlabeled:
            train_idx = train_idx[self.store.has_seg[train_idx]]
        self.train_idx = train_idx
        self.position = np.full(len(self.store), -1, np.int64)
        self.position[train_idx] = np.arange(len(train_idx))

    def make_curriculum(self) -> None:
        """The curriculum over the training cases, and what it needs from the loop."""
        c = self.config
        self.teacher = c.data.get("teacher") or self.store.default_teacher  # resolved: part of the resume check
        self.table = curricula.case_table_from_manifest(
            self.store.case_rows(teacher=self.teacher), [self.store.ids[i] for i in self.train_idx]
        )
        self.cur = curricula.get_curriculum(c.curriculum.name, **curricula.options_from_config(c))
        cur_state = self.cur.init(self.table)
        self.cur_state = cur_state if jax.tree.leaves(cur_state) else {"_empty": np.zeros((), np.int32)}
        if (self.cur.needs_losses or self.cur.needs_gain) and float(c.data.p_foreground) <= 0:
            raise ConfigError(
                f"curriculum {c.curriculum.name!r} learns from the supervised loss of lesion-centred "
                "crops, and data.p_foreground=0 samples none: set --config.data.p_foreground (e.g. 0.5)"
            )

    def make_model(self) -> None:
        """Mesh, model, optimiser and the pure train step (the state replicated on the mesh)."""
        c = self.config
        self.mesh = make_mesh(int(c.num_devices))
        if c.data.batch_size % self.mesh.size:
            raise ConfigError(
                f"data.batch_size={c.data.batch_size} must be divisible by the {self.mesh.size} "
                f"devices: set --config.data.batch_size to a multiple of {self.mesh.size} or "
                "--config.num_devices"
            )
        self.repl, self.dsh = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        model, trainable = build_training_model(c)
        self.tx, self.schedule = make_optimizer(c), make_schedule(c)
        self.ema_decay = ema_decay_of(c)
        self.graphdef, state = init_train_state(model, trainable, self.tx, self.ema_decay)
        self.state = jax.device_put(state, self.repl)
        self.cur_state = jax.device_put(self.cur_state, self.repl)
        self.step_fn = make_train_step(self.graphdef, c, self.tx, self.cur.smooths, self.cur.needs_gain)

    def restore(self, pipeline: str) -> dict | None:
        """Resume from the latest `last` checkpoint, if any; returns its meta (None for a fresh run). The
        checkpoint's settings are checked (`check_resumable`) before its state is read."""
        self.last_mgr, self.best_mgr = runs.checkpoint_managers(self.workdir, int(self.config.checkpoint.keep))
        self.step = 0
        meta = None
        if self.last_mgr.latest_step() is not None:
            self.check_resumable(runs.read_last_meta(self.last_mgr), pipeline)
            self.state, self.cur_state, meta = runs.restore_last(self.last_mgr, self.state, self.cur_state, self.repl)
            self.step = int(meta["step"])
            self.writer.log(f"resumed from {self.workdir / 'checkpoints' / 'last'} at step {self.step}")
            self.restore_validations()
            self.check_plateau_stop(self.step)  # a run that had stopped there stays stopped
        self.start_step = self.summary["start_step"] = self.step
        if jax.process_index() == 0:  # after the resume check: a refused resume leaves the run's config.json alone
            write_text_atomic(self.workdir / "config.json", self.config.to_json_best_effort(indent=1, sort_keys=True))
        return meta

    def restore_validations(self) -> None:
        """After a resume: the validation curve up to the restored step (for `stop_at_plateau`) and the summary's
        "initial", "final" and "best" validations, from the run's metrics.jsonl (rows after the step, logged
        before an interruption, are dropped; they are logged again)."""
        rows = [r for r in read_metrics(self.workdir, "eval") if int(r["step"]) <= self.step]
        heads = {int(r["step"]): {k: v for k, v in r.items() if k not in ("kind", "step", "cases")} for r in rows}
        self.val_curve = [(s, h.get("val_dice")) for s, h in sorted(heads.items()) if s > 0]
        if 0 in heads:
            self.summary["initial"] = heads[0]
        if self.val_curve:
            self.summary["final"] = heads[self.val_curve[-1][0]]
            finite = [(s, d) for s, d in self.val_curve if d is not None and np.isfinite(d)]
            if finite:
                best = max(finite, key=lambda p: p[1])[0]  # the first of equal maxima, as `evaluate` keeps it
                self.summary["best"] = {"step": best, **heads[best]}

    def check_resumable(self, meta: dict, pipeline: str) -> None:
        """ConfigError unless a checkpoint with `meta` can be resumed by this run: the same data path, the same
        data-stream and curriculum settings (`stream_settings`) and the same schedule and weight average
        (`schedule_settings`). Keys an older checkpoint lacks are not checked, except `optim.ema_decay`
        (`runs.checkpoint_ema_decay`: 0 for checkpoints written before it existed, which hold no average)."""
        if meta.get("pipeline", "host") != pipeline:
            raise ConfigError(
                f"{self.workdir}: its checkpoint was written by the {meta.get('pipeline', 'host')} "
                f"data path and this run would use the {pipeline} one (data.pipeline): resume "
                "with the same data.pipeline, or use a new --workdir"
            )
        for what, saved, now in (
            ("data/curriculum", meta.get("stream") or {}, stream_settings(self.config, self.teacher)),
            (
                "schedule/weight-average",
                {**(meta.get("schedule") or {}), "optim.ema_decay": runs.checkpoint_ema_decay(meta)},
                schedule_settings(self.config),
            ),
        ):
            diff = settings_changed(saved, json.loads(json.dumps(now)))
            if diff:
                raise ConfigError(
                    f"{self.workdir}: its checkpoint was trained with other {what} settings ({diff}); resume "
                    "with the same settings, or use a new --workdir"
                )

    # -- shared by both loops -------------------------------------------------------------------------------
    def eval_weights(self) -> dict:
        """{"params", "rest"} on the host: the weights validation and the best checkpoint use (`eval_params`)."""
        params = eval_params(self.state, self.ema_decay)
        return {"params": jax.device_get(params), "rest": jax.device_get(self.state["rest"])}

    def evaluate(self, step_no: int, initial: bool = False) -> None:
        """Validate, log, and keep the best checkpoint."""
        weights = self.eval_weights()
        model = nnx.merge(self.graphdef, weights["params"], weights["rest"])
        ev = evaluate_cases(model, self.store, self.val_idx, self.config)
        self.writer.write({"kind": "eval", "step": step_no, **ev})
        head = {k: v for k, v in ev.items() if k != "cases"}
        if initial:
            self.summary["initial"] = head
            self.writer.log(
                f"step 0 (untrained): val Dice {ev['val_dice']:.4f}  TMTV |err| {ev['val_tmtv_abs_err_ml']:.1f} ml"
            )
            return
        self.writer.log(
            f"step {step_no}: val Dice {ev['val_dice']:.4f}  TMTV |err| {ev['val_tmtv_abs_err_ml']:.1f} ml"
            f"  FPV {ev['val_fpv_ml']:.1f} ml  FNV {ev['val_fnv_ml']:.1f} ml"
        )
        self.summary["final"] = head
        self.val_curve.append((step_no, ev["val_dice"]))
        if np.isfinite(ev["val_dice"]) and ev["val_dice"] > self.summary.get("best", {}).get("val_dice", -1.0):
            self.summary["best"] = {"step": step_no, **head}
        if np.isfinite(ev["val_dice"]) and int(jax.device_get(self.state["nonfinite"])) == 0:
            runs.save_best(self.best_mgr, step_no, weights, ev["val_dice"])

    def save(self, meta: dict) -> None:
        """Checkpoint the whole state (never during a non-finite streak)."""
        if int(jax.device_get(self.state["nonfinite"])) > 0:
            return
        meta = {
            "step": self.step,
            "curriculum": self.config.curriculum.name,
            "stream": stream_settings(self.config, self.teacher),
            "schedule": schedule_settings(self.config),
            **meta,
        }
        runs.save_last(self.last_mgr, self.step, self.state, self.cur_state, meta)

    def after_steps(
        self, last_loss: float, last_gnorm: float, last_sigma: float, save_meta: Callable[[], dict]
    ) -> None:
        """The bookkeeping due at `self.step`: divergence stop, progress line, validation, checkpoint, debug stop."""
        c, step_no, total = self.config, self.step, int(self.config.steps)
        self.check_diverged(int(jax.device_get(self.state["nonfinite"])), step_no)
        if step_no % int(c.log_every) == 0 or step_no == total:
            rate = self.steps_done / max(time.time() - self.t0, 1e-9)
            self.writer.log(
                f"step {step_no}/{total}  loss {last_loss:.4f}  |g| {last_gnorm:.3f}  sigma "
                f"{last_sigma:.3f}  {rate:.2f} step/s  ETA {_fmt_time((total - step_no) / rate)}"
            )
        if c.eval.every_steps and (step_no % int(c.eval.every_steps) == 0 or step_no == total) and len(self.val_idx):
            self.evaluate(step_no)
            self.check_plateau_stop(step_no)
        if step_no % int(c.checkpoint.every_steps) == 0 or step_no == total or self.stopped_at == step_no:
            self.save(save_meta())
        if 0 <= int(c.debug.stop_after_steps) <= step_no - self.start_step:
            self.last_mgr.wait_until_finished()
            raise SystemExit(f"debug.stop_after_steps: stopping at step {step_no} (simulated interruption)")

    def running(self) -> bool:
        """Whether the loop should train another step: below `steps` and not stopped at a plateau."""
        return self.step < int(self.config.steps) and self.stopped_at is None

    def check_plateau_stop(self, step_no: int) -> None:
        """With `stop_at_plateau.enabled`, end the run at `step_no` when `convergence.stop_due` says its validation
        curve has plateaued there (the last checkpoint is then written at `step_no`)."""
        c = self.config.get("stop_at_plateau")
        if c is None or not c.enabled or self.stopped_at is not None:
            return
        # never during a non-finite streak (no checkpoint could be written at the stop)
        due = int(jax.device_get(self.state["nonfinite"])) == 0 and convergence.stop_due(
            self.val_curve,
            step_no,
            after_steps=int(c.after_steps),
            min_last_evals=int(c.min_last_evals),
            steps=int(self.config.steps),
        )
        if jax.process_count() > 1:  # process 0's decision (it alone reads metrics.jsonl after a resume)
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        if due:
            self.stopped_at = step_no
            self.writer.log(
                f"step {step_no}: validation Dice has plateaued (best of the last {100 * convergence.LAST_FRACTION:g} "
                f"% of steps at most {convergence.TOLERANCE} above the best before): stopping here (stop_at_plateau)"
            )

    def check_diverged(self, nonfinite: int, step_no: int) -> None:
        """Raise TrainingDiverged when `nonfinite` (non-finite steps in a row up to `step_no`) reached the limit."""
        if nonfinite >= int(self.config.max_nonfinite):
            self.last_mgr.wait_until_finished()
            raise TrainingDiverged(
                f"loss or gradient non-finite for {nonfinite} steps in a row (up to step {step_no}); updates "
                f"were skipped and the last good checkpoint is kept in {self.workdir / 'checkpoints' / 'last'} "
                f"(step {self.last_mgr.latest_step()}). Lower optim.lr, check the input data, or raise max_nonfinite."
            )

    def next_stop(self) -> int:
        """The next step at which `after_steps` has work (log, eval, checkpoint, debug stop) or the run ends."""
        c, s = self.config, self.step
        periods = [int(c.log_every), int(c.checkpoint.every_steps)] + (
            [int(c.eval.every_steps)] if c.eval.every_steps else []
        )
        stops = [int(c.steps)] + [(s // p + 1) * p for p in periods if p > 0]
        if int(c.debug.stop_after_steps) >= 0:
            stops.append(self.start_step + int(c.debug.stop_after_steps))
        return max(s + 1, min(stops))

    def stage_row(self, step_no: int, weights: np.ndarray, sigma: float) -> dict:
        """The "curriculum" metrics row of a stage that starts at `step_no`."""
        return {
            "kind": "curriculum",
            "step": step_no,
            "stage": step_no // int(self.config.curriculum.stage_steps),
            **curricula.summarise_weights(weights, self.table),
            "weights": weights.tolist() if len(weights) <= 1000 else None,
            "sigma": float(sigma),
        }

    def train_row(self, step_no: int, m: Mapping[str, Any], case_index, centred, reward: float) -> dict:
        """The "train" metrics row of step `step_no` (1-based: the state after it)."""
        row = {
            "kind": "train",
            "step": step_no,
            "loss": float(m["loss"]),
            "grad_norm": float(m["grad_norm"]),
            "finite": bool(m["finite"]),
            "sigma": float(m["sigma"]),
            "lr": float(self.schedule(step_no - 1)),
            "cases": [self.store.ids[i] for i in case_index],
            "case_losses": np.asarray(m["per_sample"]).tolist(),
            "case_supervised": np.asarray(m["supervised"]).tolist(),
            "lesion_centred": np.asarray(centred).tolist(),
        }
        if self.cur.needs_gain:
            row["gain"] = reward
        return row

    def finish(self) -> dict:
        """Wait for the checkpoints, write summary.json and the final line."""
        self.last_mgr.wait_until_finished()
        self.best_mgr.wait_until_finished()
        elapsed = time.time() - self.t0
        s = self.summary
        s.update(
            {
                "steps": int(self.config.steps),
                "stopped_at_plateau": self.stopped_at,
                "steps_this_run": self.steps_done,
                "skipped_updates": int(jax.device_get(self.state["skipped"])),
                "wall_s": round(elapsed, 2),
                "steps_per_s": round(self.steps_done / max(elapsed, 1e-9), 3),
                "devices": self.mesh.size,
                "processes": jax.process_count(),
                "best_checkpoint_step": self.best_mgr.best_step(),
                "pipeline": self.pipeline,
            }
        )
        runs.write_json(self.workdir, "summary.json", s)
        if "final" in s:
            init = s.get("initial", {}).get("val_dice", float("nan"))
            best = s.get("best", {})
            self.writer.log(
                f"done: {self.steps_done} steps in {_fmt_time(elapsed)} ({s['steps_per_s']} step/s); "
                f"val Dice {init:.4f} (untrained) -> {s['final']['val_dice']:.4f} (final), "
                f"{best.get('val_dice', float('nan')):.4f} (best, step {best.get('step')}, kept in "
                f"checkpoints/best); skipped updates {s['skipped_updates']}; workdir {self.workdir}"
            )
        return s


def _host_loop(run: _Run, meta: dict | None) -> None:
    """Train with the host grain pipeline: weights per stage on the host, one jitted step per batch.

    Per step: the stage's batch iterator (a new stage: `end_stage`, new weights, new iterator) -> the batch
    as global arrays (NaN images on `debug.poison_steps`) -> the jitted step at the curriculum's sigma -> the
    per-sample results of every host -> the curriculum's observation and update -> metrics row, logging,
    checkpoints (`_Run.after_steps`, with the data position for an exact resume).
    """
    c, cur = run.config, run.cur
    cur_sigma = jax.jit(cur.sigma)
    cur_update = jax.jit(cur.update, out_shardings=run.repl)
    step_fn = jax.jit(run.step_fn, donate_argnums=(0,), out_shardings=(run.repl, run.repl))
    stages = _HostStages(run, meta)
    poison = set(int(s) for s in c.debug.poison_steps)
    while run.running():
        step_no = run.step
        local = next(stages.iterator(step_no))
        if step_no in poison:
            local = dict(local, image=np.full_like(local["image"], np.nan))
        batch = {
            k: jax.make_array_from_process_local_data(run.dsh, np.asarray(local[k]))
            for k in ("image", "label", "labeled")
        }
        sigma = cur_sigma(run.cur_state, jnp.int32(step_no))
        run.state, metrics = step_fn(run.state, batch, sigma)
        run.step, run.steps_done = step_no + 1, run.steps_done + 1
        case_index, centred, m = _gather_step_results(local, metrics)
        m["sigma"] = float(sigma)
        obs = curricula.observation_from_step(
            run.position[case_index], centred, m["finite"], m["supervised"], m.get("gain"), step_no
        )
        run.cur_state = cur_update(run.cur_state, obs)
        run.writer.write(run.train_row(run.step, m, case_index, centred, float(obs.reward)))
        run.after_steps(float(m["loss"]), float(m["grad_norm"]), float(sigma), stages.checkpoint_meta)


class _HostStages:
    """The host pipeline's curriculum stages: stage number, its sampling weights (fixed for the stage) and its
    grain batch iterator, restored from and saved into the checkpoint's metadata for an exact resume."""

    def __init__(self, run: _Run, meta: dict | None):
        self.run = run
        self.stage_steps = int(run.config.curriculum.stage_steps)
        self.weights_fn, self.sigma_fn = jax.jit(run.cur.weights), jax.jit(run.cur.sigma)
        self.end_stage_fn = jax.jit(run.cur.end_stage, out_shardings=run.repl)
        self.stage, self.weights, self.data_state, self.it = 0, None, None, None
        if meta is not None:
            self.stage, self.weights = int(meta["stage"]), np.asarray(meta["stage_weights"], np.float64)
            self.data_state = meta["data_state"][jax.process_index()] if meta.get("data_state") else None

    def iterator(self, step_no: int):
        """The batch iterator for `step_no`: the current one, or a new one at a stage boundary (the curriculum
        ends its stage and gives the new weights) and on the first call (resumed at the saved position)."""
        run = self.run
        if self.it is not None and step_no % self.stage_steps != 0:
            return self.it
        new_stage = step_no // self.stage_steps
        if self.weights is None or new_stage != self.stage:
            if self.weights is not None:  # a stage has ended (also when resuming at its boundary)
                run.cur_state = self.end_stage_fn(run.cur_state)
            self.stage = new_stage
            step = jnp.int32(step_no)
            self.weights = np.asarray(jax.device_get(self.weights_fn(run.cur_state, step)), np.float64)
            self.data_state = None
            run.writer.write(run.stage_row(step_no, self.weights, self.sigma_fn(run.cur_state, step)))
        self.it = _host_iterator(run, self.stage, self.weights)
        if self.data_state is not None:
            self.it.grain_iterator.set_state(self.data_state)
            self.data_state = None
        return self.it

    def checkpoint_meta(self) -> dict:
        """What a checkpoint needs to resume the data exactly: stage, its weights, every host's grain position."""
        data_states = [self.it.get_state()["grain"]] if self.it is not None else None
        if data_states is not None and jax.process_count() > 1:
            positions = multihost_utils.process_allgather(np.asarray([data_states[0]["next_index"]]), tiled=False)
            data_states = [{"next_index": int(v)} for v in positions.reshape(-1).tolist()]
        return {
            "pipeline": "host",
            "stage": self.stage,
            "stage_weights": np.asarray(self.weights).tolist(),
            "data_state": data_states,
        }


def _host_iterator(run: _Run, stage: int, weights: np.ndarray):
    """The grain batch iterator of one curriculum stage (`make_train_iterator` with the config's data
    settings; `weights` (n_train,) float64 sampling probabilities over the training cases)."""
    c, d = run.config, run.config.data
    return make_train_iterator(
        run.store,
        weights,
        seed=int(c.seed),
        stage=stage,
        batch_size=int(d.batch_size),
        patch_shape=tuple(d.patch_shape),
        num_workers=int(d.num_workers),
        case_indices=run.train_idx,
        p_foreground=float(d.p_foreground),
        augment=bool(d.augment),
        num_batches=int(c.curriculum.stage_steps),
        extra_channels=extra_channels(c),
        p_hot_negative=float(d.get("p_hot_negative", 0.0)),
        hot_suv=float(d.get("hot_suv", 2.5)),
    )


def _gather_step_results(local: dict, metrics: dict):
    """(case_index (B,) int, lesion_centred (B,) bool, metrics as host numbers/arrays) of one step over every
    host: the per-sample results ("supervised", "gain", "per_sample") are gathered across processes so each
    host's curriculum sees the whole global batch."""
    case_index, centred = np.asarray(local["case_index"]), np.asarray(local["lesion_centred"])
    step_out = {k: metrics[k] for k in ("supervised", "gain", "per_sample") if k in metrics}
    if jax.process_count() > 1:
        case_index = multihost_utils.process_allgather(case_index, tiled=True)
        centred = multihost_utils.process_allgather(centred, tiled=True)
        step_out = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in step_out.items()}
    m = jax.device_get({k: v for k, v in metrics.items() if k not in step_out})
    m.update({k: np.asarray(jax.device_get(v)) for k, v in step_out.items()})
    return case_index, centred, m


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train as `config` says, writing everything to `workdir`; resume if `workdir` has a checkpoint.

    Steps: open the run folder (`clips_jax.runs`), the data, the curriculum, the model and its train step;
    restore the last checkpoint if there is one; validate the untrained model (optional); train with the device
    or the host data path (`choose_pipeline`); write the summary. Returns the summary dict (also
    `workdir/summary.json`): steps, skipped updates, wall time, step rate, initial, final and best validation
    metrics, curriculum name and settings (`curriculum_settings`), data path, and the machine, versions and
    commit of the process that trained its last part (`provenance.run_provenance`).
    """
    if config.model.get("require_init_weights", False) and not config.model.get("init_weights", ""):
        build_training_model(config)  # raises the explanatory ConfigError before any data work
    check_stop_settings(config)
    run = _Run(config, runs.open_for_training(workdir))
    run.open_data()
    if (config.get("stop_at_plateau") or {}).get("enabled") and not len(run.val_idx):
        raise ConfigError(
            f"stop_at_plateau.enabled: the store's {config.eval.split!r} split has no cases to validate on; "
            "use a store with validation cases or disable stop_at_plateau"
        )
    run.make_curriculum()
    run.make_model()
    run.pipeline = choose_pipeline(config, run.store, run.train_idx)
    meta = run.restore(run.pipeline)
    if not run.running() and (run.workdir / "summary.json").is_file():
        run.writer.log(f"{run.workdir}: finished at step {run.step} already; nothing to train (summary.json kept)")
        return json.loads((run.workdir / "summary.json").read_text())
    if run.step == 0 and config.eval.at_start and len(run.val_idx):
        run.evaluate(0, initial=True)
    run.t0 = time.time()
    if run.pipeline == "device":
        from clips_jax import device_loop

        device_loop.run(run, meta)
    else:
        _host_loop(run, meta)
    return run.finish()
