"""RL teacher: the Exp3.S bandit of Graves et al. (2017) over difficulty buckets.

Graves, Bellemare, Menick, Munos & Kavukcuoglu, "Automated Curriculum Learning for Neural Networks", ICML
2017 (arXiv:1704.03003), Algorithm 1: at each round the teacher draws one task (here: a difficulty bucket) from
its policy pi, the learner trains on that task, the observed learning progress is rescaled to [-1, 1] and the
task's weight gets the importance-weighted reward r / pi(task).

How it fits: ``init`` splits the (positive) cases into K equal-count buckets by rank of a difficulty measure
(quantile bins; K is reduced to the number of ranked cases when there are fewer). A bandit *round* is one
sampling stage of the training loop (`Curriculum.update_every == "stage"`):

  * stage start: ``weights(state, step)`` samples uniformly inside the drawn bucket a (``mode="bucket"``:
    Graves' one task per round, default) or the mixture pi_b / |b| over all buckets (``mode="mixture"``).
    The action a and the policy pi it was drawn from stay frozen for the whole stage;
  * every step: ``update`` only accumulates the step's learning progress (`Observation.reward`: the
    prediction gain L(x; theta) - L(x; theta') of the supervised loss on the lesion-centred crops of the
    batch) and the bucket mix of the batch;
  * stage end: ``end_stage`` makes the one update of the round with the stage's *mean* prediction gain:

  1. inserts the raw reward into the reservoir (Algorithm R: slot j ~ U{0..n}, replaced if j < M),
  2. rescales it with the 20th/80th percentiles q_lo, q_hi of the reservoir:
     r = -1 if r_hat < q_lo, +1 if r_hat > q_hi, else 2 (r_hat - q_lo)/(q_hi - q_lo) - 1 (0 when q_hi = q_lo),
  3. applies Exp3.S with alpha_t = 1/t in log-sum-exp form, with the frozen pi of the stage:
     r~_k = (r f_k + beta) / pi_k,  z_k = w_k + eta r~_k,
     w'_k = log[(1 - alpha) exp(z_k) + alpha/(K - 1) sum_{j != k} exp(z_j)],
     then subtracts max_k w'_k (pi is invariant to the shift; keeps w bounded in float32),
  4. draws the next stage's action from pi' = (1 - eps) softmax(w') + eps/K with a key carried in the state.

f_k is the fraction of the stage's (positive, in-range) cases that belong to bucket k: one-hot(a) in
"bucket" mode, the observed mix in "mixture" mode (our generalisation; it equals Graves' estimator for
single-bucket rounds). A stage without a finite reward leaves w, the reservoir and t unchanged (the action is
still redrawn). Lesion-free cases are sampled at proportion q outside the bandit (as in
`clips_jax.curricula.core.stratify`). All state, the stage accumulators included, is in the checkpointed
pytree, so a run interrupted mid-stage resumes exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from clips_jax.curricula.core import (
    HARDER_WHEN,
    Array,
    CaseTable,
    Curriculum,
    Observation,
    State,
    check,
    negative_setup,
    oriented_difficulty,
    ranks_from_scores,
    stratify,
    zero_sigma,
)

MODES = ("bucket", "mixture")


@dataclasses.dataclass(frozen=True)
class Exp3SConfig:
    """Options of the Exp3.S teacher (defaults: Graves et al. 2017 as passed in public reimplementations).

    Attributes:
      measure: difficulty column used to form the buckets. Default "composite".
      num_buckets: K quantile buckets (>= 1). Default 5.
      eta: learning rate eta. Default 1e-3.
      beta: exploration bonus beta of the reward estimate. Default 0.0.
      eps: uniform exploration eps of the policy, in [0, 1]. Default 0.05.
      reservoir_size: M raw rewards kept for the quantiles (>= 1). Default 10000.
      q_lo, q_hi: reward-rescaling percentiles as fractions. Defaults 0.2, 0.8.
      mode: "bucket" (whole batch from the drawn bucket; default) or "mixture" (pi_b / |b| per case).
      seed: seed of the action draws. Default 0.
      stratify_negatives / neg_fraction: as in `PredefinedConfig` (default True / natural proportion).
      steps_per_epoch: accepted for a uniform interface (the bandit counts updates, not epochs).
    """

    measure: str = "composite"
    num_buckets: int = 5
    eta: float = 1e-3
    beta: float = 0.0
    eps: float = 0.05
    reservoir_size: int = 10000
    q_lo: float = 0.2
    q_hi: float = 0.8
    mode: str = "bucket"
    seed: int = 0
    stratify_negatives: bool = True
    neg_fraction: float | None = None
    steps_per_epoch: int | None = None

    def validate(self) -> None:
        """Raise ConfigError for an invalid option."""
        check(self.measure in HARDER_WHEN, f"unknown measure {self.measure!r}; use one of {sorted(HARDER_WHEN)}")
        check(int(self.num_buckets) >= 1, "num_buckets must be >= 1")
        check(self.eta > 0, "eta must be > 0")
        check(0.0 <= self.eps <= 1.0, "eps must be in [0, 1]")
        check(int(self.reservoir_size) >= 1, "reservoir_size must be >= 1")
        check(0.0 <= self.q_lo < self.q_hi <= 1.0, "need 0 <= q_lo < q_hi <= 1")
        check(self.mode in MODES, f"unknown mode {self.mode!r}; use one of {MODES}")
        check(self.neg_fraction is None or 0.0 <= self.neg_fraction <= 1.0, "neg_fraction must be in [0, 1]")


def exp3s_policy(w: Array, eps: float) -> jax.Array:
    """pi = (1 - eps) softmax(w) + eps / K (float32 (K,))."""
    w = jnp.asarray(w, jnp.float32)
    return (1.0 - eps) * jax.nn.softmax(w) + eps / w.shape[0]


def exp3s_weights_update(
    w: Array, pi: Array, attribution: Array, reward: Array, t: Array, eta: float, beta: float
) -> jax.Array:
    """One Exp3.S update of the log-weights (Graves et al. 2017, "Automated curriculum learning for neural
    networks"), in log-sum-exp form, before any shift.

    Args:
      w: float (K,) log-weights; pi: float (K,) policy the batch was drawn with; attribution: float (K,)
        f_k (one-hot of the action for a single-bucket batch); reward: rescaled reward r in [-1, 1];
      t: 1-based update count (alpha = 1/t); eta, beta: static floats.
    Returns: float32 (K,) w' with w'_k = log[(1-alpha) e^{z_k} + alpha/(K-1) sum_{j!=k} e^{z_j}],
      z = w + eta (r f + beta) / pi. With K = 1, w' = z.
    """
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    z = w + eta * (jnp.asarray(reward, jnp.float32) * jnp.asarray(attribution, jnp.float32) + beta) / pi
    if k == 1:
        return z
    alpha = 1.0 / jnp.asarray(t, jnp.float32)
    others = jnp.where(jnp.eye(k, dtype=bool), -jnp.inf, z[None, :])
    lse_others = jax.nn.logsumexp(others, axis=1)
    terms = jnp.stack([jnp.log1p(-alpha) + z, jnp.log(alpha / (k - 1)) + lse_others], axis=0)
    return jax.nn.logsumexp(terms, axis=0).astype(jnp.float32)


def rescale_reward(raw: Array, reservoir: Array, q_lo: float, q_hi: float) -> jax.Array:
    """Map a raw reward to [-1, 1] with the q_lo/q_hi NaN-quantiles of the reservoir (float32 scalar).

    r = -1 below q_lo, +1 above q_hi, linear in between; 0 when the quantiles coincide (e.g. one reward).
    """
    lo = jnp.nanquantile(reservoir, q_lo)
    hi = jnp.nanquantile(reservoir, q_hi)
    span = hi - lo
    mid = 2.0 * (raw - lo) / jnp.where(span > 0, span, 1.0) - 1.0
    r = jnp.where(raw < lo, -1.0, jnp.where(raw > hi, 1.0, jnp.where(span > 0, mid, 0.0)))
    return r.astype(jnp.float32)


def reservoir_insert(reservoir: Array, count: Array, value: Array, key: Array) -> tuple[jax.Array, jax.Array]:
    """Algorithm R: store `value` as item number `count` (0-based) of a stream in a size-M reservoir.

    Slot j = count while count < M; afterwards j ~ U{0..count}, replaced only if j < M.
    Returns (reservoir', count + 1).
    """
    m = reservoir.shape[0]
    n = jnp.asarray(count, jnp.int32)
    j = jax.random.randint(key, (), 0, jnp.maximum(n, 0) + 1)
    slot = jnp.where(n < m, n, j)
    new = jnp.asarray(reservoir).at[jnp.where(slot < m, slot, m)].set(value, mode="drop")
    return new, n + 1


def exp3s_curriculum(cfg: Exp3SConfig, name: str = "exp3s") -> Curriculum:
    """The Exp3.S teacher as a stage-wise `Curriculum` (see the module docstring for the algorithm).

    State: {"w": float32 (K,), "pi": float32 (K,) policy of the current stage, "action": int32 bucket of the
    current stage, "reservoir": float32 (M,) NaN-padded, "count": int32, "t": int32 (rounds learnt from),
    "key": uint32 (2,), "gain_sum": float32, "gain_n": int32 (finite gains of the stage), "bucket_hits":
    float32 (K,) (cases of the stage per bucket), "bucket": int32 (N,) (-1 = outside the bandit),
    "bucket_size": float32 (K,), "is_negative": bool (N,), "neg_fraction": float32}.
    Raises ConfigError for invalid options.
    """
    cfg.validate()

    def draw(key: jax.Array, pi: jax.Array) -> jax.Array:
        return jax.random.choice(key, pi.shape[0], p=pi).astype(jnp.int32)

    def init(case_table: CaseTable) -> State:
        neg, q = negative_setup(case_table, cfg.stratify_negatives, cfg.neg_fraction)
        eligible = ~neg
        n_ranked = int(eligible.sum())
        ranks = ranks_from_scores(oriented_difficulty(case_table, cfg.measure), eligible)
        k = max(1, min(int(cfg.num_buckets), n_ranked))
        bucket = np.where(eligible, (ranks.astype(np.int64) * k) // max(n_ranked, 1), -1).astype(np.int32)
        size = np.bincount(bucket[bucket >= 0], minlength=k).astype(np.float32)
        w = np.zeros(k, np.float32)
        pi = np.asarray(exp3s_policy(w, cfg.eps))
        key, sub = jax.random.split(jax.random.PRNGKey(cfg.seed))
        return {
            "w": w,
            "pi": pi,
            "action": np.asarray(draw(sub, jnp.asarray(pi))),
            "key": np.asarray(key),
            "reservoir": np.full(int(cfg.reservoir_size), np.nan, np.float32),
            "count": np.int32(0),
            "t": np.int32(0),
            "gain_sum": np.float32(0.0),
            "gain_n": np.int32(0),
            "bucket_hits": np.zeros(k, np.float32),
            "bucket": bucket,
            "bucket_size": size,
            "is_negative": neg,
            "neg_fraction": q,
        }

    def weights(state: State, step: Array) -> jax.Array:
        del step
        bucket = jnp.asarray(state["bucket"])
        in_bandit = bucket >= 0
        b = jnp.maximum(bucket, 0)
        size = jnp.maximum(jnp.asarray(state["bucket_size"])[b], 1.0)
        if cfg.mode == "bucket":
            w_pos = jnp.where(in_bandit & (bucket == state["action"]), 1.0 / size, 0.0)
        else:
            w_pos = jnp.where(in_bandit, jnp.asarray(state["pi"])[b] / size, 0.0)
        return stratify(w_pos, state["is_negative"], state["neg_fraction"])

    def update(state: State, obs: Observation) -> State:
        """Accumulate one step of the stage: its finite gain and the bucket mix of its cases."""
        bucket = jnp.asarray(state["bucket"])
        n, k = bucket.shape[0], state["w"].shape[0]
        idx = jnp.asarray(obs.indices, jnp.int32).reshape(-1)
        b_obs = jnp.where((idx >= 0) & (idx < n), bucket[jnp.clip(idx, 0, n - 1)], -1)
        hits = jnp.sum(b_obs[:, None] == jnp.arange(k)[None, :], axis=0).astype(jnp.float32)
        raw = jnp.asarray(obs.reward, jnp.float32)
        ok = jnp.isfinite(raw)
        return {
            **state,
            "gain_sum": state["gain_sum"] + jnp.where(ok, raw, 0.0),
            "gain_n": state["gain_n"] + ok.astype(jnp.int32),
            "bucket_hits": state["bucket_hits"] + hits,
        }

    def end_stage(state: State) -> State:
        """The round's Exp3.S update with the stage's mean gain, then the next stage's action."""
        key, k_res, k_act = jax.random.split(jnp.asarray(state["key"]), 3)
        n_gain = jnp.asarray(state["gain_n"], jnp.int32)
        raw = jnp.where(n_gain > 0, state["gain_sum"] / jnp.maximum(n_gain, 1).astype(jnp.float32), jnp.nan)
        ok = jnp.isfinite(raw)
        hits = jnp.asarray(state["bucket_hits"], jnp.float32)
        attribution = hits / jnp.maximum(jnp.sum(hits), 1.0)
        reservoir, count = reservoir_insert(state["reservoir"], state["count"], raw, k_res)
        r = rescale_reward(raw, reservoir, cfg.q_lo, cfg.q_hi)
        t = jnp.asarray(state["t"], jnp.int32) + 1
        w_new = exp3s_weights_update(state["w"], state["pi"], attribution, r, t, cfg.eta, cfg.beta)
        w = jnp.where(ok, w_new - jnp.max(w_new), state["w"])
        pi = exp3s_policy(w, cfg.eps)
        return {
            **state,
            "w": w,
            "pi": pi,
            "action": draw(k_act, pi),
            "key": key,
            "reservoir": jnp.where(ok, reservoir, state["reservoir"]),
            "count": jnp.where(ok, count, state["count"]),
            "t": jnp.where(ok, t, state["t"]),
            "gain_sum": jnp.float32(0.0),
            "gain_n": jnp.int32(0),
            "bucket_hits": jnp.zeros_like(hits),
        }

    return Curriculum(
        name, cfg, init, weights, update, zero_sigma, end_stage=end_stage, needs_gain=True, update_every="stage"
    )
