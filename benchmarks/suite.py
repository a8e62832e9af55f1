"""Every GPU benchmark figure of CLIPS-JAX in one process, written to one JSON file.

    .venv/bin/python benchmarks/suite.py --device gpu --out suite.json    # the real thing, on a GPU machine
    .venv/bin/python benchmarks/suite.py --small --out /tmp/suite.json    # CPU, same code paths, ~1.5 min
    .venv/bin/python benchmarks/suite.py --small --skip-torch --out x.json  # what tests/test_benchmark_suite.py runs

Figures (one JSON entry per figure and variant, named "figure/variant"):

1. `train_step_no_data/{float32,bfloat16}`: the trainer's jitted, donating train step on a fixed batch already
   on the device (`benchmarks/train_step.py::bench_ours`), batch 2 x 128x96x96x5, full-width U-Net (64, 96, 128,
   156), init 32, bottleneck 9, deep supervision, loss alpha 1e-5 (the paper's Eq. 1: alpha MS + Dice + 2 CE).
2. `train_step_device_data/{float32,bfloat16}`: the trainer's real compiled K-step chunk of the device data path
   (`clips_jax.device_loop.make_chunk_fn` on a `trainer._Run` built as `train_and_evaluate` builds it: lax.scan
   over K = 10 steps of curriculum weights -> `device.sample_batch` (p_foreground 0.5, augmentation on) -> the
   same train step -> curriculum update), per-step time = chunk time / K, and the ratio to figure 1 (target
   <= 1.2 on the GPU). Should the chunk fail, the simple composition (one jitted sample_batch + train step) is
   timed instead; the entry's "method" says which. `train_step_device_data/sample_batch_only`: the data part
   alone. `train_step_device_data/composed_float32` (optional, run last, budget permitting): the simple
   composition as well, which separates the cost of the data from that of the scan (on XLA CPU a train step
   inside a rolled `lax.scan` ran ~12x slower than the same step outside one). `--small` skips the bfloat16
   chunk (one chunk compile is enough for the check; the bfloat16 step runs in figure 1).
   Store: 8 synthetic phantoms on the 6 mm grid of a "full" phantom (326 x 200 x 200 voxels at 3 x 2.04 x
   2.04 mm = 978 x 408 x 408 mm -> 163 x 68 x 68 voxels), generated directly at 6 mm
   (the same store grid and field of view as writing full-size phantoms and resampling them, in a second
   instead of a minute) and prepared with `prepare_dataset(spacing_mm=6.0)`; cached under `--cache`. The 96 x 96
   in-plane patch exceeds the 68-voxel grid: the crop is padded (-1024 HU / SUV 0), as in training.
3. `tile_forward/{ensemble,refiner}_{float32,bfloat16}`: one jitted forward pass of a stage-A ensemble tile
   (1x128x96x96x5, 4 U-Nets + stacking) and a refiner tile (1x96x96x96x6), full width, random weights
   (abstract model + random fill, as `benchmarks/model_forward.py`).
4. `predict/{float32,bfloat16,float32_batch4}`: `clips_jax.predict.segment` (stage A: resample to 6 mm, tiled
   ensemble; stage B: tiled refiner on the native grid) of an autoPET-size phantom (326 x 400 x 400 at 3 x 2.04
   x 2.04 mm), in memory (no NIfTI read/write), with the figure-3 random full-width models: a cold run
   (compilation included) and a warm run; stage A / stage B / total seconds; in float32 and bfloat16 with one
   tile per call, and in float32 with 4 tiles per call (`--batch_size 4`). `--small` runs the float32 one only.
5. `torch_reference/{fp32,amp,compile}`: the PyTorch reference U-Net training step (`tests/torch_reference.py`
   via `bench_torch`, same batch and widths, Dice + 2 CE): fp32, AMP (fp16 autocast + GradScaler; CUDA only)
   and `torch.compile` with AMP (CUDA only; a failure is recorded, the entry is optional). Only where torch is
   importable and without `--skip-torch`.

`--small` (CPU): the same code paths on narrow networks (U-Net (8, 16, 32, 32), init 8, bottleneck 3; refiner
8 features x 2 blocks), 32 x 16 x 16 training patches (the tiny config's), 32^3 tiles, 4 phantoms of 48 x 32 x
32 voxels at 6 mm, a 96 x 64 x 64 predict volume, K = 2, fewer repeats, and XLA's CPU backend at optimisation
level 0 (`SMALL_XLA_FLAG`): a check that every figure runs (~90 s on 2 cores), not a CPU benchmark.

Protocol of every JAX timing: compilation timed on its own (`lower().compile()`), untimed warm-up calls, then
the median of N timed calls, each ending in `jax.block_until_ready`. Torch: warm-up steps (they include
torch.compile's compilation), then the median of N, each ending in `loss.item()` + `torch.cuda.synchronize()`.

GPU time budget (H200, whole run under 8 minutes; device memory for JAX capped at 60 % with
XLA_PYTHON_CLIENT_MEM_FRACTION unless set, so torch has room in the same process): estimated start-up ~20 s;
figure 1 ~2 x 60 s (compile ~40 s, 3 warm-up + 20 timed steps); figure 2 ~2 x 70 s (compile ~50 s, 1 warm-up +
5 timed chunks of 10 steps) + 15 s; figure 3 4 x ~20 s (2 warm-up + 10 timed); figure 4 ~45 s per variant (on
the H200, 2026-11-30: phantom ~10 s, cold run 16 s, warm run 11.5 s); figure 5 ~30 s eager + ~90 s
torch.compile; the composed diagnostic ~50 s. Whatever they turn out to be, the budget check below keeps the
total in bounds, and the lowest-priority entries (torch.compile, the composed diagnostic) come last.
`--budget-s` (default 450 with --device gpu, unlimited otherwise) is checked before each entry: an entry whose
estimate no longer fits is skipped with its reason, so the run ends inside the budget plus at most one entry's overrun.

JSON layout (written atomically after every entry, so a run cut short keeps what it measured):

    {"suite": "clips-jax benchmarks/suite.py", "schema": 1, "command": "...", "mode": "gpu" | "small" | "full",
     "machine": {"node", "cpu", "cores", "platform", "backend", "device_kind", "device_count", "gpu"},
     "versions": {"python", "jax", "jaxlib", "flax", "optax", "numpy", "clips_jax", "torch"?, "git"?},
     "date_start", "date_end", "wall_s", "budget_s", "settings": {the profile: sizes, repeats, ...},
     "figures": ["train_step_no_data", ...],
     "entries": {"train_step_no_data/float32": {
         "figure": "train_step_no_data", "variant": "float32", "command", "machine", "date", "versions",
         "status": "ok" | "error" | "skipped", "optional": bool, "wall_s",
         "headline": [keys of "numbers" that must be finite],
         "numbers": {... e.g. "step_ms_median", "step_ms_all", "compile_s", ...},
         "error": "Type: message" and "traceback" (status error) | "skip_reason" (status skipped)}, ...},
     "summary": ["one line per entry", ...]}

Non-finite numbers are written as null. Exit status 0 when every non-optional entry is ok or skipped, 1 otherwise
(the JSON is written either way).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
import train_step as ts  # noqa: E402  (puts the repo and tests/ on sys.path too)
from _flops import matmul_gflop  # noqa: E402
from _machine import cpu_model, load_avg, peak_rss_gib, portable_command  # noqa: E402

ALPHA = 1e-5
"""Mumford-Shah weight of the loss (the paper's Eq. 1)."""

SMALL_XLA_FLAG = "--xla_backend_optimization_level=0"
"""Added to XLA_FLAGS by --small: the CPU check tests code paths, not CPU speed, and LLVM at level 0 compiles
the jitted model initialiser ~8x faster (measured 44 s -> 6 s on 2 loaded cores)."""

FIGURES = ("train_step_no_data", "train_step_device_data", "tile_forward", "predict", "torch_reference")

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "arch": dict(ts.FULL),
        "patch": (128, 96, 96),
        "batch": 2,
        "warmup": 3,
        "repeats": 20,
        "chunk_k": 10,
        "chunk_warmup": 1,
        "chunk_repeats": 5,
        "sample_warmup": 2,
        "sample_repeats": 20,
        "phantom_size": "163x68x68",
        "phantom_spacing_mm": (6.0, 6.0, 6.0),
        "cases": 8,
        "ensemble": {},
        "refiner": {},
        "ensemble_tile": (128, 96, 96),
        "refiner_tile": (96, 96, 96),
        "fwd_warmup": 2,
        "fwd_repeats": 10,
        "predict_shape": (326, 400, 400),
        "predict_spacing_mm": (3.0, 2.04, 2.04),
        "stage_a_tile": (128, 96, 96),
        "stage_b_tile": (96, 96, 96),
        "predict_runs": 2,
        "torch_warmup": 3,
        "torch_repeats": 10,
        "skip_variants": {},
        # rough seconds per entry on an H200 (for the budget check only)
        "estimate_s": {
            "train_step_no_data": 60,
            "train_step_device_data": 70,
            "sample_batch_only": 15,
            "composed": 50,
            "tile_forward": 25,
            "predict": 45,
            "torch": 30,
            "torch_compile": 90,
        },
    },
    "small": {
        "arch": dict(ts.SMALL),
        "patch": (32, 16, 16),
        "batch": 2,
        "warmup": 1,
        "repeats": 3,
        "chunk_k": 2,
        "chunk_warmup": 1,
        "chunk_repeats": 1,
        "sample_warmup": 1,
        "sample_repeats": 3,
        "phantom_size": "48x32x32",
        "phantom_spacing_mm": (6.0, 6.0, 6.0),
        "cases": 4,
        "ensemble": {
            "n_members": 4,
            "unet_kwargs": {"channels": (8, 16, 32, 32), "init_channels": 8, "bottleneck_kernel": 3},
        },
        "refiner": {"features": 8, "n_blocks": 2, "first_kernel": 3},
        "ensemble_tile": (32, 32, 32),
        "refiner_tile": (32, 32, 32),
        "fwd_warmup": 1,
        "fwd_repeats": 3,
        "predict_shape": (96, 64, 64),
        "predict_spacing_mm": (3.0, 2.04, 2.04),
        "stage_a_tile": (32, 32, 32),
        "stage_b_tile": (32, 32, 32),
        "predict_runs": 2,
        "torch_warmup": 1,
        "torch_repeats": 3,
        "skip_variants": {
            "train_step_device_data/bfloat16": "--small: one chunk compile only (~30 s on 2 cores); "
            "the bfloat16 train step runs in train_step_no_data/bfloat16",
            "predict/bfloat16": "--small: the float32 predict runs the same code path",
            "predict/float32_batch4": "--small: the float32 predict runs the same code path",
        },
        "estimate_s": {
            "train_step_no_data": 10,
            "train_step_device_data": 15,
            "sample_batch_only": 5,
            "composed": 10,
            "tile_forward": 5,
            "predict": 15,
            "torch": 5,
            "torch_compile": 60,
        },
    },
}


