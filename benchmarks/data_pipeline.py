"""Benchmark of the data side: phantom generation (full size), preparation, and training crops per second.

    .venv/bin/python benchmarks/data_pipeline.py [--cases 4] [--batches 20] [--workers 0,2]

Steps (in a temporary folder, removed at the end):
1. `make_phantom(size="full")` (326 x 200 x 200 voxels at 3.0 x 2.04 x 2.04 mm) + NIfTI writing, per case.
2. `prepare_dataset` to the 6 mm grid (the TMTV-Net training grid).
3. `make_train_iterator` with the reference patch 128 x 96 x 96, batch 2, all augmentations on, for each
   worker count: time to the first batch (worker start-up) and crops per second over the next batches.
Prints the machine, the date and the numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main(argv):
    del argv
    from absl import flags
    import numpy as np

    from clips_jax.data.phantoms import make_phantom, write_phantom
    from clips_jax.data.pipeline import make_train_iterator
    from clips_jax.data.prepare import prepare_dataset
    from clips_jax.data.store import CaseStore

    f = flags.FLAGS
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, numpy {np.__version__}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    tmp = Path(tempfile.mkdtemp(prefix="clips_bench_"))
    try:
        gen, write = [], []
        for i in range(f.cases):
            t0 = time.perf_counter()
            ph = make_phantom(1000 + i, "full")
            t1 = time.perf_counter()
            write_phantom(tmp / "data" / f"case{i:02d}", ph)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            write.append(t2 - t1)
        print(f"phantom full {ph.ct.shape}: generation {np.mean(gen):.2f} s/case (min {np.min(gen):.2f}), "
              f"NIfTI writing {np.mean(write):.2f} s/case, {f.cases} cases")
        t0 = time.perf_counter()
        prepare_dataset(tmp / "data", tmp / "cache", spacing_mm=6.0, log=lambda m: None)
        store = CaseStore(tmp / "cache")
        print(f"prepare (load + measures + resample to 6 mm + store): "
              f"{(time.perf_counter() - t0) / f.cases:.2f} s/case, stored grid {store.geometry(0).shape}")
        for nw in [int(v) for v in f.workers.split(",")]:
            it = make_train_iterator(store, np.ones(len(store)), seed=0, stage=0, batch_size=2,
                                     patch_shape=(128, 96, 96), num_workers=nw, p_foreground=0.3,
                                     process_index=0, process_count=1)
            t0 = time.perf_counter()
            next(it)
            t1 = time.perf_counter()
            for _ in range(f.batches):
                next(it)
            dt = time.perf_counter() - t1
            print(f"pipeline workers={nw}: first batch {t1 - t0:.2f} s, then {2 * f.batches / dt:.2f} crops/s "
                  f"({dt / f.batches * 1000:.0f} ms/batch of 2 x 128x96x96x5, augmentations on)")
            del it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("cases", 4, "number of full-size phantoms")
    flags.DEFINE_integer("batches", 20, "timed batches per worker setting")
    flags.DEFINE_string("workers", "0,2", "comma-separated worker counts")
    app.run(main)
