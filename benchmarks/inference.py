"""Benchmark of tiled whole-body inference (`clips_jax.inference.tiled_inference`).

Times one whole volume through the tile loop (padding, batched jit-compiled model calls, host-side float32
blending) for several batch sizes and compute dtypes, and prints the machine, the date and the numbers.
Weights are random (speed does not depend on them).

    .venv/bin/python benchmarks/inference.py                       # default: ensemble on GPU, tiny net on CPU
    .venv/bin/python benchmarks/inference.py --model refiner --shape 192,160,160 --batch-sizes 1,2
    .venv/bin/python benchmarks/inference.py --model tiny --shape 64,64,64 --tile 32,32,32

Models: "ensemble" (stage A: 4 U-Nets + stacking, tile 128x96x96 at 6 mm), "unet" (one member),
"refiner" (stage B, tile 96^3, 6 input channels), "tiny" (a 2-layer conv net; tests the loop overhead).
The first run of each configuration includes compilation and is reported separately ("first").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clips_jax import inference as inf  # noqa: E402
from clips_jax.model.layers import model_dtype  # noqa: E402

DEFAULTS = {  # model -> (tile, step, volume shape (z, y, x), input channels)
    "ensemble": ((128, 96, 96), (64, 48, 48), (192, 128, 128), 5),
    "unet": ((128, 96, 96), (64, 48, 48), (192, 128, 128), 5),
    "refiner": ((96, 96, 96), (48, 48, 48), (288, 192, 192), 6),
    "tiny": ((32, 32, 32), (16, 16, 16), (64, 64, 64), 5),
}


class Tiny(nnx.Module):
    """Two 3x3x3 convolutions, 8 features: a cheap stand-in to measure the tiling overhead."""

    def __init__(self, c_in: int, *, dtype=None, rngs: nnx.Rngs):
        self.a = nnx.Conv(c_in, 8, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.b = nnx.Conv(8, 2, (3, 3, 3), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.leaky_relu(self.a(x)))


def build(name: str, c_in: int, dtype):
    if name == "tiny":
        return Tiny(c_in, dtype=dtype, rngs=nnx.Rngs(0))
    from clips_jax.model import build_model

    cls = {"ensemble": "Ensemble", "unet": "UNet", "refiner": "Refiner"}[name]
    return build_model(cls, {}, dtype=dtype, seed=0)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    on_gpu = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DEFAULTS), default="ensemble" if on_gpu else "tiny")
    p.add_argument("--shape", type=ints, help="volume (z,y,x) voxels")
    p.add_argument("--tile", type=ints)
    p.add_argument("--step", type=ints)
    p.add_argument("--batch-sizes", type=ints, default=(1, 2, 4))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tta", action="store_true")
    a = p.parse_args()
    tile, step, shape, c_in = DEFAULTS[a.model]
    tile, step, shape = a.tile or tile, a.step or step, a.shape or shape

    print(f"date     {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine  {platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs")
    print(f"jax      {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")
    vol = np.random.default_rng(0).random(tuple(shape) + (c_in,), dtype=np.float32)
    padded = [n + sum(pd) for n, pd in zip(shape, inf.pad_to_multiple(shape, tile))]
    n_tiles = len(inf.tile_origins(padded, tile, step)) * (8 if a.tta else 1)
    print(
        f"model={a.model} volume={tuple(shape)}x{c_in} tile={tuple(tile)} step={tuple(step)} "
        f"tiles={n_tiles} tta={a.tta}"
    )
    print(f"{'dtype':>9} {'batch':>5} {'first s':>8} {'s/volume':>9} {'tiles/s':>8} {'Mvox/s':>7}")
    for dtype in a.dtypes.split(","):
        model = build(a.model, c_in, model_dtype(dtype))
        pred, state = inf.nnx_predictor(model)
        for bs in a.batch_sizes:
            kw = dict(tile_shape=tile, step=step, batch_size=bs, dtype=dtype, params=state, tta=a.tta)
            t0 = time.perf_counter()
            inf.tiled_inference(vol, pred, **kw)
            first = time.perf_counter() - t0
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                inf.tiled_inference(vol, pred, **kw)
                times.append(time.perf_counter() - t0)
            best = min(times)
            print(
                f"{dtype:>9} {bs:>5} {first:8.2f} {best:9.3f} {n_tiles / best:8.2f} {np.prod(shape) / best / 1e6:7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
