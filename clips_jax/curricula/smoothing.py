"""Curriculum by smoothing (Sinha, Garg & Larochelle 2020): the sigma schedule and the 1-D kernel.

How it fits: the model (``clips_jax.model.layers.gaussian_smooth``, owned by the model package) blurs the
output of every 3x3x3 convolution with a fixed Gaussian of width sigma; sigma enters the compiled model as
a traced float32 scalar, so annealing it never recompiles. This module only provides

  * `cbs_sigma(step, ...)`: sigma(step) = sigma0 * decay^floor(e / every_epochs), e = floor(step /
    steps_per_epoch) (paper and code defaults: sigma0 = 1.0, decay = 0.9, every 5 epochs; the first decay
    happens at epoch `every_epochs`);
  * `with_smoothing(curriculum, ...)`: the same data curriculum whose ``sigma`` follows that schedule
    (composable with any data curriculum; "cbs" alone is ``with_smoothing(uniform)``);
  * `kernel_1d(sigma, size)`: the normalised 1-D kernel [a, 1, a] / (1 + 2a), a = exp(-1 / (2 sigma^2))
    for size 3 (general odd size: exp(-x^2 / (2 sigma^2)) on the integer grid centred at 0), exactly the
    identity [0, 1, 0] when sigma < 1e-3 (avoids the 0/0 of sigma = 0). The 3-D kernel is the outer
    product of three of these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clips_jax.curricula.core import Array, Curriculum, State, check, whole_epochs_of

SIGMA_MIN = 1e-3  # below this sigma the kernel is the identity


@dataclasses.dataclass(frozen=True)
class SmoothingConfig:
    """Options of the curriculum-by-smoothing schedule.

    Attributes:
      sigma0: initial sigma (voxels, >= 0). Default 1.0.
      decay: multiplicative decay factor gamma in (0, 1]. Default 0.9.
      every_epochs: P, epochs between decays (>= 1). Default 5.
      steps_per_epoch: optimisation steps per epoch (required, > 0).
    """

    sigma0: float = 1.0
    decay: float = 0.9
    every_epochs: int = 5
    steps_per_epoch: int | None = None

    def validate(self) -> None:
        """Raise ConfigError for an invalid option."""
        check(self.sigma0 >= 0, "sigma0 must be >= 0")
        check(0 < self.decay <= 1, "decay must be in (0, 1]")
        check(int(self.every_epochs) >= 1, "every_epochs must be >= 1")
        check(
            self.steps_per_epoch is not None and int(self.steps_per_epoch) > 0,
            "steps_per_epoch must be a positive integer (global optimisation steps per epoch)",
        )


def cbs_sigma(
    step: Array, sigma0: float = 1.0, decay: float = 0.9, every_epochs: int = 5, steps_per_epoch: int = 1
) -> jax.Array:
    """sigma(step) = sigma0 * decay^floor(floor(step / steps_per_epoch) / every_epochs) (float32 scalar).

    `step` may be a traced int scalar; the other arguments are static Python numbers.
    """
    e = whole_epochs_of(step, steps_per_epoch)
    return jnp.float32(sigma0) * jnp.power(jnp.float32(decay), (e // every_epochs).astype(jnp.float32))


def kernel_1d(sigma: Array, size: int = 3) -> jax.Array:
    """Normalised 1-D Gaussian kernel of odd `size` (float32 (size,)); identity when sigma < 1e-3.

    Args: sigma: float scalar (may be traced), in voxels; size: static odd int >= 1.
    Returns: k with k[c + x] proportional to exp(-x^2 / (2 sigma^2)), x = -(size//2)..size//2, sum 1;
      for size 3 that is [a, 1, a] / (1 + 2a), a = exp(-1/(2 sigma^2)). Exactly one-hot at the centre
      when sigma < 1e-3 (no NaN at sigma = 0).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    s = jnp.asarray(sigma, jnp.float32)
    small = s < SIGMA_MIN
    s_safe = jnp.where(small, 1.0, s)
    x = jnp.arange(size, dtype=jnp.float32) - (size // 2)
    g = jnp.exp(-(x * x) / (2.0 * s_safe * s_safe))
    g = g / jnp.sum(g)
    identity = (x == 0).astype(jnp.float32)
    return jnp.where(small, identity, g)


def with_smoothing(curriculum: Curriculum, cfg: SmoothingConfig) -> Curriculum:
    """Return `curriculum` with its ``sigma`` replaced by the CBS schedule of `cfg` (other fields unchanged).

    The returned Curriculum's config is the pair (data config, smoothing config); init/weights/update/end_stage
    and what the data curriculum declares it needs (losses, prediction gain, update cadence) are kept, so the
    data curriculum is unaffected (an Exp3.S bandit with smoothing still gets its reward); `smooths` is True.
    Raises ConfigError for invalid options.
    """
    cfg.validate()

    def sigma(state: State, step: Array) -> jax.Array:
        del state
        return cbs_sigma(step, cfg.sigma0, cfg.decay, cfg.every_epochs, cfg.steps_per_epoch)

    return curriculum._replace(name=curriculum.name, config=(curriculum.config, cfg), sigma=sigma, smooths=True)