def progress(msg: str) -> None:
    print(f"  ... {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _finite_or_none(v):
    """JSON-ready copy: tuples as lists, NumPy scalars as Python numbers, non-finite floats as None."""
    if isinstance(v, dict):
        return {str(k): _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _ms_list(times: list[float]) -> list[float]:
    return [round(1e3 * t, 4) for t in times]


def _gflop(fn: Callable, *args) -> float:
    """GFLOP of convolutions and matrix products in one call of `fn(*args)`, counted from its jaxpr
    (`benchmarks/_flops.py`; XLA's GPU cost analysis leaves cuDNN convolutions out); NaN if tracing fails."""
    try:
        return matmul_gflop(fn, *args)
    except Exception:  # noqa: BLE001 - a benchmark figure, not a reason to fail the entry
        return float("nan")


def _time_calls(call: Callable[[], Any], warmup: int, repeats: int, name: str) -> list[float]:
    """`warmup` untimed calls, then `repeats` timed ones; `call` must block until its results are ready."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    progress(f"{name}: median {_median_ms(times):.2f} ms of {repeats}")
    return times


# ---------------------------------------------------------------------------------------------------------
# Shared set-up (built lazily, once)
# ---------------------------------------------------------------------------------------------------------


class Context:
    """What several figures share: the profile, the fixed batch, the phantom store, the random models."""

    def __init__(self, profile: dict, cache: Path, tmp: Path):
        self.p, self.cache, self.tmp = profile, cache, tmp
        self._batch = None
        self._store_dir = None
        self._models: dict[tuple[str, str], Any] = {}
        self.no_data_ms: dict[str, float] = {}
        self.torch_ref: dict[str, float] = {}

    def batch(self):
        if self._batch is None:
            self._batch = ts.make_batch(self.p["batch"], tuple(self.p["patch"]), seed=0)
        return self._batch

    def store_dir(self) -> Path:
        """The phantom case store (6 mm), generated and prepared under the cache the first time."""
        if self._store_dir is None:
            from clips_jax.data.phantoms import write_phantoms
            from clips_jax.data.prepare import prepare_dataset
            from clips_jax.data.store import CaseStore

            p = self.p
            tag = f"{p['phantom_size']}_{'x'.join(f'{s:g}' for s in p['phantom_spacing_mm'])}mm"
            root = self.cache / f"phantoms_{tag}"
            store_dir = root / f"store6mm_n{p['cases']}"
            if not (store_dir / "manifest.json").is_file() or len(CaseStore(store_dir)) < p["cases"]:
                t0 = time.perf_counter()
                write_phantoms(
                    root / "data",
                    int(p["cases"]),
                    seed=0,
                    size=p["phantom_size"],
                    spacing_mm=tuple(p["phantom_spacing_mm"]),
                )
                prepare_dataset(root / "data", store_dir, spacing_mm=6.0, log=lambda m: None)
                progress(f"phantom store prepared in {time.perf_counter() - t0:.1f} s: {store_dir}")
            self._store_dir = store_dir
        return self._store_dir

    def model(self, kind: str, dtype: str):
        """Random-weight Ensemble ("ensemble") or Refiner ("refiner") of the profile, compute `dtype`.

        Abstract build + a NumPy random fill (N(0, 0.05^2)), placed on the device once; the float32 and
        bfloat16 models share the same (float32) parameters."""
        key = (kind, dtype)
        if key not in self._models:
            import jax
            import numpy as np
            from flax import nnx

            from clips_jax.model.checkpoint import abstract_model, param_dict
            from clips_jax.model.layers import model_dtype

            cls, cfg = ("Ensemble", self.p["ensemble"]) if kind == "ensemble" else ("Refiner", self.p["refiner"])
            model = abstract_model(cls, cfg, dtype=model_dtype(dtype))
            pkey = (kind, "params")
            if pkey not in self._models:
                rng = np.random.default_rng(0 if kind == "ensemble" else 1)
                self._models[pkey] = jax.tree.map(
                    lambda a: jax.device_put((0.05 * rng.standard_normal(a.shape)).astype(np.float32)),
                    param_dict(model),
                )
            params_state = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(params_state, self._models[pkey])
            nnx.update(model, params_state)
            self._models[key] = model
        return self._models[key]


@contextlib.contextmanager
def _jitted_model_init(trainer):
    """Make `trainer.build_training_model` initialise through one compiled function (eager Flax init of the full-width
    U-Net dispatches hundreds of small ops; the result, real initialisers included, is the same)."""
    import jax
    from flax import nnx

    orig = trainer.build_training_model

    def fast(cfg):
        box = {}

        def make():
            model, trainable = orig(cfg)
            box["trainable"] = trainable
            return model

        model = nnx.eval_shape(make)
        nnx.update(model, jax.jit(lambda: nnx.state(orig(cfg)[0]))())
        return model, box["trainable"]

    trainer.build_training_model = fast
    try:
        yield
    finally:
        trainer.build_training_model = orig


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def fig_train_no_data(ctx: Context, dtype: str) -> dict:
    p = ctx.p
    image, label = ctx.batch()
    r = ts.bench_ours(p["arch"], image, label, dtype, ALPHA, p["warmup"], p["repeats"])
    med = _median_ms(r["times"])
    ctx.no_data_ms[dtype] = med
    return {
        "step_ms_median": med,
        "step_ms_all": _ms_list(r["times"]),
        "compile_s": r["compile"],
        "init_s": r["init"],
        "warmup": p["warmup"],
        "repeats": p["repeats"],
        "loss": r["loss"],
        "finite": r["finite"],
        "n_params": r["n_params"],
        "gflop_per_step": r["gflop"],
        "tflop_per_s": r["gflop"] / med if math.isfinite(r["gflop"]) else float("nan"),
        "peak_rss_gib": peak_rss_gib(),
        "_headline": ["step_ms_median", "compile_s", "loss"],
    }


def _train_config(ctx: Context, dtype: str):
    from clips_jax.configs import default as default_config

    p = ctx.p
    c = default_config.get_config()
    c.quiet = True
    c.num_devices = 1
    c.steps = 1000
    c.steps_per_call = int(p["chunk_k"])
    c.data.store = str(ctx.store_dir())
    c.data.patch_shape = tuple(p["patch"])
    c.data.batch_size = int(p["batch"])
    c.data.p_foreground = 0.5
    c.data.p_hot_negative = 0.0
    c.data.augment = True
    c.data.pipeline = "device"
    c.model.kind = "unet"
    c.model.channels = tuple(p["arch"]["channels"])
    c.model.init_channels = int(p["arch"]["init_channels"])
    c.model.bottleneck_kernel = int(p["arch"]["bottleneck_kernel"])
    c.model.dtype = dtype
    c.model.init_weights = ""
    c.loss.form = "ms_dice_ce"
    c.loss.alpha, c.loss.beta, c.loss.lam = ALPHA, 1.0, 2.0
    c.loss.deep_supervision = True
    c.loss.ds_weights = ts.DS_WEIGHTS
    c.optim.lr = 1e-3
    c.curriculum.name = "none"
    c.eval.at_start = False
    return c


def _time_chunk(ctx: Context, dtype: str) -> dict:
    """The trainer's compiled K-step chunk (`device_loop.make_chunk_fn`) on a `trainer._Run`."""
    import jax
    import numpy as np

    from clips_jax import device_loop, runs, trainer
    from clips_jax.data import device

    p = ctx.p
    k = int(p["chunk_k"])
    c = _train_config(ctx, dtype)
    t0 = time.perf_counter()
    run = trainer._Run(c, runs.open_for_training(ctx.tmp / f"run_{dtype}"))
    run.open_data()
    run.make_curriculum()
    with _jitted_model_init(trainer):
        run.make_model()
    dstore = device.device_store_from(run.store, run.train_idx, hot_suv=float(c.data.hot_suv))
    dstore = jax.device_put(dstore, run.repl)
    weights = jax.device_put(np.zeros(len(run.train_idx), np.float32), run.repl)
    key = jax.device_put(jax.random.PRNGKey(int(c.seed)), run.repl)
    setup_s = time.perf_counter() - t0
    progress(
        f"device data {dtype}: run + device store ({len(run.train_idx)} cases, "
        f"{dstore.nbytes / 2**20:.0f} MiB) in {setup_s:.1f} s; compiling the {k}-step chunk"
    )
    fn = jax.jit(
        device_loop.make_chunk_fn(run, k),
        donate_argnums=(0, 1, 2),
        out_shardings=(run.repl, run.repl, run.repl, run.repl),
    )
    t0 = time.perf_counter()
    compiled = fn.lower(run.state, run.cur_state, weights, key, dstore).compile()
    compile_s = time.perf_counter() - t0
    progress(f"device data {dtype}: chunk compiled in {compile_s:.1f} s")
    gflop = _gflop(fn, run.state, run.cur_state, weights, key, dstore)
    hold = {"carry": (run.state, run.cur_state, weights), "out": None}

    def call():
        st, cs, w, out = compiled(*hold["carry"], key, dstore)
        hold["carry"], hold["out"] = (st, cs, w), out
        jax.block_until_ready((st, out))

    times = _time_calls(call, p["chunk_warmup"], p["chunk_repeats"], f"device data {dtype} chunk of {k}")
    out = jax.device_get(hold["out"])
    per_step = [t / k for t in times]
    res = {
        "method": f"trainer chunk: device_loop.make_chunk_fn(run, {k}) (lax.scan: curriculum weights -> "
        "device.sample_batch -> train step -> curriculum update), per step = chunk / K",
        "chunk_steps": k,
        "chunk_ms_median": _median_ms(times),
        "step_ms_median": _median_ms(per_step),
        "step_ms_all": _ms_list(per_step),
        "compile_s": compile_s,
        "setup_s": setup_s,
        "warmup_chunks": p["chunk_warmup"],
        "repeats_chunks": p["chunk_repeats"],
        "loss": float(out["loss"][-1]),
        "finite": bool(np.all(out["finite"])),
        "train_cases": int(len(run.train_idx)),
        "store_grid": list(dstore.max_shape),
        "device_store_mib": dstore.nbytes / 2**20,
        "gflop_per_chunk": gflop,
        "tflop_per_s": gflop / _median_ms(times) if math.isfinite(gflop) else float("nan"),
        "lesion_centred_fraction": float(np.mean(out["centred"])),
    }
    del hold, compiled, fn, run, dstore
    return res


def _time_composed(ctx: Context, dtype: str) -> dict:
    """Fallback: one jitted function `sample_batch` + `trainer.make_train_step` (no scan, no curriculum)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from clips_jax import trainer
    from clips_jax.data import device
    from clips_jax.data.store import CaseStore

    p = ctx.p
    c = _train_config(ctx, dtype)
    store = CaseStore(ctx.store_dir())
    idx = store.split_indices("train")
    dstore = device.device_store_from(store, idx)
    model = nnx.eval_shape(lambda: trainer.build_training_model(c)[0])
    nnx.update(model, jax.jit(lambda: nnx.state(trainer.build_training_model(c)[0]))())
    tx = trainer.make_optimizer(c)
    graphdef, state = trainer.init_train_state(model, nnx.Param, tx)
    state = jax.device_put(state)
    step = trainer.make_train_step(graphdef, c, tx, use_sigma=False, with_gain=False)
    weights = jnp.ones(len(idx), jnp.float32) / len(idx)

    def fn(state, key, weights, dstore):
        b = device.sample_batch(
            key,
            weights,
            dstore,
            batch_size=int(p["batch"]),
            patch_shape=tuple(p["patch"]),
            p_foreground=0.5,
            augment=True,
        )
        return step(state, {k: b[k] for k in ("image", "label", "labeled")}, jnp.float32(0.0))

    jf = jax.jit(fn, donate_argnums=(0,))
    key0 = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = jf.lower(state, key0, weights, dstore).compile()
    compile_s = time.perf_counter() - t0
    hold = {"state": state, "m": None, "i": 0}

    def call():
        hold["i"] += 1
        hold["state"], hold["m"] = compiled(hold["state"], jax.random.fold_in(key0, hold["i"]), weights, dstore)
        jax.block_until_ready((hold["state"], hold["m"]))

    times = _time_calls(call, p["warmup"], p["repeats"], f"device data {dtype} (composed)")
    m = jax.device_get(hold["m"])
    return {
        "method": "composed: jit(device.sample_batch + trainer.make_train_step), one step per call",
        "step_ms_median": _median_ms(times),
        "step_ms_all": _ms_list(times),
        "compile_s": compile_s,
        "warmup": p["warmup"],
        "repeats": p["repeats"],
        "loss": float(m["loss"]),
        "finite": bool(m["finite"]),
        "train_cases": int(len(idx)),
        "store_grid": list(dstore.max_shape),
    }


def fig_train_device_data(ctx: Context, dtype: str) -> dict:
    try:
        res = _time_chunk(ctx, dtype)
    except Exception as e:  # noqa: BLE001 - fall back to the simple composition, say so
        progress(
            f"device data {dtype}: the trainer chunk failed ({type(e).__name__}: {e}); timing the composition instead"
        )
        chunk_error = f"{type(e).__name__}: {e}"
        gc.collect()
        res = _time_composed(ctx, dtype)
        res["chunk_error"] = chunk_error
    base = ctx.no_data_ms.get(dtype)
    res["no_data_step_ms"] = base
    res["ratio_with_to_without_data"] = res["step_ms_median"] / base if base else float("nan")
    res["ratio_target"] = 1.2
    res["peak_rss_gib"] = peak_rss_gib()
    res["_headline"] = ["step_ms_median", "compile_s", "loss"] + (["ratio_with_to_without_data"] if base else [])
    return res


def fig_composed(ctx: Context, dtype: str) -> dict:
    """The simple composition (jit of sample_batch + train step, no scan, no curriculum) next to the chunk: it
    tells the cost of the data from the cost of the scan (on XLA CPU a train step inside a rolled lax.scan ran
    ~12x slower than the same step outside one)."""
    res = _time_composed(ctx, dtype)
    base = ctx.no_data_ms.get(dtype)
    res["no_data_step_ms"] = base
    res["ratio_with_to_without_data"] = res["step_ms_median"] / base if base else float("nan")
    res["_headline"] = ["step_ms_median", "compile_s", "loss"] + (["ratio_with_to_without_data"] if base else [])
    return res


def fig_sample_only(ctx: Context) -> dict:
    import jax
    import jax.numpy as jnp

    from clips_jax.data import device
    from clips_jax.data.store import CaseStore

    p = ctx.p
    store = CaseStore(ctx.store_dir())
    idx = store.split_indices("train")
    dstore = device.device_store_from(store, idx)
    weights = jnp.ones(len(idx), jnp.float32) / len(idx)
    kw = dict(batch_size=int(p["batch"]), patch_shape=tuple(p["patch"]), p_foreground=0.5, augment=True)
    key0 = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda k, w, d: device.sample_batch(k, w, d, **kw)).lower(key0, weights, dstore).compile()
    compile_s = time.perf_counter() - t0
    i = [0]

    def call():
        i[0] += 1
        jax.block_until_ready(compiled(jax.random.fold_in(key0, i[0]), weights, dstore))

    times = _time_calls(call, p["sample_warmup"], p["sample_repeats"], "sample_batch only")
    return {
        "batch_ms_median": _median_ms(times),
        "batch_ms_all": _ms_list(times),
        "compile_s": compile_s,
        "warmup": p["sample_warmup"],
        "repeats": p["sample_repeats"],
        "batch": p["batch"],
        "patch": list(p["patch"]),
        "p_foreground": 0.5,
        "augment": True,
        "_headline": ["batch_ms_median", "compile_s"],
    }


def fig_tile_forward(ctx: Context, kind: str, dtype: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    p = ctx.p
    model = ctx.model(kind, dtype)
    tile = tuple(p["ensemble_tile"] if kind == "ensemble" else p["refiner_tile"])
    shape = (1, *tile, 5 if kind == "ensemble" else 6)
    x = jax.device_put(np.random.default_rng(2).random(shape, dtype=np.float32))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)
    t0 = time.perf_counter()
    forward = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    compiled = forward.lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    gflop = _gflop(forward, state, x)
    hold = {}

    def call():
        hold["y"] = compiled(state, x)
        hold["y"].block_until_ready()

    times = _time_calls(call, p["fwd_warmup"], p["fwd_repeats"], f"{kind} {dtype} forward")
    y = np.asarray(jax.device_get(hold["y"]), np.float32)
    med = _median_ms(times)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "input_shape": list(shape),
        "fwd_ms_median": med,
        "fwd_ms_all": _ms_list(times),
        "compile_s": compile_s,
        "warmup": p["fwd_warmup"],
        "repeats": p["fwd_repeats"],
        "n_params": n_params,
        "gflop": gflop,
        "tflop_per_s": gflop / med if math.isfinite(gflop) else float("nan"),
        "output_finite": bool(np.isfinite(y).all()),
        "_headline": ["fwd_ms_median", "compile_s"],
    }


def fig_predict(ctx: Context, dtype: str, batch_size: int = 1) -> dict:
    from clips_jax import predict
    from clips_jax.data.phantoms import make_phantom

    p = ctx.p
    shape, spacing = tuple(p["predict_shape"]), tuple(p["predict_spacing_mm"])
    t0 = time.perf_counter()
    if getattr(ctx, "_predict_phantom", None) is None:  # made once for the predict variants
        ctx._predict_phantom = make_phantom(0, shape, spacing)
    ph = ctx._predict_phantom
    phantom_s = time.perf_counter() - t0
    progress(f"predict: phantom {shape} ready in {phantom_s:.1f} s")
    models = predict.Models.from_modules(
        ctx.model("ensemble", dtype), ctx.model("refiner", dtype), {"weights_dir": "random (benchmark)"}
    )
    opts = predict.Options(
        dtype=dtype,
        batch_size=batch_size,
        stage_a_tile=tuple(p["stage_a_tile"]),
        stage_b_tile=tuple(p["stage_b_tile"]),
    )
    runs_ = []
    for r in range(int(p["predict_runs"])):
        t0 = time.perf_counter()
        seg = predict.segment(ph.ct, ph.suv, ph.geometry, models, opts)
        total = time.perf_counter() - t0
        runs_.append(
            {
                "stage_a_s": seg.seconds["stage_a"],
                "stage_b_s": seg.seconds["stage_b"],
                "total_s": total,
                "mask_voxels": int(seg.mask.sum()),
            }
        )
        progress(
            f"predict run {r + 1} ({'cold' if r == 0 else 'warm'}): stage A {seg.seconds['stage_a']:.1f} s, "
            f"stage B {seg.seconds['stage_b']:.1f} s, total {total:.1f} s"
        )
        del seg
    last = runs_[-1]
    return {
        "what": "predict.segment on in-memory arrays (no NIfTI load / report writing); run 1 cold "
        "(compilation included), later runs warm",
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "stage_a_tile": list(p["stage_a_tile"]),
        "stage_b_tile": list(p["stage_b_tile"]),
        "dtype": dtype,
        "batch_size": batch_size,
        "tta": False,
        "phantom_s": phantom_s,
        "runs": runs_,
        "stage_a_s": last["stage_a_s"],
        "stage_b_s": last["stage_b_s"],
        "total_s": last["total_s"],
        "cold_total_s": runs_[0]["total_s"],
        "peak_rss_gib": peak_rss_gib(),
        "_headline": ["stage_a_s", "stage_b_s", "total_s", "cold_total_s"],
    }


def fig_torch(ctx: Context, mode: str) -> dict:
    import torch
    import torch_reference as tr

    p = ctx.p
    cuda = torch.cuda.is_available()
    image, label = ctx.batch()
    amp = cuda and mode in ("amp", "compile")
    t0 = time.perf_counter()
    if mode == "compile":
        orig = tr.TorchUNet
        tr.TorchUNet = lambda **kw: torch.compile(orig(**kw))  # bench_torch builds the net through this name
        try:
            r = ts.bench_torch(p["arch"], image, label, amp, p["torch_warmup"], p["torch_repeats"])
        finally:
            tr.TorchUNet = orig
    else:
        r = ts.bench_torch(p["arch"], image, label, amp, p["torch_warmup"], p["torch_repeats"])
    wall = time.perf_counter() - t0
    med = _median_ms(r["times"])
    ours = ctx.no_data_ms.get("bfloat16" if amp else "float32")
    res = {
        "device": "cuda" if cuda else "cpu",
        "amp_fp16": amp,
        "torch_compile": mode == "compile",
        "step_ms_median": med,
        "step_ms_all": _ms_list(r["times"]),
        "setup_and_warmup_s": wall - sum(r["times"]),
        "warmup": p["torch_warmup"],
        "repeats": p["torch_repeats"],
        "loss": r["loss"],
        "n_params": r["n_params"],
        "threads": torch.get_num_threads(),
        "compared_with": f"train_step_no_data/{'bfloat16' if amp else 'float32'}",
        "ratio_torch_to_ours": med / ours if ours else float("nan"),
        "_headline": ["step_ms_median"] + (["ratio_torch_to_ours"] if ours else []),
    }
    ctx.torch_ref[mode] = med
    return res


# ---------------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------------


def _versions(torch_mod) -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    import clips_jax

    v = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "clips_jax": clips_jax.__version__,
    }
    if torch_mod is not None:
        v["torch"] = torch_mod.__version__
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            v["git"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def _machine() -> dict:
    import jax

    d = jax.devices()[0]
    load = load_avg()
    return {
        "node": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "backend": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "gpu": d.device_kind if d.platform == "gpu" else None,
        "load_avg_start": load,
    }


class Suite:
    """Runs entries one after another, isolates their failures, keeps the budget, writes the JSON."""

    def __init__(self, out: Path, command: str, mode: str, budget_s: float, settings: dict, torch_mod):
        self.out, self.t0, self.budget_s = out, time.perf_counter(), budget_s
        self.machine, self.versions = _machine(), _versions(torch_mod)
        self.doc = {
            "suite": "clips-jax benchmarks/suite.py",
            "schema": 1,
            "command": command,
            "mode": mode,
            "machine": self.machine,
            "versions": self.versions,
            "date_start": datetime.datetime.now().isoformat(timespec="seconds"),
            "date_end": None,
            "wall_s": None,
            "budget_s": budget_s if math.isfinite(budget_s) else None,
            "settings": _finite_or_none(settings),
            "figures": list(FIGURES),
            "entries": {},
            "summary": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def entry(
        self,
        figure: str,
        variant: str,
        fn: Callable[[], dict],
        *,
        estimate_s: float = 0.0,
        skip: str | None = None,
        optional: bool = False,
    ) -> dict:
        import jax

        name = f"{figure}/{variant}"
        e = {
            "figure": figure,
            "variant": variant,
            "command": self.doc["command"],
            "machine": self.machine,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": self.versions,
            "optional": optional,
        }
        left = self.budget_s - self.elapsed()
        if skip is None and estimate_s > left:
            skip = f"time budget: ~{estimate_s:.0f} s estimated, {max(left, 0):.0f} s of {self.budget_s:.0f} s left"
        t0 = time.perf_counter()
        if skip is not None:
            e.update(status="skipped", skip_reason=skip)
            progress(f"{name}: skipped ({skip})")
        else:
            progress(f"{name}: start ({self.elapsed():.0f} s into the suite)")
            try:
                numbers = fn()
                headline = numbers.pop("_headline", [])
                e.update(status="ok", headline=headline, numbers=numbers)
            except Exception as ex:  # noqa: BLE001 - record and continue with the next entry
                e.update(status="error", error=f"{type(ex).__name__}: {ex}", traceback=traceback.format_exc()[-4000:])
                progress(f"{name}: ERROR {type(ex).__name__}: {ex}")
        e["wall_s"] = time.perf_counter() - t0
        self.doc["entries"][name] = _finite_or_none(e)
        gc.collect()
        jax.clear_caches()
        self.write()
        return e

    def write(self) -> None:
        from clips_jax.fileio import write_text_atomic

        self.doc["date_end"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.doc["wall_s"] = round(self.elapsed(), 2)
        self.doc["summary"] = summary_lines(self.doc)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out, json.dumps(self.doc, indent=1, allow_nan=False) + "\n")


_UNITS = {"_ms": "ms", "_s": "s", "ratio": "x"}


def summary_lines(doc: dict) -> list[str]:
    lines = []
    for name, e in doc["entries"].items():
        if e["status"] == "ok":
            parts = []
            for k in e.get("headline", []):
                v = e["numbers"].get(k)
                unit = next((u for suf, u in _UNITS.items() if suf in k), "")
                parts.append(f"{k} {v:.4g}{unit}" if isinstance(v, (int, float)) else f"{k} {v}")
            lines.append(f"{name:45s} ok    " + ", ".join(parts))
        elif e["status"] == "skipped":
            lines.append(f"{name:45s} skip  {e['skip_reason']}")
        else:
            lines.append(f"{name:45s} ERROR {e['error'][:200]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "gpu"], help="JAX platform (default: JAX's default)")
    ap.add_argument("--small", action="store_true", help="narrow networks, 32^3 patches: the CPU check (~1 min)")
    ap.add_argument("--out", required=True, help="the JSON file to write (atomically, after every entry)")
    ap.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "clips_jax_bench_suite"),
        help="folder for the phantom case store (reused between runs)",
    )
    ap.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch reference (figure 5)")
    ap.add_argument("--only", default="", help="comma-separated figure names to run (others are skipped)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip entries that would not end within this many seconds of the start "
        "(default 450 with --device gpu, unlimited otherwise)",
    )
    args = ap.parse_args(argv)
    command = portable_command(__file__, sys.argv[1:] if argv is None else list(argv))
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    if only - set(FIGURES):
        ap.error(f"--only: unknown figure(s) {sorted(only - set(FIGURES))}; choose from {', '.join(FIGURES)}")
    if args.device:
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.device, args.device)  # "gpu" would also try rocm
    if args.device == "gpu" and not args.skip_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave the GPU room for torch
    budget = args.budget_s if args.budget_s is not None else (450.0 if args.device == "gpu" else math.inf)
    mode = "small" if args.small else ("gpu" if args.device == "gpu" else "full")
    profile = PROFILES["small" if args.small else "full"]
    if args.small and SMALL_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMALL_XLA_FLAG).strip()

    import jax

    torch_mod, torch_skip = None, None
    if args.skip_torch:
        torch_skip = "--skip-torch"
    else:
        try:
            import torch as torch_mod
        except ImportError as e:
            torch_skip = f"torch is not importable ({e})"
    if jax.devices()[0].platform == "cpu" and not args.small:
        progress("full-size figures on a CPU take hours; use --small for the CPU check")

    from clips_jax import host_memory

    settings = {k: v for k, v in profile.items() if k != "estimate_s"}
    settings.update(
        allocator=host_memory.configure_from_env(),  # as the command-line tools set it (CLIPS_MALLOC)
        alpha=ALPHA,
        cache=args.cache,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        compilation_cache="fresh per run (identical programs, e.g. the model initialisers, compile once)",
    )
    suite = Suite(Path(args.out), command, mode, budget, settings, torch_mod)
    est = profile["estimate_s"]
    with tempfile.TemporaryDirectory(prefix="clips_suite_") as tmp:
        # A fresh persistent compilation cache for this run only: every compile_s below is a cold compile, and
        # programs that recur unchanged (the jitted model initialisers of figures 1 and 2) compile once.
        jax.config.update("jax_compilation_cache_dir", str(Path(tmp) / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        ctx = Context(profile, Path(args.cache), Path(tmp))

        def skip_for(figure: str, variant: str = "") -> str | None:
            if only and figure not in only:
                return f"--only {args.only}"
            return profile["skip_variants"].get(f"{figure}/{variant}")

        for dtype in ("float32", "bfloat16"):
            suite.entry(
                "train_step_no_data",
                dtype,
                lambda: fig_train_no_data(ctx, dtype),
                estimate_s=est["train_step_no_data"],
                skip=skip_for("train_step_no_data", dtype),
            )
        for dtype in ("float32", "bfloat16"):
            suite.entry(
                "train_step_device_data",
                dtype,
                lambda: fig_train_device_data(ctx, dtype),
                estimate_s=est["train_step_device_data"],
                skip=skip_for("train_step_device_data", dtype),
            )
        suite.entry(
            "train_step_device_data",
            "sample_batch_only",
            lambda: fig_sample_only(ctx),
            estimate_s=est["sample_batch_only"],
            skip=skip_for("train_step_device_data", "sample_batch_only"),
        )
        for kind in ("ensemble", "refiner"):
            for dtype in ("float32", "bfloat16"):
                suite.entry(
                    "tile_forward",
                    f"{kind}_{dtype}",
                    lambda: fig_tile_forward(ctx, kind, dtype),
                    estimate_s=est["tile_forward"],
                    skip=skip_for("tile_forward"),
                )
        for variant, dtype, batch in (
            ("float32", "float32", 1),
            ("bfloat16", "bfloat16", 1),
            ("float32_batch4", "float32", 4),
        ):
            suite.entry(
                "predict",
                variant,
                lambda dtype=dtype, batch=batch: fig_predict(ctx, dtype, batch),
                estimate_s=est["predict"],
                skip=skip_for("predict", variant),
            )
        ctx._models.clear()
        cuda = torch_mod is not None and torch_mod.cuda.is_available()
        for mode_ in ("fp32", "amp", "compile"):
            skip = torch_skip or skip_for("torch_reference")
            if skip is None and mode_ == "amp" and not cuda:
                skip = "AMP (fp16 autocast + GradScaler) is timed on CUDA only"
            if skip is None and mode_ == "compile" and not cuda:
                skip = "torch.compile is timed on CUDA only (on 2 CPU cores its inductor build took ~105 s)"
            suite.entry(
                "torch_reference",
                mode_,
                lambda: fig_torch(ctx, mode_),
                estimate_s=est["torch_compile" if mode_ == "compile" else "torch"],
                skip=skip,
                optional=mode_ == "compile",
            )
        # last: a diagnostic, run when the budget still allows it
        suite.entry(
            "train_step_device_data",
            "composed_float32",
            lambda: fig_composed(ctx, "float32"),
            estimate_s=est["composed"],
            skip=skip_for("train_step_device_data", "composed_float32"),
            optional=True,
        )
    suite.write()

    doc = suite.doc
    m = doc["machine"]
    print(
        f"CLIPS-JAX benchmark suite ({mode}) on {m['cpu']} ({m['cores']} cores), {m['backend']} "
        f"{m['device_kind']}; jax {doc['versions']['jax']}; {doc['date_start']}"
    )
    for line in doc["summary"]:
        print("  " + line)
    print(f"wall {doc['wall_s']:.1f} s; JSON: {args.out}")
    failed = [n for n, e in doc["entries"].items() if e["status"] == "error" and not e["optional"]]
    if failed:
        print(f"failed entries: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
