"""Pacing (training-scheduler) functions: which slice of the easy -> hard ordering is available at a step.

How it fits: predefined, transfer-teacher and random/anti curricula rank cases once; at every step the
pacing function gives a window [lo(t), hi(t)) of *fractions* of that ordering (lo = 0 except for
one-pass); `select_window` turns it into hard 0/1 membership with the k_min fallback (curriculum rule 1 of
docs/curricula.md; selection as in Bengio et al. 2009 and Hacohen & Weinshall 2019). Self-paced learning reuses
hi(t) as the loss quantile q(t).

Units: t is the fractional epoch step / steps_per_epoch for the survey schedulers (`grow_epochs` in
epochs); the Hacohen & Weinshall exponential pacing counts optimisation steps (`step_length_steps`), as in
the paper. Every function below is pure and jit-compatible in `step`.

Schedulers (lambda0 = `start_fraction`, T = `grow_epochs`; all reach the full set at the time given):
  linear      min(1, l0 + (1 - l0) t / T)                               full at t = T
  root        root_p with p = 2 (Platanios et al. 2019)                 full at t = T
  root_p      min(1, (l0^p + (1 - l0^p) t / T)^(1/p))                   full at t = T
  geometric   min(1, 2^(log2(l0) (1 - t / T)))  (Penha & Hauff 2020)     full at t = T
  exponential min(1, l0 * inc^floor(step / step_length_steps))          full after ceil(log(1/l0)/log(inc)) stages
  single_step l0 for t < T, then 1 (Hacohen & Weinshall control)        full at t = T
  baby_step   K buckets; bucket s+1 merged every T/(K-1) epochs          full at t = T
  one_pass    K buckets; bucket s *replaces* bucket s-1 every T/K epochs; full set from t = T on
              (our choice, so that every curriculum ends at the whole data set)
  none        always the full set
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from clips_jax.curricula.core import Array, check, epochs_of

PACINGS = ("linear", "root", "root_p", "geometric", "exponential", "single_step", "baby_step", "one_pass", "none")


@dataclasses.dataclass(frozen=True)
class PacingConfig:
    """Options of a pacing function (all static Python values).

    Attributes:
      pacing: one of `PACINGS`. Default "root" (root-2, the survey's most beneficial continuous scheduler).
      start_fraction: lambda0 in (0, 1], fraction of the ordering available at step 0. Default 0.1.
      grow_epochs: T, epochs until the full set is available (> 0; 0 means full from the start). Default 100.
      p: exponent of root_p (>= 1). Default 2.0.
      inc: growth factor of the exponential pacing (> 1). Default 1.9 (Hacohen & Weinshall).
      step_length_steps: steps between exponential growth stages (>= 1). Default 100 (Hacohen & Weinshall).
      n_buckets: K buckets for baby_step / one_pass (>= 1). Default 5.
      steps_per_epoch: optimisation steps per epoch (required, > 0).
    """

    pacing: str = "root"
    start_fraction: float = 0.1
    grow_epochs: float = 100.0
    p: float = 2.0
    inc: float = 1.9
    step_length_steps: int = 100
    n_buckets: int = 5
    steps_per_epoch: int | None = None

    def validate_pacing(self) -> None:
        """Raise ConfigError for an invalid pacing option (called by the curriculum constructors)."""
        check(self.pacing in PACINGS, f"unknown pacing {self.pacing!r}; use one of {PACINGS}")
        check(
            self.steps_per_epoch is not None and int(self.steps_per_epoch) > 0,
            "steps_per_epoch must be a positive integer (global optimisation steps per epoch)",
        )
        check(0.0 < self.start_fraction <= 1.0, f"start_fraction={self.start_fraction} must be in (0, 1]")
        check(self.grow_epochs >= 0.0, f"grow_epochs={self.grow_epochs} must be >= 0")
        check(self.p >= 1.0, f"p={self.p} must be >= 1 for root_p pacing")
        check(self.inc > 1.0, f"inc={self.inc} must be > 1 for exponential pacing")
        check(int(self.step_length_steps) >= 1, "step_length_steps must be >= 1")
        check(int(self.n_buckets) >= 1, "n_buckets must be >= 1")


def exponential_stages(cfg: PacingConfig) -> int:
    """Number of `step_length_steps` stages after which the exponential pacing gives the whole ordering:
    ceil(log(1 / start_fraction) / log(inc)), 0 if start_fraction >= 1."""
    return 0 if cfg.start_fraction >= 1 else math.ceil(math.log(1 / cfg.start_fraction) / math.log(cfg.inc))


def full_set_step(cfg: PacingConfig) -> int:
    """First global step at which `pacing_window` gives the whole ordering (closed form, for tests/logs)."""
    spe = int(cfg.steps_per_epoch)
    if cfg.pacing == "none" or cfg.grow_epochs == 0 and cfg.pacing != "exponential":
        return 0
    if cfg.pacing == "exponential":
        return exponential_stages(cfg) * int(cfg.step_length_steps)
    return math.ceil(cfg.grow_epochs * spe)


def pacing_window(step: Array, cfg: PacingConfig) -> tuple[jax.Array, jax.Array]:
    """Window of the ordering available at `step`, as fractions (lo, hi) with 0 <= lo < hi <= 1.

    Args: step: global step (int or traced int scalar); cfg: validated PacingConfig.
    Returns: (lo, hi) float32 scalars; hi is non-decreasing in step for every pacing except the window of
      one_pass (whose hi also never decreases, but lo moves up too); hi reaches 1 at `full_set_step`.
    """
    kind = cfg.pacing
    l0 = jnp.float32(cfg.start_fraction)
    zero, one = jnp.float32(0.0), jnp.float32(1.0)
    if kind == "none":
        return zero, one
    if kind == "exponential":
        stage = jnp.asarray(step, jnp.int32) // jnp.int32(cfg.step_length_steps)
        return zero, jnp.minimum(one, l0 * jnp.power(jnp.float32(cfg.inc), stage.astype(jnp.float32)))
    if cfg.grow_epochs == 0:
        return zero, one
    frac = jnp.clip(epochs_of(step, cfg.steps_per_epoch) / jnp.float32(cfg.grow_epochs), 0.0, 1.0)
    k = int(cfg.n_buckets)
    if kind == "linear":
        hi = l0 + (1.0 - l0) * frac
    elif kind in ("root", "root_p"):
        p = jnp.float32(2.0 if kind == "root" else cfg.p)
        hi = jnp.power(jnp.power(l0, p) + (1.0 - jnp.power(l0, p)) * frac, 1.0 / p)
    elif kind == "geometric":
        hi = jnp.exp2(jnp.log2(l0) * (1.0 - frac))
    elif kind == "single_step":
        hi = jnp.where(frac < 1.0, l0, one)
    elif kind == "baby_step":
        if k == 1:
            return zero, one
        stage = jnp.minimum(jnp.floor(frac * (k - 1)), k - 1)
        hi = (stage + 1.0) / k
    elif kind == "one_pass":
        stage = jnp.floor(frac * k)
        done = stage >= k
        lo = jnp.where(done, zero, stage / k)
        hi = jnp.where(done, one, (stage + 1.0) / k)
        return lo.astype(jnp.float32), hi.astype(jnp.float32)
    else:  # pragma: no cover - validated before
        raise ValueError(kind)
    return zero, jnp.minimum(one, jnp.where(frac >= 1.0, one, hi)).astype(jnp.float32)


def select_window(ranks: Array, n_ranked: Array, lo: Array, hi: Array, k_min: int) -> jax.Array:
    """Hard selection of the ranks inside the pacing window, uniform over the members (Hacohen & Weinshall 2019).

    n_hi = clip(max(k_min, ceil(hi * n)), 1, n), n_lo = clip(floor(lo * n), 0, n_hi - min(k_min, n));
    w_i = 1[n_lo <= r_i < n_hi] / (n_hi - n_lo). So at least min(k_min, n) cases are always selected
    (curriculum rule 1, docs/curricula.md) and ranks of ineligible cases (sentinel >= n) are never selected.

    Args:
      ranks: int32 (N,) ranks (0 = easiest); n_ranked: int scalar n >= 0 of ranked cases;
      lo, hi: float window fractions from `pacing_window`; k_min: static minimum number of members.
    Returns: float32 (N,) weights summing to 1 over the members (all zero when n == 0).
    """
    n = jnp.asarray(n_ranked, jnp.int32)
    nf = n.astype(jnp.float32)
    kmin = jnp.minimum(jnp.int32(max(1, k_min)), n)
    # The 1e-4 guards against float round-off such as 0.3 * 10 = 3.0000001 -> ceil 4.
    n_hi = jnp.ceil(jnp.asarray(hi, jnp.float32) * nf - 1e-4).astype(jnp.int32)
    n_hi = jnp.clip(jnp.maximum(n_hi, kmin), 0, n)
    n_lo = jnp.floor(jnp.asarray(lo, jnp.float32) * nf + 1e-4).astype(jnp.int32)
    n_lo = jnp.clip(n_lo, 0, jnp.maximum(n_hi - kmin, 0))
    r = jnp.asarray(ranks, jnp.int32)
    member = (r >= n_lo) & (r < n_hi)
    count = jnp.maximum(n_hi - n_lo, 1).astype(jnp.float32)
    return jnp.where(member, 1.0 / count, 0.0).astype(jnp.float32)
