"""CPU training-step time of the default job (`clips_jax/configs/default.py`), OLD vs NEW code paths, interleaved.

    .venv/bin/python benchmarks/train_cpu_step.py                 # 15 rounds, each times one OLD and one NEW step
    .venv/bin/python benchmarks/train_cpu_step.py --rounds 30 --warmup 3

What is timed: the trainer's own compiled step (`clips_jax.trainer.make_train_step`, `jax.jit(...,
donate_argnums=(0,))` as the host loop uses it) on the default job's configuration: U-Net channels (8, 16, 32,
32), init 8, bottleneck 3, batch 2 x 32^3 x 5, deep supervision with 4 heads, loss alpha*MS + Dice + 2*CE
(alpha 1e-5), AdamW + global-norm clip; training steps only (no validation, no data pipeline: a fixed random
batch, ~10 % lesion voxels).

OLD / NEW (both compiled in this process; the machine is shared, so each round runs one OLD and one NEW step
back to back, alternating which goes first, and the medians over rounds are compared):

* OLD: 3-D convolutions as sums of per-depth-tap 2-D convolutions (`CLIPS_CONV3D=2d`, the CPU default before
  2026-11-30) and the losses' previous forms, kept below only for this comparison (`jax.nn.softmax`, optax's
  integer-label CE, the einsum Mumford-Shah means).
* NEW: the library as it is (`CLIPS_CONV3D=auto`: small convolutions fold the depth taps into the channels;
  class reductions unrolled in `clips_jax.losses`).

The allocator: as the command-line tools set it (`clips_jax.host_memory`: freed memory kept for reuse, the
default since 2026-12-01); `CLIPS_MALLOC=default` leaves glibc as it comes (how every step ran before).

Also prints the first-step loss and gradient norm of both (they agree to float32 round-off) and XLA's cost
analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, load_avg  # noqa: E402

# ---- the losses' previous forms (before 2026-11-30), for the OLD path only -------------------------------------


def _old_soft_dice_loss(logits, labels, smooth=1e-3, eps=1e-5):
    import jax
    import jax.numpy as jnp

    from clips_jax import losses

    losses._check_logits_labels(logits, labels)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    y = (labels == 1).astype(jnp.float32)
    inter = losses._spatial_sum(p * y)
    return 1.0 - (2.0 * inter + smooth) / (losses._spatial_sum(p) + losses._spatial_sum(y) + eps + smooth)


def _old_voxel_ce(logits, labels):
    import jax.numpy as jnp
    import optax

    k = logits.shape[-1]
    lab = jnp.clip(labels.astype(jnp.int32), 0, k - 1)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), lab)


def _old_mumford_shah_loss(logits, image, eta=1e-3, eps=1e-6, channels=None):
    import jax
    import jax.numpy as jnp

    from clips_jax import losses

    y = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    x = image.astype(jnp.float32)
    if channels is not None:
        x = x[..., tuple(int(c) for c in channels)]
    mass = jnp.sum(y, axis=(1, 2, 3))
    mu = jnp.einsum("ndhwm,ndhwk->nmk", x, y) / (mass[:, None, :] + eps)
    level = jnp.zeros(logits.shape[0], jnp.float32)
    for c in range(logits.shape[-1]):
        diff2 = jnp.sum((x - mu[:, None, None, None, :, c]) ** 2, axis=-1)
        level = level + losses._spatial_sum(diff2 * y[..., c])
    tv = jnp.zeros(logits.shape[0], jnp.float32)
    for axis in (1, 2, 3):
        tv = tv + losses._spatial_sum(jnp.abs(jnp.diff(y, axis=axis)))
    return level + eta * tv


@contextlib.contextmanager
def code_path(old: bool):
    """Trace under the OLD or NEW code path (conv mode + loss functions); restores both afterwards."""
    from clips_jax import losses
    from clips_jax.model.layers import CONV3D_ENV

    names = ("soft_dice_loss", "_voxel_ce", "mumford_shah_loss")
    saved = {n: getattr(losses, n) for n in names}
    saved_env = os.environ.get(CONV3D_ENV)
    try:
        if old:
            os.environ[CONV3D_ENV] = "2d"
            losses.soft_dice_loss = _old_soft_dice_loss
            losses._voxel_ce = _old_voxel_ce
            losses.mumford_shah_loss = _old_mumford_shah_loss
        else:
            os.environ.pop(CONV3D_ENV, None)
        yield
    finally:
        for n, f in saved.items():
            setattr(losses, n, f)
        if saved_env is None:
            os.environ.pop(CONV3D_ENV, None)
        else:
            os.environ[CONV3D_ENV] = saved_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (one OLD + one NEW step each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each path after compilation")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from clips_jax import host_memory, trainer
    from clips_jax.configs import default as default_config

    malloc = host_memory.configure_from_env()

    print(f"command   {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.node()} | {cpu_model()} | {os.cpu_count()} cores | {platform.platform()}")
    print(f"versions  python {platform.python_version()} | jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"malloc    {malloc} ({host_memory.MALLOC_ENV}={os.environ.get(host_memory.MALLOC_ENV, '')!r})")
    print(f"load avg  start {load_avg()}")

    cfg = default_config.get_config()
    model, trainable = trainer.build_training_model(cfg)
    tx = trainer.make_optimizer(cfg)
    graphdef, state0 = trainer.init_train_state(model, trainable, tx)
    b = int(cfg.data.batch_size)
    shape = tuple(cfg.data.patch_shape)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((b, *shape, 5), dtype=np.float32)),
        "label": jnp.asarray((rng.random((b, *shape)) < 0.1).astype(np.int32)),
        "labeled": jnp.ones((b,), bool),
    }
    sigma = jnp.float32(0.0)
    print(
        f"problem   default job: batch {b} x {'x'.join(map(str, shape))}x5, U-Net {tuple(cfg.model.channels)}, "
        f"init {cfg.model.init_channels}, bottleneck {cfg.model.bottleneck_kernel}, deep supervision "
        f"{tuple(cfg.loss.ds_weights)}, loss {cfg.loss.form} alpha {cfg.loss.alpha:g}, AdamW + clip "
        f"{cfg.optim.clip_norm}"
    )

    runners, first = {}, {}
    for name, old in (("OLD", True), ("NEW", False)):
        with code_path(old):
            fn = jax.jit(
                trainer.make_train_step(graphdef, cfg, tx, use_sigma=False, with_gain=False), donate_argnums=(0,)
            )
            t0 = time.perf_counter()
            compiled = fn.lower(state0, batch, sigma).compile()
            compile_s = time.perf_counter() - t0
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        _, m = compiled(jax.tree.map(jnp.copy, state0), batch, sigma)
        first[name] = (float(m["loss"]), float(m["grad_norm"]))
        print(
            f"{name}       compile {compile_s:.1f} s, XLA cost {float(ca.get('flops', np.nan)) / 1e9:.2f} GFLOP, "
            f"{float(ca.get('bytes accessed', np.nan)) / 1e9:.2f} GB accessed; first step loss {first[name][0]:.7f}"
            f" grad norm {first[name][1]:.7f}",
            flush=True,
        )
        holder = {"state": jax.tree.map(jnp.copy, state0)}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], batch, sigma)
            jax.block_until_ready(metrics)

        runners[name] = run

    for _ in range(args.warmup):
        for run in runners.values():
            run()
    times = {k: [] for k in runners}
    order = list(runners)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"{k}       steps [ms] {' '.join(f'{t * 1e3:.0f}' for t in v)}  median {med[k] * 1e3:.1f} ms  "
            f"min {min(v) * 1e3:.1f} ms"
        )
    print(
        f"ratio     OLD / NEW median = {med['OLD'] / med['NEW']:.2f}  (> 1: NEW faster); per-round ratios median "
        f"{statistics.median(o / n for o, n in zip(times['OLD'], times['NEW'])):.2f}"
    )
    print(
        f"agree     |loss OLD - NEW| = {abs(first['OLD'][0] - first['NEW'][0]):.2e}, |grad norm OLD - NEW| = "
        f"{abs(first['OLD'][1] - first['NEW'][1]):.2e}"
    )
    print(f"load avg  end {load_avg()}")


if __name__ == "__main__":
    main()
