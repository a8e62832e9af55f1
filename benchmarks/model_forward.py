"""Forward-pass time of TMTV-Net tiles: ours (JAX, jit) against the PyTorch reference of tests/torch_reference.py.

    .venv/bin/python benchmarks/model_forward.py                 # CPU: one ensemble tile + one refiner tile
    .venv/bin/python benchmarks/model_forward.py --repeats 2     # fewer timed runs (full tile ~1 TFLOP)
    .venv/bin/python benchmarks/model_forward.py --device gpu    # JAX on the GPU; torch on CUDA if available,
                                                                 # with and without autocast (fp16)

Tiles: ensemble 1x128x96x96x5 (stage A, 4 U-Nets + stacking), refiner 1x96x96x96x6 (stage B), full width,
random weights (the timing does not depend on the values). Ours: `nnx.jit`, one warm-up call (compilation, timed
separately), then the median of `--repeats` calls with `block_until_ready`. Torch: `torch.no_grad()`, default
thread count, same warm-up/median protocol (`torch.cuda.synchronize()` on GPU). Prints machine, date, versions,
the times and the ratio torch / ours (> 1: ours faster). Needs torch (the `test` extra).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first-call seconds, median of `repeats` further calls in seconds); fn must block until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="JAX platform: cpu or gpu (default: JAX's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    ap.add_argument("--skip-torch", action="store_true", help="time ours only")
    ap.add_argument("--only", choices=["ensemble", "refiner"], default=None, help="time one network only")
    args = ap.parse_args()
    if args.device:
        os.environ["JAX_PLATFORMS"] = args.device

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from clips_jax.model.checkpoint import abstract_model, param_dict

    print(f"date     {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine  {platform.node()} | {cpu_model()} | {os.cpu_count()} cores | {platform.platform()}")
    print(f"jax      {jax.__version__} on {jax.devices()[0].platform}: {jax.devices()[0].device_kind}")
    torch = None
    if not args.skip_torch:
        try:
            import torch
            import torch_reference as tr

            cuda = torch.cuda.is_available()
            tdev = "cuda" if cuda else "cpu"
            print(
                f"torch    {torch.__version__} on {tdev}"
                + (f" ({torch.cuda.get_device_name(0)})" if cuda else f", {torch.get_num_threads()} threads")
            )
        except ImportError:
            print("torch    not installed: timing ours only")
            torch = None
    print(f"protocol warm-up 1 call, then median of {args.repeats}; times in seconds")

    rng = np.random.default_rng(0)
    tiles = {"ensemble": (1, 128, 96, 96, 5), "refiner": (1, 96, 96, 96, 6)}
    for name, shape in tiles.items():
        if args.only and name != args.only:
            continue
        x = rng.random(shape, dtype=np.float32)
        # abstract build + numpy random fill: eager Flax init of the full ensemble takes ~45 s on 2 cores
        model = abstract_model("Ensemble" if name == "ensemble" else "Refiner", {})
        params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), param_dict(model))
        params_state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(params_state, params)
        nnx.update(model, params_state)
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
        xj = jax.device_put(jnp.asarray(x))
        first, ours = timed(lambda: fwd(state, xj).block_until_ready(), args.repeats)
        print(f"{name:9s} {'x'.join(map(str, shape))}  ours(jit)   compile+first {first:8.2f}  median {ours:8.3f}")
        if torch is None:
            continue
        net = (tr.TorchEnsemble() if name == "ensemble" else tr.TorchRefiner()).to(tdev).eval()
        xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(tdev)

        def run(autocast: bool):
            with torch.no_grad(), torch.autocast(tdev, dtype=torch.float16, enabled=autocast):
                net(xt)
            if cuda:
                torch.cuda.synchronize()

        modes = [False, True] if cuda else [False]
        for ac in modes:
            first_t, t = timed(lambda: run(ac), args.repeats)
            label = "torch+autocast" if ac else "torch fp32"
            print(
                f"{name:9s} {'x'.join(map(str, shape))}  {label:14s} first {first_t:8.2f}  median {t:8.3f}  "
                f"ratio torch/ours {t / ours:6.2f}"
            )
        del net


if __name__ == "__main__":
    main()
