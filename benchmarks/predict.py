"""End-to-end benchmark of `clips_jax.predict` on an autoPET-size study: time per stage and peak host memory.

    .venv/bin/python benchmarks/predict.py [--size 326x400x400] [--spacing 3,2.04,2.04] [--dtype float32]
        [--batch-size 1] [--stage-b-tile 96,96,96] [--stage-a-only]

Builds the full-size pretrained architectures (4-U-Net ensemble 21.6 M params each + refiner) with RANDOM
weights (timing and memory do not depend on the values), writes a synthetic phantom study of the given size
as NIfTI into a temporary folder, runs `predict_study` (load, stage A, stage B, report) and prints the
machine, date, seconds per stage and the peak resident set size (VmHWM). Run with JAX_PLATFORMS=cpu for CPU
numbers. The first study includes compilation; `--repeat 2` times a second, warm run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import peak_rss_gib  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="326x400x400", help="Z x Y x X voxels")
    p.add_argument("--spacing", default="3,2.04,2.04", help="z,y,x mm")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--stage-b-tile", default="96,96,96")
    p.add_argument("--stage-a-only", action="store_true")
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from clips_jax import predict
    from clips_jax.data.phantoms import make_phantom, write_phantom
    from clips_jax.model import Ensemble, Refiner

    shape = tuple(int(v) for v in a.size.lower().split("x"))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} backend {jax.default_backend()} {jax.devices()[0].device_kind}"
    )
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"study {shape} voxels (z, y, x) at {spacing} mm; dtype {a.dtype}; batch {a.batch_size}; "
        f"stage-B tile {a.stage_b_tile}; stage-A only {a.stage_a_only}"
    )
    t = time.perf_counter()
    from clips_jax.model.layers import model_dtype

    mdtype = model_dtype(a.dtype)
    models = predict.Models.from_modules(
        Ensemble(4, dtype=mdtype, rngs=nnx.Rngs(0)),
        None if a.stage_a_only else Refiner(dtype=mdtype, rngs=nnx.Rngs(1)),
        {"weights_dir": "random (benchmark)"},
    )
    print(f"models built in {time.perf_counter() - t:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")
    opts = predict.Options(
        dtype=a.dtype,
        batch_size=a.batch_size,
        stage_a_only=a.stage_a_only,
        stage_b_tile=tuple(int(v) for v in a.stage_b_tile.split(",")),
        overwrite=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ph = make_phantom(0, shape, spacing)
        write_phantom(Path(tmp) / "study", ph)
        del ph
        print(f"phantom written in {time.perf_counter() - t:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")
        for r in range(a.repeat):
            rep = predict.predict_study(Path(tmp) / "study", Path(tmp) / "out", models, opts)
            s = rep["seconds"]
            print(
                f"run {r + 1}: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in s.items() if v is not None)
                + f"; TMTV {rep['results']['tmtv_ml']:.1f} ml; peak RSS {peak_rss_gib():.2f} GiB",
                flush=True,
            )
    print(f"peak RSS (VmHWM) of the whole run: {peak_rss_gib():.2f} GiB")
    del np


if __name__ == "__main__":
    main()
