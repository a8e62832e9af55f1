"""Where a TMTV-Net network's time goes on an accelerator: every distinct convolution timed on its own.

    python3 benchmarks/gpu_convs.py --out convs.json              # on the GPU machine (~3 min)
    .venv/bin/python benchmarks/gpu_convs.py --small --out x.json  # CPU, narrow nets: a check that it runs

For each workload the convolutions are read from the jaxpr of the real network (`benchmarks/_flops.py` walks the
same equations), grouped by signature (input and kernel shape, strides, padding), and each distinct one is
compiled and timed alone on random data; `sum(count x time)` is then set against the whole network's time. The
remainder is everything else: instance norms, activations, concatenations, resizes, layout changes. Workloads:

- `refiner_fwd`: the refiner's forward pass on one 96^3 x 6 tile (stage B of the cascade);
- `unet_fwd`: one ensemble member's forward pass on a 128x96x96x5 tile (stage A runs 4 of these);
- `unet_train`: one U-Net member at batch 2, forward + backward of every convolution (value and both
  gradients, as `jax.vjp` gives them): the training step's convolution work.

Variants for the convolutions with few input channels (the first layer: 5 or 6 channels, which tensor cores
use poorly): zero-padding the input channels to 8 and 16, and folding the depth taps into the channels (one
2-D convolution over `kD * Cin` channels, `clips_jax.model.layers._conv3d_folded`). Each is timed as the
plain one; the JSON keeps every figure, the summary prints the largest items.

Protocol: `lower().compile()` timed apart, 2 warm-up calls, median of `--repeats` calls each ending in
`block_until_ready`. `--budget-s` stops starting new items once spent (the JSON says what was skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import portable_command  # noqa: E402


def _conv_items(fn, *args) -> list[dict]:
    """Distinct `conv_general_dilated` equations of `fn(*args)` (nested jaxprs included) with their counts."""
    import jax
    from _flops import _conv_flops, _sub_jaxprs

    found: dict[tuple, dict] = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                key = (
                    tuple(eqn.invars[0].aval.shape),
                    tuple(eqn.invars[1].aval.shape),
                    tuple(p["window_strides"]),
                    tuple(map(tuple, p["padding"])),
                    tuple(p["lhs_dilation"]),
                    tuple(p["rhs_dilation"]),
                    str(eqn.invars[0].aval.dtype),
                )
                item = found.setdefault(
                    key,
                    {
                        "lhs": key[0],
                        "rhs": key[1],
                        "strides": key[2],
                        "padding": key[3],
                        "lhs_dilation": key[4],
                        "rhs_dilation": key[5],
                        "dtype": key[6],
                        "dimension_numbers": p["dimension_numbers"],
                        "gflop": _conv_flops(eqn) / 1e9,
                        "count": 0,
                    },
                )
                item["count"] += 1
            for v in eqn.params.values():
                for j in _sub_jaxprs(v):
                    walk(j)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return list(found.values())


def _time(fn, args, repeats: int) -> tuple[float, float]:
    """(compile seconds, median milliseconds) of a jitted `fn(*args)`."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times) * 1e3


def _conv_fn(item: dict, train: bool, variant: str):
    """The convolution of `item` (or a variant) as `f(x, w)`; with `train`, value and both gradients."""
    import jax
    import jax.numpy as jnp

    from clips_jax.model.layers import _conv3d_folded

    dn, strides, pad = item["dimension_numbers"], item["strides"], item["padding"]

    def conv(x, w):
        if variant == "fold_depth":
            return _conv3d_folded(x, w, strides, pad, None)
        if variant.startswith("pad_cin_"):
            extra = int(variant.rsplit("_", 1)[1]) - x.shape[-1]
            x = jnp.pad(x, ((0, 0),) * 4 + ((0, extra),))
            w = jnp.pad(w, ((0, 0),) * 3 + ((0, extra), (0, 0)))
        return jax.lax.conv_general_dilated(
            x,
            w,
            strides,
            pad,
            lhs_dilation=item["lhs_dilation"],
            rhs_dilation=item["rhs_dilation"],
            dimension_numbers=dn,
        )

    if not train:
        return conv

    def value_and_grads(x, w):
        y, vjp = jax.vjp(conv, x, w)
        return y, vjp(y)  # the output itself as cotangent: data-dependent, not folded away

    return value_and_grads


def _variants(item: dict) -> list[str]:
    """The plain convolution, and for 3-D channels-last ones with few input channels the padded and folded forms."""
    dn = item["dimension_numbers"]
    out = ["plain"]
    if len(item["rhs"]) != 5 or dn.lhs_spec != (0, 4, 1, 2, 3) or dn.rhs_spec != (4, 3, 0, 1, 2):
        return out  # not NDHWC x DHWIO (e.g. the CPU path's 2-D convolutions)
    cin, kd = item["rhs"][3], item["rhs"][0]
    if cin < 8:
        out += ["pad_cin_8", "pad_cin_16"]
    if kd > 1 and cin < 8 and all(s == 1 for s in item["strides"]):
        out.append("fold_depth")
    return out


