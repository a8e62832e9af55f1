"""Benchmark of the data side: phantoms, preparation, and training crops per second (host and device paths).

    .venv/bin/python benchmarks/data_pipeline.py [--cases 4] [--batches 20] [--workers 0,2]
    .venv/bin/python benchmarks/data_pipeline.py --compare [--cache_dir DIR] [--cases 4] [--batches 20] [--rounds 3]
    .venv/bin/python benchmarks/data_pipeline.py --compare --small        # seconds; used by the tests

Default mode (in a temporary folder, removed at the end):
1. `make_phantom(size="full")` (326 x 200 x 200 voxels at 3.0 x 2.04 x 2.04 mm) + NIfTI writing, per case.
2. `prepare_dataset` to the 6 mm grid (the TMTV-Net training grid).
3. `make_train_iterator` with the reference patch 128 x 96 x 96, batch 2, all augmentations on, for each
   worker count: time to the first batch (worker start-up) and crops per second over the next batches.

`--compare`: the host pipeline (`pipeline.make_train_iterator`, default augmentations, `--workers` first entry)
against the device path (`clips_jax.data.device.sample_batch` under `jax.jit` on the default JAX device, warm,
one call per batch ended by `block_until_ready`), same store, same patch (128 x 96 x 96), batch (2),
p_foreground (0.3) and p_hot_negative (0.1), in the same run: `--rounds` alternating rounds of `--batches`
batches per path (the load of a shared machine changes during a run), rates pooled over the rounds. Before each device
round the host iterator's prefetch (2 batches) is left to fill, so the device is timed alone and each host
round starts with up to 2 ready batches (favours the host). Phantoms of 326 x 300 x 300 voxels at
3.0 x 2.04 x 2.04 mm (a 163 x 102 x 102 grid at 6 mm: the "full" phantom is only 68 voxels wide at 6 mm, narrower
than the 96-voxel patch) are written and prepared once under `--cache_dir` (default
`<system temp>/clips_jax_bench_phantoms`) and reused. Also printed: the device path with all batches drawn inside
one jitted `fori_loop` (as in a compiled multi-step train loop: no per-call allocation of the batch and the
temporaries, which on a CPU backend costs page faults of ~45 MB per crop), and a breakdown of one device crop
(draw, plain crop, affine crop, each intensity augmentation, the channels; each stage jitted alone).
`--small`: 48 x 32 x 32 phantoms at 4 mm (32 x 21 x 21 at 6 mm), 24 x 16 x 16 crops, 2 cases, 3 batches, no
in-loop run and no breakdown (a few seconds; `tests/test_device_data.py` calls `compare(small=True)`).
The allocator is set as the command-line tools set it (`clips_jax.host_memory`: glibc keeps freed memory for
reuse, for both paths); `CLIPS_MALLOC=default` leaves glibc as it comes, and then on a CPU backend each device
call page-faults its fresh ~90 MB of output and temporaries (blocks above 32 MB are mapped anew every time).
The last line printed is `ratio device/host: X` (per-call device crops/s over host crops/s, 2 decimals).
Prints the machine, the date and the numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

FULL = {"phantom_size": "326x300x300", "spacing_mm": (3.0, 2.04, 2.04), "patch": (128, 96, 96)}
SMALL = {"phantom_size": "48x32x32", "spacing_mm": (4.0, 4.0, 4.0), "patch": (24, 16, 16)}


def _load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def prepared_store(cache_dir, cases: int, phantom_size: str, spacing_mm, log=print):
    """The CaseStore of `cases` phantoms of `phantom_size` at `spacing_mm`, prepared to 6 mm, cached under
    `cache_dir/<size>_<spacing>/` (written and prepared only the first time)."""
    from clips_jax.data.phantoms import write_phantoms
    from clips_jax.data.prepare import prepare_dataset
    from clips_jax.data.store import CaseStore

    tag = f"{phantom_size}_{'x'.join(f'{s:g}' for s in spacing_mm)}mm"
    root = Path(cache_dir) / tag
    store_dir = root / f"cache_{cases}"
    if not (store_dir / "manifest.json").is_file() or len(CaseStore(store_dir)) < cases:
        t0 = time.perf_counter()
        write_phantoms(root / "data", cases, seed=1000, size=phantom_size, spacing_mm=spacing_mm)
        t1 = time.perf_counter()
        prepare_dataset(root / "data", store_dir, spacing_mm=6.0, log=lambda m: None)
        log(f"phantoms written in {t1 - t0:.1f} s, prepared in {time.perf_counter() - t1:.1f} s -> {store_dir}")
    else:
        log(f"phantom store reused: {store_dir}")
    return CaseStore(store_dir)


def _timeit(fn, n: int) -> float:
    """Seconds per call of `fn` (which blocks), after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def device_breakdown(dstore, patch, log=print, repeats: int = 3) -> dict:
    """ms per element of each stage of a device crop (each jitted alone; sums exceed the fused whole)."""
    import functools

    import jax
    import jax.numpy as jnp

    from clips_jax.data import device as dv
    from clips_jax.data.channels import make_channels_jnp

    case, start = jnp.int32(0), jnp.zeros(3, jnp.int32)
    m = dv.affine_matrix_jnp(jnp.array([0.2, -0.1, 0.25]), 1.05, dstore.spacing[0])
    flips = jnp.zeros(3, bool)
    plain = jax.jit(lambda d: dv._crop_plain(d, case, start, flips, patch))
    affine = jax.jit(lambda d: dv._crop_affine(d, case, start, m, flips, patch))
    img, _ = plain(dstore)
    suv = img[..., 1]
    out = {}

    def t(name, f, *a):
        out[name] = 1000 * _timeit(lambda: jax.block_until_ready(f(*a)), repeats)

    t(
        "draw params (batch 2)",
        jax.jit(functools.partial(dv.draw_params, batch_size=2, patch_shape=patch)),
        jax.random.key(0),
        jnp.ones(dstore.num_cases),
        dstore,
    )
    t("plain crop", plain, dstore)
    t("affine crop", affine, dstore)
    for name, f, p in zip(dv.INTENSITY_STEPS, dv._INTENSITY_FNS, (0.8, 1.1, 1.1, 0.7, 1.2, 1.2)):
        t(name, jax.jit(f), suv, jnp.float32(p))
    t("channels", jax.jit(make_channels_jnp), img[..., 0], suv)
    log(
        "device breakdown (ms per element, each stage jitted alone): "
        + ", ".join(f"{k} {v:.1f}" for k, v in out.items())
    )
    return out


