"""The 5 normalised network input channels of TMTV-Net (original: `PreprocessDataV4_lung_soft_tissues_hot` in
`main/src/preprocess.py` of qurit-frizi/TMTV-Net).

Every channel is a clipped linear window of the raw CT (HU) or SUVbw, mapped to [0, 1]:

  ct       (clip(HU, -150, 300) + 150) / 450      soft-tissue/bone window
  suv      clip(SUV, 0, 30) / 30
  ct_lung  (clip(HU, -1000, -200) + 1000) / 800   lung window
  ct_soft  (clip(HU, -100, 100) + 100) / 200      narrow soft-tissue window
  suv_hot  (clip(SUV, 2, 10) - 2) / 8             "hot" uptake window

`CHANNELS` is the network's channel order (last axis). `make_channels` is the NumPy version used at data
preparation time; `make_channels_jnp` is the jit-able JAX twin with identical maths, used on device by the
trainer (so raw CT/SUV can be shipped and windowed on the accelerator). NaN inputs propagate as NaN (loaders
reject non-finite images before this point).
"""

from __future__ import annotations

import numpy as np

from clips_jax.data.case import Case

CHANNELS: tuple[str, ...] = ("ct", "suv", "ct_lung", "ct_soft", "suv_hot")

# name -> (source, low, high): value = (clip(src, low, high) - low) / (high - low).
WINDOWS: dict[str, tuple[str, float, float]] = {
    "ct": ("ct", -150.0, 300.0),
    "suv": ("suv", 0.0, 30.0),
    "ct_lung": ("ct", -1000.0, -200.0),
    "ct_soft": ("ct", -100.0, 100.0),
    "suv_hot": ("suv", 2.0, 10.0),
}


def make_channels(ct_hu: np.ndarray, suv: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Stack the 5 windowed channels.

    Args:
      ct_hu: (z, y, x) CT in HU (any real dtype).
      suv: (z, y, x) SUVbw, same shape.
      dtype: output dtype (float32; TMTV-Net's stage B rounds to float16).
    Returns:
      (z, y, x, 5) array in [0, 1], channels in `CHANNELS` order. Maths done in float32.
    Raises:
      ValueError if the shapes differ (programming error, not user data).
    """
    ct_hu = np.asarray(ct_hu, dtype=np.float32)
    suv = np.asarray(suv, dtype=np.float32)
    if ct_hu.shape != suv.shape:
        raise ValueError(f"make_channels: ct shape {ct_hu.shape} != suv shape {suv.shape}")
    out = np.empty(ct_hu.shape + (len(CHANNELS),), dtype=dtype)
    src = {"ct": ct_hu, "suv": suv}
    for c, name in enumerate(CHANNELS):
        s, lo, hi = WINDOWS[name]
        out[..., c] = (np.clip(src[s], np.float32(lo), np.float32(hi)) - np.float32(lo)) / np.float32(hi - lo)
    return out


def make_channels_jnp(ct_hu, suv, dtype=None):
    """JAX twin of `make_channels` (jit-able, works on batched inputs).

    Args:
      ct_hu, suv: arrays of the same shape `(..., z, y, x)` (any leading batch axes), HU and SUVbw.
      dtype: output dtype (default float32).
    Returns:
      `(..., z, y, x, 5)` array in `CHANNELS` order, same maths as `make_channels` (float32).
    """
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    ct_hu = jnp.asarray(ct_hu, jnp.float32)
    suv = jnp.asarray(suv, jnp.float32)
    src = {"ct": ct_hu, "suv": suv}
    chans = []
    for name in CHANNELS:
        s, lo, hi = WINDOWS[name]
        chans.append((jnp.clip(src[s], lo, hi) - jnp.float32(lo)) / jnp.float32(hi - lo))
    return jnp.stack(chans, axis=-1).astype(dtype)


def case_channels(case: Case, dtype=np.float32) -> np.ndarray:
    """`make_channels(case.ct, case.suv)`: (z, y, x, 5) network input of a Case on its own grid."""
    return make_channels(case.ct, case.suv, dtype=dtype)
