"""Training-step time of the TMTV-Net U-Net: ours (JAX, the trainer's compiled step) against a PyTorch reference.

    .venv/bin/python benchmarks/train_step.py --repeats 2          # full width, batch 2 x 128x96x96x5 (slow on CPU)
    .venv/bin/python benchmarks/train_step.py --small               # quick check: channels (8,16,32,32), 32^3
    .venv/bin/python benchmarks/train_step.py --device gpu --bf16   # JAX on the GPU (+ bfloat16 compute);
                                                                    # torch on CUDA if available, fp32 and AMP

What is timed (one optimiser step on a fixed random batch, batch 2, deep supervision with 4 heads):

* ours: `clips_jax.trainer.build_training_model` (UNet 5 -> 2, channels (64, 96, 128, 156), init 32, bottleneck 9) +
  `make_optimizer` (global-norm clip 1.0 + AdamW lr 1e-3, betas 0.9/0.999, eps 1e-8, wd 1e-6, cosine schedule) +
  `init_train_state` + `make_train_step`, wrapped in `jax.jit(..., donate_argnums=(0,))` exactly as the trainer
  does (single device, no mesh). Loss: `losses.deep_supervision_loss(form="ms_dice_ce")` with the head weights
  0.125/0.25/0.5/1, beta 1 (Dice) and lam 2 (CE); alpha (Mumford-Shah weight) defaults to 0 so the objective is the
  reference's Dice + 2*CE (the MS term is still evaluated, weighted 0); `--alpha 1e-5` gives the paper's Eq. 1.
  The step includes the trainer's non-finite guard. `--bf16` also times it with `model.dtype="bfloat16"`.
* torch: the tests' reference U-Net (`tests/torch_reference.py`, same widths) with its 4 deep-supervision heads;
  each head's logits resized to the full patch (trilinear, align_corners=True), per head soft Dice (softmax,
  background dropped, smooth 1e-3, eps 1e-5, per sample) + 2 * CE, weights 0.125/0.25/0.5/1, mean over the batch;
  backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr 1e-3, weight_decay 1e-6)` (constant rate: a schedule
  costs nothing). Default thread count. On CUDA also with autocast (fp16 + GradScaler).

Protocol: compilation timed separately (ours: `lower().compile()`), `--warmup` untimed steps, then the median of
`--repeats` timed steps, each ending in a device sync (`block_until_ready` / `loss.item()` +
`torch.cuda.synchronize()`). Ours runs first and is freed before torch starts, so the peak memory (RSS, printed
after each phase) is the larger of the two, not the sum. Prints the machine (CPU model, cores, load average at
start and end), date, versions, the times and the ratio torch / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flops import matmul_gflop  # noqa: E402
from _machine import cpu_model, load_avg  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))

FULL = {"channels": (64, 96, 128, 156), "init_channels": 32, "bottleneck_kernel": 9, "patch": (128, 96, 96)}
SMALL = {"channels": (8, 16, 32, 32), "init_channels": 8, "bottleneck_kernel": 3, "patch": (32, 32, 32)}
DS_WEIGHTS = (0.125, 0.25, 0.5, 1.0)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress(msg: str) -> None:
    """One progress line on stderr (full-width CPU steps take minutes; stdout keeps only the results)."""
    print(f"  ... {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def timed_steps(step: Callable[[], None], warmup: int, repeats: int, name: str = "") -> list[float]:
    """Run `step` (which must end in a device sync) `warmup` times untimed, then `repeats` times timed.

    Returns the `repeats` wall times in seconds."""
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        progress(f"{name} warm-up step {i + 1}/{warmup}: {time.perf_counter() - t0:.2f} s")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        progress(f"{name} timed step {i + 1}/{repeats}: {times[-1]:.2f} s")
    return times


def make_batch(batch: int, patch: tuple[int, int, int], seed: int):
    """A fixed random batch: image (B, D, H, W, 5) float32 in [0, 1), labels (B, D, H, W) int32 with ~5 % lesion
    voxels, all samples labelled."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.random((batch, *patch, 5), dtype=np.float32)
    label = (rng.random((batch, *patch)) < 0.05).astype(np.int32)
    return image, label