def compare(
    *,
    small: bool = False,
    cache_dir=None,
    cases: int | None = None,
    batches: int | None = None,
    rounds: int | None = None,
    batch_size: int = 2,
    host_workers: int = 0,
    breakdown: bool | None = None,
    in_loop: bool | None = None,
    log=print,
) -> dict:
    """Crops per second of the host pipeline and the device path on the same store; prints, and returns
    `{"host": crops/s, "device": crops/s, "ratio": device / host, ...}`.

    The two paths are timed alternately, `rounds` times `batches` batches each, so a change of the machine's
    load during the run hits both (a shared 2-core machine); rates are pooled (all crops / all time)."""
    import jax
    import numpy as np

    from clips_jax.data import device as dv
    from clips_jax.data.pipeline import make_train_iterator

    cfg = SMALL if small else FULL
    cases = (2 if small else 4) if cases is None else int(cases)
    batches = (3 if small else 20) if batches is None else int(batches)
    rounds = (1 if small else 3) if rounds is None else int(rounds)
    breakdown = (not small) if breakdown is None else breakdown
    in_loop = (not small) if in_loop is None else in_loop
    patch = tuple(cfg["patch"])
    cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "clips_jax_bench_phantoms"
    store = prepared_store(cache_dir, cases, cfg["phantom_size"], cfg["spacing_mm"], log=log)
    idx = np.arange(cases)
    w = np.ones(cases)
    log(
        f"store: {cases} cases, grids {sorted({store.geometry(int(i)).shape for i in idx})} at 6 mm; patch {patch}, "
        f"batch {batch_size}, p_foreground 0.3, p_hot_negative 0.1, augmentations on (defaults); {rounds} rounds of "
        f"{batches} batches per path, alternating"
    )
    kw = dict(p_foreground=0.3, p_hot_negative=0.1)

    it = make_train_iterator(
        store,
        w,
        seed=0,
        stage=0,
        batch_size=batch_size,
        patch_shape=patch,
        num_workers=host_workers,
        case_indices=idx,
        process_index=0,
        process_count=1,
        **kw,
    )
    t0 = time.perf_counter()
    next(it)
    t_first = time.perf_counter() - t0

    t0 = time.perf_counter()
    dstore = dv.device_store_from(store, idx)
    jax.block_until_ready(dstore)
    t_build = time.perf_counter() - t0
    # the store is an argument, not a closure (a closed-over array would be baked into the executable)
    fn = jax.jit(
        lambda k, ww, d: dv.sample_batch(k, ww, d, batch_size=batch_size, patch_shape=patch, augment=True, **kw)
    )
    key = jax.random.key(0)
    wj = jax.numpy.asarray(w, jax.numpy.float32)
    t0 = time.perf_counter()
    fn.lower(key, wj, dstore).compile()
    t_compile = time.perf_counter() - t0
    for i in range(2):
        jax.block_until_ready(fn(jax.random.fold_in(key, 10_000 + i), wj, dstore))

    host_rates, dev_rates = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        host_rates.append(batch_size * batches / (time.perf_counter() - t0))
        time.sleep(2.5 * batch_size / host_rates[-1])  # let the host prefetch settle: the device is timed alone
        t0 = time.perf_counter()
        for i in range(batches):
            jax.block_until_ready(fn(jax.random.fold_in(key, r * batches + i), wj, dstore))
        dev_rates.append(batch_size * batches / (time.perf_counter() - t0))
    del it
    # pooled rates (all crops / all time): the host's cost is heavy-tailed (its cubic low-resolution
    # simulation takes ~0.8 s per patch at p = 0.1), so a round's rate depends on what it drew
    host = rounds / float(np.sum(1.0 / np.asarray(host_rates)))
    device = rounds / float(np.sum(1.0 / np.asarray(dev_rates)))
    log(
        f"host  (grain, workers={host_workers}): first batch {t_first:.2f} s, then {host:.2f} crops/s "
        f"({batch_size / host * 1000:.0f} ms/batch; rounds {', '.join(f'{v:.2f}' for v in host_rates)})"
    )
    log(
        f"device ({jax.devices()[0].platform}, jit, warm, one call per batch): store {dstore.nbytes / 2**20:.0f} MiB "
        f"built in {t_build:.2f} s (estimate {dv.device_store_bytes(store, idx) / 2**20:.0f} MiB), compile "
        f"{t_compile:.2f} s, then {device:.2f} crops/s ({batch_size / device * 1000:.0f} ms/batch; rounds "
        f"{', '.join(f'{v:.2f}' for v in dev_rates)})"
    )
    out = {
        "host": host,
        "device": device,
        "ratio": device / host,
        "compile_s": t_compile,
        "host_rounds": host_rates,
        "device_rounds": dev_rates,
    }
    if in_loop:
        out["device_in_loop"] = _in_loop(dstore, key, wj, patch, batch_size, batches, kw, log)
        log(f"ratio device-in-loop/host: {out['device_in_loop'] / host:.2f}")
    if breakdown:
        out["breakdown_ms"] = device_breakdown(dstore, patch, log=log)
    log(f"ratio device/host: {device / host:.2f}")
    return out


