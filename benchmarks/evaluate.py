"""Benchmark: time per case of `clips_jax.metrics.case_metrics` on an autoPET-size case.

A 400 x 400 x 326 grid at 2.036 x 2.036 x 3.0 mm (autoPET median, spacing (z, y, x) = (3.0, 2.036, 2.036))
with a few lymphoma-like lesions (ellipsoids) inside a ~60 x 80 x 80-voxel region; the prediction is the truth
dilated in places, with one lesion missed and one false positive. Times our full row (all 28 metrics, with
SUV) and, when monai is installed, MONAI's Dice + HD95 + ASSD + NSD(use_subvoxels) on the same masks.
Run: .venv/bin/python benchmarks/evaluate.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
from scipy import ndimage

from clips_jax.metrics import case_metrics

SHAPE = (326, 400, 400)
SPACING = (3.0, 2.036, 2.036)


def make_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(SHAPE, bool)
    z, y, x = np.ogrid[:60, :80, :80]
    region = np.zeros((60, 80, 80), bool)
    for _ in range(5):
        c = rng.uniform([10, 15, 15], [50, 65, 65])
        r = rng.uniform(8, 20, 3)
        region |= (
            ((z - c[0]) * 3.0 / r[0]) ** 2 + ((y - c[1]) * 2.036 / r[1]) ** 2 + ((x - c[2]) * 2.036 / r[2]) ** 2
        ) <= 1
    truth[130:190, 160:240, 150:230] = region
    pred = ndimage.binary_dilation(truth, iterations=1)
    lab, n = ndimage.label(truth)
    pred[lab == n] = False  # one lesion missed
    pred[150:156, 100:106, 100:106] = True  # one false positive
    suv = rng.gamma(2.0, 0.6, SHAPE).astype(np.float32)
    suv[truth] += 6.0
    return pred, truth, suv


def timeit(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.min(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    pred, truth, suv = make_case()
    print(f"case: {SHAPE} voxels at {SPACING} mm, truth {truth.sum()} voxels, pred {pred.sum()} voxels")
    med, best = timeit(lambda: case_metrics(pred, truth, SPACING, suv), args.repeats)
    print(f"ours  case_metrics (all 28 columns, with SUV): median {med:.3f} s, best {best:.3f} s")
    try:
        import torch
        from monai import metrics as mm
    except ImportError:
        print("monai not installed: MONAI comparison skipped")
        return
    torch.set_num_threads(1)
    p = torch.as_tensor(pred[None, None])
    t = torch.as_tensor(truth[None, None])

    def monai_all():
        mm.compute_dice(p.float(), t.float(), include_background=True)
        mm.compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=SPACING)
        mm.compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=SPACING)
        mm.compute_surface_dice(
            p, t, class_thresholds=[5.0], include_background=True, spacing=SPACING, use_subvoxels=True
        )

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        med, best = timeit(monai_all, max(1, args.repeats // 2))
    print(f"monai Dice + HD95 + ASSD + NSD(subvoxels): median {med:.3f} s, best {best:.3f} s")


if __name__ == "__main__":
    main()