def bench_ours(arch: dict, image, label, dtype: str, alpha: float, warmup: int, repeats: int) -> dict:
    """Time the trainer's jitted, donating train step; returns {"compile", "times", "loss", "n_params", "gflop"}.

    "gflop": convolution and matrix-product GFLOP per step counted from the jaxpr (`_flops.matmul_gflop`).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from clips_jax import trainer
    from clips_jax.configs import default as default_config

    cfg = default_config.get_config()
    cfg.model.kind = "unet"
    cfg.model.channels = tuple(arch["channels"])
    cfg.model.init_channels = int(arch["init_channels"])
    cfg.model.bottleneck_kernel = int(arch["bottleneck_kernel"])
    cfg.model.dtype = dtype
    cfg.model.init_weights = ""
    cfg.loss.form = "ms_dice_ce"
    cfg.loss.alpha, cfg.loss.beta, cfg.loss.lam = float(alpha), 1.0, 2.0
    cfg.loss.deep_supervision = True
    cfg.loss.ds_weights = DS_WEIGHTS
    cfg.steps = 1000

    t0 = time.perf_counter()
    # The trainer's build_training_model, with its real initialisers, but compiled: eager Flax init of the full-width
    # U-Net takes minutes on a loaded 2-core machine. The U-Net has no non-parameter state.
    model = nnx.eval_shape(lambda: trainer.build_training_model(cfg)[0])
    nnx.update(model, jax.jit(lambda: nnx.state(trainer.build_training_model(cfg)[0]))())
    trainable = nnx.Param
    tx = trainer.make_optimizer(cfg)
    graphdef, state = trainer.init_train_state(model, trainable, tx)
    del model
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
    init_s = time.perf_counter() - t0
    progress(f"ours {dtype}: model + optimiser state built in {init_s:.1f} s; compiling")

    dev = jax.devices()[0]
    state = jax.device_put(state, dev)
    batch = {
        "image": jax.device_put(jnp.asarray(image), dev),
        "label": jax.device_put(jnp.asarray(label), dev),
        "labeled": jax.device_put(jnp.ones((image.shape[0],), bool), dev),
    }
    sigma = jnp.float32(0.0)
    step_fn = jax.jit(trainer.make_train_step(graphdef, cfg, tx, use_sigma=False, with_gain=False), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, sigma).compile()
    compile_s = time.perf_counter() - t0
    progress(f"ours {dtype}: compiled in {compile_s:.1f} s")
    # Convolution + matmul FLOPs from the jaxpr: XLA's cost analysis omits cuDNN convolutions on GPUs.
    gflop = matmul_gflop(step_fn, state, batch, sigma)

    holder = {"state": state, "metrics": None}

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, sigma)
        jax.block_until_ready((holder["state"], holder["metrics"]))

    times = timed_steps(step, warmup, repeats, f"ours {dtype}")
    m = jax.device_get(holder["metrics"])
    out = {
        "init": init_s,
        "compile": compile_s,
        "times": times,
        "loss": float(m["loss"]),
        "finite": bool(m["finite"]),
        "n_params": n_params,
        "gflop": gflop,
    }
    del holder, batch, compiled, step_fn, state
    gc.collect()
    jax.clear_caches()
    return out


def bench_torch(arch: dict, image, label, amp: bool, warmup: int, repeats: int) -> dict:
    """Time one PyTorch reference training step; returns {"times", "loss", "n_params"}."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torch_reference as tr

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    net = (
        tr.TorchUNet(
            channels=tuple(arch["channels"]),
            init_channels=int(arch["init_channels"]),
            bottleneck_kernel=int(arch["bottleneck_kernel"]),
        )
        .to(dev)
        .train()
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1))).to(dev)  # NCDHW
    y = torch.from_numpy(label.astype(np.int64)).to(dev)  # (N, D, H, W)
    y1 = (y == 1).float()
    full = tuple(label.shape[1:])

    def loss_fn(outs):
        total = torch.zeros(x.shape[0], device=dev)
        for w, o in zip(DS_WEIGHTS, outs):
            o = o.float()
            if tuple(o.shape[2:]) != full:
                o = F.interpolate(o, size=full, mode="trilinear", align_corners=True)
            p = torch.softmax(o, dim=1)[:, 1]
            inter = (p * y1).sum(dim=(1, 2, 3))
            dice = 1.0 - (2.0 * inter + 1e-3) / (p.sum(dim=(1, 2, 3)) + y1.sum(dim=(1, 2, 3)) + 1e-5 + 1e-3)
            ce = F.cross_entropy(o, y, reduction="none").mean(dim=(1, 2, 3))
            total = total + w * (dice + 2.0 * ce)
        return total.mean()

    last = {"loss": float("nan")}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            outs = net(x, deep_supervision=True)
        loss = loss_fn(outs)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        last["loss"] = loss.item()  # host sync
        if cuda:
            torch.cuda.synchronize()

    times = timed_steps(step, warmup, repeats, "torch amp" if amp else "torch fp32")
    out = {"times": times, "loss": last["loss"], "n_params": tr.n_params(net)}
    del net, opt, x, y, y1
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def fmt_times(times: list[float]) -> str:
    return " ".join(f"{t:.3f}" for t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "gpu"], help="JAX platform (default: JAX's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    ap.add_argument("--small", action="store_true", help="narrow U-Net (8,16,32,32), init 8, bottleneck 3, 32^3")
    ap.add_argument("--bf16", action="store_true", help="also time ours with model.dtype=bfloat16")
    ap.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="Mumford-Shah weight of our loss (0 = the reference's Dice + 2*CE; paper 1e-5)",
    )
    ap.add_argument("--skip-torch", action="store_true", help="time ours only")
    ap.add_argument("--skip-ours", action="store_true", help="time the torch reference only")
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("need --repeats >= 1, --warmup >= 0, --batch >= 1")
    if args.device:
        os.environ["JAX_PLATFORMS"] = args.device

    import jax
    import numpy as np

    arch = SMALL if args.small else FULL
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.node()} | {cpu_model()} | {os.cpu_count()} cores | {platform.platform()}")
    print(f"load avg  start {load_avg()}")
    print(
        f"versions  python {platform.python_version()} | jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}) | numpy {np.__version__}"
    )
    torch = None
    if not args.skip_torch:
        try:
            import torch

            cuda = torch.cuda.is_available()
            print(
                f"torch     {torch.__version__} on {'cuda' if cuda else 'cpu'}"
                + (f" ({torch.cuda.get_device_name(0)})" if cuda else f", {torch.get_num_threads()} threads")
            )
        except ImportError:
            print("torch     not installed: timing ours only")
    patch = tuple(arch["patch"])
    print(
        f"problem   batch {args.batch} x {'x'.join(map(str, patch))}x5, U-Net channels {arch['channels']}, init "
        f"{arch['init_channels']}, bottleneck {arch['bottleneck_kernel']}, 4 deep-supervision heads, AdamW + clip 1.0"
    )
    print(
        f"loss      ours: deep_supervision_loss(form='ms_dice_ce', alpha={args.alpha:g}, beta=1, lam=2); "
        f"torch: sum_h w_h (Dice + 2 CE)"
    )
    print(f"protocol  compile timed separately, {args.warmup} warm-up step(s), median of {args.repeats}; seconds")
    sys.stdout.flush()

    image, label = make_batch(args.batch, patch, seed=0)
    results: dict[str, float] = {}
    if not args.skip_ours:
        for dtype in ["float32", "bfloat16"] if args.bf16 else ["float32"]:
            r = bench_ours(arch, image, label, dtype, args.alpha, args.warmup, args.repeats)
            med = statistics.median(r["times"])
            results[f"ours {dtype}"] = med
            rate = f", {r['gflop'] / med:.0f} GFLOP/s" if np.isfinite(r["gflop"]) else ""
            print(
                f"ours {dtype:8s}  params {r['n_params']:,}  init {r['init']:.1f} s  compile {r['compile']:.1f} s  "
                f"steps [{fmt_times(r['times'])}]  median {med:.3f} s  ({r['gflop']:.0f} GFLOP of convolutions{rate})  "
                f"loss {r['loss']:.4f}  finite {r['finite']}  peak RSS {peak_rss_gib():.1f} GiB  "
                f"load {load_avg()}",
                flush=True,
            )
    if torch is not None:
        modes = [False, True] if torch.cuda.is_available() else [False]
        for amp in modes:
            r = bench_torch(arch, image, label, amp, args.warmup, args.repeats)
            med = statistics.median(r["times"])
            name = "torch amp" if amp else "torch fp32"
            results[name] = med
            ratio = (
                f"  ratio torch/ours(float32) {med / results['ours float32']:.2f}" if "ours float32" in results else ""
            )
            print(
                f"{name:13s}  params {r['n_params']:,}  steps [{fmt_times(r['times'])}]  median {med:.3f} s  "
                f"loss {r['loss']:.4f}  peak RSS {peak_rss_gib():.1f} GiB  load {load_avg()}{ratio}",
                flush=True,
            )
    print("summary   " + "  ".join(f"{k}: {v:.3f} s" for k, v in results.items()))
    base = results.get("ours float32")
    if base:
        for k, v in results.items():
            if k.startswith("torch"):
                print(f"ratio     {k} / ours float32 = {v / base:.2f}  (> 1: ours faster)")
        if "ours bfloat16" in results:
            print(
                f"bf16      ours float32 / ours bfloat16 = {base / results['ours bfloat16']:.2f}  "
                f"(> 1: bfloat16 faster)"
            )
    print(f"load avg  end {load_avg()}")


if __name__ == "__main__":
    main()
