"""Counting the floating-point work of a JAX function from its jaxpr, the same on every backend.

Why: XLA's `compiled.cost_analysis()["flops"]` leaves out convolutions that the GPU backend hands to cuDNN as
custom calls. On an H200 it reported 18 GFLOP for the full-width train step whose XLA:CPU count is 2,664 GFLOP
(BENCHMARKS.md, "GPU suite"), so any TFLOP/s derived from it on a GPU is wrong by two orders of magnitude. This
module counts the matrix work itself: 2 multiply-adds per output element and kernel tap for every
`conv_general_dilated` (forward, input-gradient and weight-gradient convolutions alike) and 2 per output element
and contracted index for every `dot_general`, walking nested jaxprs (jit, custom_vjp, remat, cond: the costliest
branch; scan: times its length). Element-wise work (norms, activations, the loss) is not counted: it is
memory-bound and small in FLOPs next to the convolutions.

    from _flops import matmul_gflop
    gflop = matmul_gflop(train_step, state, batch)     # same arguments as the function takes
"""

from __future__ import annotations

import math
from typing import Any, Callable


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    taps = math.prod(rhs[d] for d in spec[2:])
    return 2.0 * math.prod(out) * taps * rhs[spec[1]]


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value: Any):
    """The jaxprs held in one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in `jaxpr` (a core.Jaxpr), sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        counts = [jaxpr_flops(j) for j in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def matmul_gflop(fn: Callable, *args, **kwargs) -> float:
    """GFLOP (1e9) of one call of `fn(*args, **kwargs)`: convolutions and matrix products, from its jaxpr."""
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr) / 1e9