def _in_loop(dstore, key, wj, patch, batch_size, batches, kw, log) -> float:
    """Crops/s of `batches` batches drawn inside one jitted fori_loop, the trainer's usage (buffers reused across
    iterations, no per-call allocation); each batch is forced to be materialised (optimization_barrier)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from clips_jax.data import device as dv

    def loop(k, ww, d):
        def body(i, acc):
            b = lax.optimization_barrier(
                dv.sample_batch(
                    jax.random.fold_in(k, i), ww, d, batch_size=batch_size, patch_shape=patch, augment=True, **kw
                )
            )
            return acc + b["image"][:, 0, 0, 0, 0].sum() + b["label"][:, 0, 0, 0].sum()

        return lax.fori_loop(0, batches, body, jnp.float32(0))

    looped = jax.jit(loop)
    jax.block_until_ready(looped(jax.random.fold_in(key, 20_000), wj, dstore))
    t1 = time.perf_counter()
    jax.block_until_ready(looped(jax.random.fold_in(key, 30_000), wj, dstore))
    loop_dt = time.perf_counter() - t1
    in_loop = batch_size * batches / loop_dt
    log(
        f"device, {batches} batches inside one jitted fori_loop (as in a compiled train loop): {in_loop:.2f} crops/s "
        f"({loop_dt / batches * 1000:.0f} ms/batch)"
    )
    return in_loop


def _header():
    import jax
    import numpy as np

    print(
        f"machine: {platform.node()} {cpu_model()}, {os.cpu_count()} CPUs, load {_load()}, python "
        f"{platform.python_version()}, numpy {np.__version__}, jax {jax.__version__} ({jax.devices()[0]})"
    )
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.compare:
        from clips_jax import host_memory

        print(f"allocator: {host_memory.configure_from_env()} (clips_jax.host_memory, {host_memory.MALLOC_ENV})")
        _header()
        compare(
            small=f.small,
            cache_dir=f.cache_dir or None,
            cases=f.cases if f["cases"].present else None,
            batches=f.batches if f["batches"].present else None,
            rounds=f.rounds if f["rounds"].present else None,
            batch_size=f.batch_size,
            host_workers=int(f.workers.split(",")[0]),
        )
        return

    import numpy as np

    from clips_jax.data.phantoms import make_phantom, write_phantom
    from clips_jax.data.pipeline import make_train_iterator
    from clips_jax.data.prepare import prepare_dataset
    from clips_jax.data.store import CaseStore

    print(
        f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, numpy {np.__version__}"
    )
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
        print(
            f"phantom full {ph.ct.shape}: generation {np.mean(gen):.2f} s/case (min {np.min(gen):.2f}), "
            f"NIfTI writing {np.mean(write):.2f} s/case, {f.cases} cases"
        )
        t0 = time.perf_counter()
        prepare_dataset(tmp / "data", tmp / "cache", spacing_mm=6.0, log=lambda m: None)
        store = CaseStore(tmp / "cache")
        print(
            f"prepare (load + measures + resample to 6 mm + store): "
            f"{(time.perf_counter() - t0) / f.cases:.2f} s/case, stored grid {store.geometry(0).shape}"
        )
        for nw in [int(v) for v in f.workers.split(",")]:
            it = make_train_iterator(
                store,
                np.ones(len(store)),
                seed=0,
                stage=0,
                batch_size=2,
                patch_shape=(128, 96, 96),
                num_workers=nw,
                p_foreground=0.3,
                process_index=0,
                process_count=1,
            )
            t0 = time.perf_counter()
            next(it)
            t1 = time.perf_counter()
            for _ in range(f.batches):
                next(it)
            dt = time.perf_counter() - t1
            print(
                f"pipeline workers={nw}: first batch {t1 - t0:.2f} s, then {2 * f.batches / dt:.2f} crops/s "
                f"({dt / f.batches * 1000:.0f} ms/batch of 2 x 128x96x96x5, augmentations on)"
            )
            del it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("cases", 4, "number of phantoms")
    flags.DEFINE_integer("batches", 20, "timed batches per setting (--compare: per round; --small: 3 unless given)")
    flags.DEFINE_string("workers", "0,2", "comma-separated worker counts (--compare: the host uses the first)")
    flags.DEFINE_bool("compare", False, "host pipeline vs device path (clips_jax.data.device), same run")
    flags.DEFINE_bool("small", False, "with --compare: tiny phantoms and crops (seconds)")
    flags.DEFINE_string(
        "cache_dir", "", "with --compare: phantom/store cache (default: <temp>/clips_jax_bench_phantoms)"
    )
    flags.DEFINE_integer("rounds", 3, "with --compare: alternating rounds per path (--small: 1 unless given)")
    flags.DEFINE_integer("batch_size", 2, "with --compare: crops per batch (both paths)")
    app.run(main)
