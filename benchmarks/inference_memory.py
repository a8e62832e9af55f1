"""Peak host memory of one stage-B-like tiled inference pass (`clips_jax.inference.tiled_inference`).

Issue 6 item 4: a whole-body study of 400x400x326 voxels must run within 8 GB of host memory. This script
builds a `(326, 400, 400, 6)` float32 refiner input (filled slab by slab, no full-size temporaries), warms up
the compiled tile function on one small volume, then runs ONE full pass (tile 96^3, step 48^3, as stage B)
with a trivial jitted predictor (a fixed 6 -> 2 linear map, so compute is cheap and the host-side tiling and
blending dominate the memory). It prints the machine, the date, the resident set size before the pass, the
peak resident set size (VmHWM from /proc/self/status, else getrusage) after it, and the difference.
Run with JAX_PLATFORMS=cpu to keep the accelerator out of it (CPU device buffers then count as host memory,
which is the stricter measure). The allocator is set as the command-line tools set it (`clips_jax.host_memory`;
`CLIPS_MALLOC=default` leaves glibc as it comes).

    .venv/bin/python benchmarks/inference_memory.py
    .venv/bin/python benchmarks/inference_memory.py --shape 326,400,400 --batch-size 2 --tta
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _machine import peak_rss_gib, status_gib  # noqa: E402

from clips_jax import inference as inf  # noqa: E402

_MIX = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.1], [0.0, 0.3], [-0.1, 0.6]], np.float32)


def linear_predictor(x):
    """Fixed 6 -> 2 channel linear map (a 1x1x1 convolution): logits (B, D, H, W, 2)."""
    return jnp.einsum("bdhwc,ck->bdhwk", x, jnp.asarray(_MIX))


def make_volume(shape: tuple[int, int, int], channels: int, seed: int = 0, slab: int = 8) -> np.ndarray:
    """Random float32 (z, y, x, channels) in [0, 1), generated slab by slab (no full-size temporary)."""
    rng = np.random.default_rng(seed)
    vol = np.empty(tuple(shape) + (channels,), np.float32)
    for z0 in range(0, shape[0], slab):
        vol[z0 : z0 + slab] = rng.random(vol[z0 : z0 + slab].shape, dtype=np.float32)
    return vol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="326,400,400", help="z,y,x voxels")
    ap.add_argument("--tile", default="96,96,96")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--tta", action="store_true", help="8 flip passes (8x the time)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    step = tuple(t // 2 for t in tile)
    from clips_jax import host_memory

    print(f"allocator: {host_memory.configure_from_env()} (clips_jax.host_memory; {host_memory.MALLOC_ENV})")
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"module: {inf.__file__}")
    kw = dict(tile_shape=tile, step=step, batch_size=args.batch_size, tta=args.tta)
    inf.tiled_inference(make_volume(tile, 6), linear_predictor, **kw)  # compile (same tile/batch shapes)
    vol = make_volume(shape, 6)
    before = peak_rss_gib()
    rss_now = status_gib("VmRSS")
    print(
        f"volume {vol.shape} float32 = {vol.nbytes / 1024**3:.2f} GiB; tile {tile}, step {step}, "
        f"batch {args.batch_size}, tta {args.tta}"
    )
    t0 = time.perf_counter()
    probs = inf.tiled_inference(vol, linear_predictor, **kw)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    print(f"output {probs.shape} {probs.dtype} = {probs.nbytes / 1024**3:.2f} GiB; pass {seconds:.1f} s")
    print(f"RSS before the pass (input + runtime): {rss_now if rss_now is not None else before:.2f} GiB")
    print(f"peak RSS (VmHWM) after the pass:       {peak:.2f} GiB")
    print(f"peak increase during the pass:         {peak - (rss_now if rss_now is not None else before):.2f} GiB")


if __name__ == "__main__":
    main()
