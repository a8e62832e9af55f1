"""Self-paced learning (Kumar et al. 2010) with hard and soft regularisers, and self-paced with diversity.

How it fits: the state holds a per-case loss table, filled by ``update`` from the per-case losses the
training loop observes on each batch (`Observation.indices`, `Observation.losses`): the *supervised* loss
(Dice + CE of the full-resolution head, no Mumford-Shah term, whose size follows the CT content rather than
the lesion) of *lesion-centred* crops only (a lesion-free crop is predicted well by predicting nothing and
would look easy), kept per case as an exponential moving average over the crops seen (``loss_ema``), since
one random crop is a noisy sample of a whole case. Lesion-free cases never get a loss: they are sampled at a
fixed proportion outside the selection (``stratify_negatives``, `clips_jax.curricula.core.stratify`).
``weights`` computes the
closed-form optimal v*(l; lambda) of the chosen regulariser (Kumar, Packer & Koller 2010; Jiang et al. 2014) and
uses it as the sampling distribution w_i = v*_i / sum_j v*_j (curriculum rule 4 of docs/curricula.md: sampling,
not loss re-weighting; `spl_weights` is public so a trainer could use v* as loss weights instead). The "age"
lambda grows either geometrically,
lambda(t) = lambda0 * mu^floor(e / E), or as the quantile of the current losses at q(t) from a pacing
function ("quantile" mode, scale-free: the losses shrink during training, the quantile follows them).

Closed forms (l >= 0 the case loss; see `spl_weights`):
  hard        v = 1[l < lambda]                                   g = -lambda sum v
  linear      v = max(0, 1 - l / lambda)                          g = lambda sum(v^2 / 2 - v)
  log         v = log(l + z) / log z if l < lambda else 0,        g = sum(z v - z^v / log z), z = 1 - lambda,
              0 < lambda < 1 (lambda is clipped into (0, 1): meant for losses in [0, 1) such as Dice loss)
  mixture     v = 1 if l <= lambda'; 0 if l >= lambda; z/l - z/lambda otherwise,
              g = -z sum log(v + z / lambda), lambda' = mixture_ratio * lambda, z = lambda lambda'/(lambda - lambda')
  polynomial  v = (1 - l / lambda)^(1 / (t - 1)) if l < lambda else 0,   g = lambda (sum v^t / t - sum v)
Self-paced with diversity (Jiang et al. 2014, hard regulariser): within each group, sort by loss; the case
of within-group rank r (1-based) is selected iff l < lambda + gamma / (sqrt(r) + sqrt(r - 1)).

Cases whose loss has not been observed yet (NaN) get weight `unseen_weight` (default 1: every case is
visited before the curriculum can exclude it). If nothing is selected, the k_min cases of lowest loss are
used (curriculum rule 1, docs/curricula.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from clips_jax.curricula.core import (
    Array,
    CaseTable,
    Curriculum,
    Observation,
    State,
    check,
    negative_setup,
    stratify,
    whole_epochs_of,
    zero_sigma,
)
from clips_jax.curricula.pacing import PacingConfig, pacing_window

REGULARIZERS = ("hard", "linear", "log", "mixture", "polynomial")
LAMBDA_MODES = ("quantile", "geometric")


def spl_weights(
    losses: Array, lam: Array, regularizer: str = "hard", mixture_ratio: float = 0.5, poly_order: float = 3.0
) -> jax.Array:
    """Closed-form self-paced weights v*(l; lambda) in [0, 1] (see the module docstring for the formulas).

    Args:
      losses: float (N,) case losses (negative values are clipped to 0; NaN gives NaN).
      lam: scalar lambda > 0 (may be +inf: every finite loss selected with weight 1, except for "log").
      regularizer: one of `REGULARIZERS` (static). mixture_ratio: lambda'/lambda in (0, 1) for "mixture".
      poly_order: t > 1 for "polynomial" (t = 2 is "linear").
    Returns: float32 (N,) v*.
    """
    loss = jnp.maximum(jnp.asarray(losses, jnp.float32), 0.0)
    lam = jnp.asarray(lam, jnp.float32)
    if regularizer == "hard":
        v = (loss < lam).astype(jnp.float32)
    elif regularizer == "linear":
        v = jnp.maximum(0.0, 1.0 - loss / lam)
    elif regularizer == "log":
        lam_c = jnp.clip(lam, 1e-6, 1.0 - 1e-6)
        zeta = 1.0 - lam_c
        v = jnp.where(loss < lam_c, jnp.log(loss + zeta) / jnp.log(zeta), 0.0)
    elif regularizer == "mixture":
        lam_p = jnp.float32(mixture_ratio) * lam
        zeta = lam * lam_p / (lam - lam_p)
        mid = zeta / jnp.where(loss > 0, loss, 1.0) - zeta / lam
        v = jnp.where(loss <= lam_p, 1.0, jnp.where(loss >= lam, 0.0, mid))
    elif regularizer == "polynomial":
        base = jnp.maximum(1.0 - loss / lam, 0.0)
        v = jnp.where(loss < lam, jnp.power(base, 1.0 / (jnp.float32(poly_order) - 1.0)), 0.0)
    else:
        raise ValueError(f"unknown regularizer {regularizer!r}; use one of {REGULARIZERS}")
    return jnp.where(jnp.isnan(loss), jnp.nan, jnp.clip(v, 0.0, 1.0)).astype(jnp.float32)


def within_group_rank(losses: Array, groups: Array, valid: Array) -> jax.Array:
    """1-based rank of each case's loss within its group, counting only valid cases (ties by case index).

    Args: losses float (N,); groups int (N,); valid bool (N,).
    Returns: int32 (N,) rank r_i = 1 + #{j valid, same group, l_j < l_i or (l_j == l_i and j < i)}
      (meaningful for valid i only). O(N^2) memory/time: fine for N up to a few thousand cases.
    """
    loss = jnp.asarray(losses, jnp.float32)
    g = jnp.asarray(groups)
    n = loss.shape[0]
    idx = jnp.arange(n)
    before = (loss[None, :] < loss[:, None]) | ((loss[None, :] == loss[:, None]) & (idx[None, :] < idx[:, None]))
    same = (g[None, :] == g[:, None]) & jnp.asarray(valid, bool)[None, :]
    return (1 + jnp.sum(before & same, axis=1)).astype(jnp.int32)


def spld_select(losses: Array, groups: Array, valid: Array, lam: Array, gamma: Array) -> jax.Array:
    """Self-paced-with-diversity selection: l_i < lam + gamma / (sqrt(r_i) + sqrt(r_i - 1)), r_i within-group rank.

    Args: losses float (N,); groups int (N,); valid bool (N,) (invalid cases are never selected);
      lam, gamma: float scalars.
    Returns: bool (N,) selection v*.
    """
    r = within_group_rank(losses, groups, valid).astype(jnp.float32)
    thr = jnp.asarray(lam, jnp.float32) + jnp.asarray(gamma, jnp.float32) / (jnp.sqrt(r) + jnp.sqrt(r - 1.0))
    return jnp.asarray(valid, bool) & (jnp.asarray(losses, jnp.float32) < thr)


@dataclasses.dataclass(frozen=True)
class SelfPacedConfig(PacingConfig):
    """Options of self-paced learning (inherits the pacing options used by "quantile" mode).

    Attributes:
      regularizer: one of `REGULARIZERS`. Default "hard" (Kumar et al. 2010).
      lambda_mode: "quantile" (lambda = quantile of the current losses at q(t) = hi(t) of the pacing; default)
        or "geometric" (lambda = lambda0 * mu^floor(e / every_epochs)).
      pacing / start_fraction: defaults "linear" / 0.5 here (about half the cases selected at first, as
        Kumar et al. recommend); grow_epochs etc. as in `PacingConfig`.
      lambda0: initial lambda of "geometric" mode, in loss units. Default 1.0.
      mu: growth factor of lambda (> 1 to grow). Default 1.3 (Kumar et al.).
      every_epochs: E, epochs between lambda (and gamma) growth steps (>= 1). Default 1.
      mixture_ratio: lambda'/lambda of the mixture regulariser, in (0, 1). Default 0.5.
      poly_order: t of the polynomial regulariser (> 1). Default 3.0.
      diversity_gamma: gamma0 of self-paced learning with diversity (requires regularizer "hard"); 0 = off
        (default). Groups come from `CaseTable.groups` (or has_lesion when the table has none).
      gamma_growth: gamma(t) = gamma0 * gamma_growth^floor(e / every_epochs). Default 1.1.
      unseen_weight: weight v of cases whose loss was never observed (NaN). Default 1.0.
      k_min: fallback size (curriculum rule 1, docs/curricula.md), set >= batch size. Default 8.
      loss_ema: weight of the previous value in the per-case moving average of the observed losses,
        l <- loss_ema * l + (1 - loss_ema) * observed (the first observation is taken as is), in [0, 1).
        Default 0.5.
      stratify_negatives: sample lesion-free cases outside the self-paced selection (they never get a loss:
        only lesion-centred crops are observed). Default True. neg_fraction: as in `PredefinedConfig`.
    """

    pacing: str = "linear"
    start_fraction: float = 0.5
    regularizer: str = "hard"
    lambda_mode: str = "quantile"
    lambda0: float = 1.0
    mu: float = 1.3
    every_epochs: int = 1
    mixture_ratio: float = 0.5
    poly_order: float = 3.0
    diversity_gamma: float = 0.0
    gamma_growth: float = 1.1
    unseen_weight: float = 1.0
    k_min: int = 8
    loss_ema: float = 0.5
    stratify_negatives: bool = True
    neg_fraction: float | None = None

    def validate(self) -> None:
        """Raise ConfigError for an invalid option."""
        self.validate_pacing()
        check(self.regularizer in REGULARIZERS, f"unknown regularizer {self.regularizer!r}; use {REGULARIZERS}")
        check(self.lambda_mode in LAMBDA_MODES, f"unknown lambda_mode {self.lambda_mode!r}; use {LAMBDA_MODES}")
        check(self.lambda0 > 0, "lambda0 must be > 0")
        check(self.mu > 0, "mu must be > 0")
        check(int(self.every_epochs) >= 1, "every_epochs must be >= 1")
        check(0.0 < self.mixture_ratio < 1.0, "mixture_ratio must be in (0, 1)")
        check(self.poly_order > 1.0, "poly_order must be > 1")
        check(self.diversity_gamma >= 0, "diversity_gamma must be >= 0")
        check(
            self.diversity_gamma == 0 or self.regularizer == "hard",
            "diversity_gamma > 0 (self-paced with diversity) needs regularizer='hard'",
        )
        check(self.gamma_growth > 0, "gamma_growth must be > 0")
        check(self.unseen_weight >= 0, "unseen_weight must be >= 0")
        check(int(self.k_min) >= 1, "k_min must be >= 1")
        check(0.0 <= self.loss_ema < 1.0, "loss_ema must be in [0, 1)")
        check(self.neg_fraction is None or 0.0 <= self.neg_fraction <= 1.0, "neg_fraction must be in [0, 1]")


def _lowest_k(losses: Array, valid: Array, k: int) -> jax.Array:
    """bool (N,): the k valid cases of lowest loss (NaN last, ties by index)."""
    loss = jnp.asarray(losses, jnp.float32)
    key = jnp.where(valid, jnp.where(jnp.isnan(loss), jnp.inf, loss), jnp.inf)
    tier = jnp.where(valid, jnp.where(jnp.isnan(loss), 1, 0), 2)
    order = jnp.lexsort((jnp.arange(loss.shape[0]), key, tier))
    rank = jnp.zeros(loss.shape[0], jnp.int32).at[order].set(jnp.arange(loss.shape[0], dtype=jnp.int32))
    return valid & (rank < k)


def self_paced_lambda(state: State, step: Array, cfg: SelfPacedConfig) -> jax.Array:
    """lambda(t) of the config's mode (float32 scalar; +inf in quantile mode once q(t) reaches 1)."""
    epochs = whole_epochs_of(step, cfg.steps_per_epoch)
    if cfg.lambda_mode == "geometric":
        return jnp.float32(cfg.lambda0) * jnp.power(
            jnp.float32(cfg.mu), (epochs // cfg.every_epochs).astype(jnp.float32)
        )
    _, q = pacing_window(step, cfg)
    valid = ~state["is_negative"]
    loss = jnp.where(valid, state["losses"], jnp.nan)
    quant = jnp.nanquantile(loss, jnp.clip(q, 0.0, 1.0))
    return jnp.where(q >= 1.0, jnp.inf, quant).astype(jnp.float32)


def self_paced_curriculum(cfg: SelfPacedConfig, name: str = "self_paced") -> Curriculum:
    """Self-paced learning as a `Curriculum`.

    State: {"losses": float32 (N,) moving average of the observed losses (NaN = unseen), "groups": int32 (N,),
    "is_negative": bool (N,), "neg_fraction": float32}. ``update`` folds the finite observed losses of
    in-range indices into the moving average (duplicate indices in one batch: one of them wins). The
    curriculum declares ``needs_losses`` (the loop must sample lesion-centred crops). Raises ConfigError for
    invalid options.
    """
    cfg.validate()

    def init(case_table: CaseTable) -> State:
        neg, q = negative_setup(case_table, cfg.stratify_negatives, cfg.neg_fraction)
        groups = case_table.groups if case_table.groups is not None else case_table.has_lesion
        return {
            "losses": np.full(case_table.n, np.nan, np.float32),
            "groups": np.asarray(groups, np.int32),
            "is_negative": neg,
            "neg_fraction": q,
        }

    def weights(state: State, step: Array) -> jax.Array:
        loss = state["losses"]
        valid = ~state["is_negative"]
        seen = jnp.isfinite(loss)
        lam = self_paced_lambda(state, step, cfg)
        if cfg.diversity_gamma > 0:
            epochs = whole_epochs_of(step, cfg.steps_per_epoch)
            gamma = jnp.float32(cfg.diversity_gamma) * jnp.power(
                jnp.float32(cfg.gamma_growth), (epochs // cfg.every_epochs).astype(jnp.float32)
            )
            v = spld_select(loss, state["groups"], valid & seen, lam, gamma).astype(jnp.float32)
        else:
            v = spl_weights(loss, lam, cfg.regularizer, cfg.mixture_ratio, cfg.poly_order)
        v = jnp.where(seen, v, jnp.float32(cfg.unseen_weight))
        v = jnp.where(valid & jnp.isfinite(v), v, 0.0)
        fallback = _lowest_k(loss, valid, cfg.k_min).astype(jnp.float32)
        v = jnp.where(jnp.sum(v) > 0, v, fallback)
        return stratify(v, state["is_negative"], state["neg_fraction"])

    def update(state: State, obs: Observation) -> State:
        n = state["losses"].shape[0]
        idx = jnp.asarray(obs.indices, jnp.int32).reshape(-1)
        loss = jnp.asarray(obs.losses, jnp.float32).reshape(-1)
        ok = jnp.isfinite(loss) & (idx >= 0) & (idx < n)
        old = jnp.asarray(state["losses"])[jnp.clip(idx, 0, n - 1)]
        mixed = jnp.where(jnp.isfinite(old), cfg.loss_ema * old + (1.0 - cfg.loss_ema) * loss, loss)
        table = jnp.asarray(state["losses"]).at[jnp.where(ok, idx, n)].set(mixed, mode="drop")
        return {**state, "losses": table}

    return Curriculum(name, cfg, init, weights, update, zero_sigma, needs_losses=True)