def _time_conv(it: dict, train: bool, repeats: int) -> dict:
    """One distinct convolution, plain and its variants: ms each, total ms (x count), TFLOP/s of the plain one."""
    import jax

    row = {k: (list(v) if isinstance(v, tuple) else v) for k, v in it.items() if k != "dimension_numbers"}
    row["variants"] = {}
    x = jax.random.normal(jax.random.PRNGKey(1), it["lhs"]).astype(it["dtype"])
    w = (0.05 * jax.random.normal(jax.random.PRNGKey(2), it["rhs"])).astype(it["dtype"])
    for var in _variants(it):
        try:
            c_s, ms = _time(_conv_fn(it, train, var), (x, w), repeats)
            row["variants"][var] = {"ms": ms, "compile_s": c_s}
        except Exception as e:  # noqa: BLE001 - a variant may not compile: record it and go on
            row["variants"][var] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    plain = row["variants"]["plain"].get("ms", math.nan)
    row["total_ms"] = plain * it["count"]
    row["tflop_per_s"] = (3.0 if train else 1.0) * it["gflop"] / plain if plain > 0 else math.nan
    print(
        f"  {it['count']}x {tuple(it['lhs'])} * {tuple(it['rhs'])} s{tuple(it['strides'])}: "
        + ", ".join(f"{k} {v.get('ms', float('nan')):.3f} ms" for k, v in row["variants"].items())
        + f"  ({row['tflop_per_s']:.1f} TFLOP/s)",
        flush=True,
    )
    return row


def workloads(small: bool):
    """(name, train flag, the timed function, its forward function, abstract args) of every workload."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from clips_jax.model.checkpoint import abstract_model

    if small:
        unet = {"channels": (8, 16, 32, 32), "init_channels": 8, "bottleneck_kernel": 3}
        refiner, t_b, t_a = {"features": 8, "n_blocks": 2, "first_kernel": 3}, (32, 32, 32), (32, 32, 32)
    else:
        unet, refiner, t_b, t_a = {}, {}, (96, 96, 96), (128, 96, 96)
    out = []
    for dtype in ("bfloat16", "float32"):
        dt = jnp.dtype(dtype)
        for name, cls, cfg, shape, train in (
            ("refiner_fwd", "Refiner", refiner, (1, *t_b, 6), False),
            ("unet_fwd", "UNet", unet, (1, *t_a, 5), False),
            ("unet_train", "UNet", unet, (2, *t_a, 5), True),
        ):
            model = abstract_model(cls, cfg, dtype=dt)
            g, s = nnx.split(model)
            x = jax.ShapeDtypeStruct(shape, jnp.float32)

            def fwd(s, v, g=g):
                return nnx.merge(g, s)(v)

            def grad(s, v, fwd=fwd):
                return jax.grad(lambda s_: jnp.sum(jnp.square(jnp.asarray(fwd(s_, v)[0], jnp.float32))))(s)

            out.append((f"{name}/{dtype}", train, grad if train else fwd, fwd, (s, x)))
    return out


def _materialise(args, seed=0):
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree.flatten(args)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    real = [jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype) * 0.05 for k, a in zip(keys, leaves)]
    return jax.tree.unflatten(tree, real)


def run(small: bool, repeats: int, budget_s: float) -> dict:
    import jax

    t_start = time.perf_counter()
    doc = {
        "script": "benchmarks/gpu_convs.py",
        "command": portable_command(__file__, sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "workloads": {},
        "skipped": [],
    }
    for name, train, fn, fwd, abstract in workloads(small):
        if time.perf_counter() - t_start > budget_s:
            doc["skipped"].append(name)
            continue
        args = _materialise(abstract)
        compile_s, whole_ms = _time(fn, args, repeats)
        items = _conv_items(fwd, *abstract)  # a train workload times each forward convolution with its vjp
        print(
            f"{name}: whole {whole_ms:.2f} ms (compile {compile_s:.1f} s), {len(items)} distinct convolutions",
            flush=True,
        )
        convs = []
        for it in items:
            if time.perf_counter() - t_start > budget_s:
                doc["skipped"].append(f"{name} conv {it['lhs']} x {it['rhs']}")
                continue
            convs.append(_time_conv(it, train, repeats))
        conv_ms = sum(r["total_ms"] for r in convs)
        doc["workloads"][name] = {
            "whole_ms": whole_ms,
            "compile_s": compile_s,
            "conv_sum_ms": conv_ms,
            "rest_ms": whole_ms - conv_ms,
            "convs": convs,
        }
        print(
            f"  -> convolutions {conv_ms:.2f} ms of {whole_ms:.2f} ms; the rest {whole_ms - conv_ms:.2f} ms", flush=True
        )
    doc["wall_s"] = time.perf_counter() - t_start
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="narrow networks and 32^3 tiles (CPU check)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new items after this")
    args = ap.parse_args()
    if args.small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    doc = run(args.small, args.repeats, args.budget_s)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(args.out)
    print(f"wall {doc['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
