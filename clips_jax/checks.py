"""Argument checks shared by the libraries and the commands; each raises `ConfigError` naming the argument."""

from __future__ import annotations

from typing import Any

import numpy as np

from clips_jax.errors import ConfigError


def zyx_triple(value: Any, name: str) -> tuple[int, int, int]:
    """Three positive ints (z, y, x) from one int or a 3-sequence (a tile shape, a step, a volume shape).

    Raises ConfigError naming `name` for anything else (wrong length, not integers, < 1).
    """
    try:
        raw = np.broadcast_to(np.asarray(value), (3,))
        exact = raw.dtype != bool and all(float(v) == int(v) for v in raw)  # 2.5 or True is not a size
        t = tuple(int(v) for v in raw) if exact else (0,)
    except (TypeError, ValueError):
        t = (0,)
    if len(t) != 3 or min(t) < 1:
        raise ConfigError(f"{name}={value!r}: need three positive integers (z, y, x)")
    return t
