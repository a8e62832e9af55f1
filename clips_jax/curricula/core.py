"""Shared types and helpers of every curriculum: case table, observation, the `Curriculum` protocol.

How it fits: the case store (``clips_jax.data``) writes a manifest with per-case difficulty facts;
`case_table_from_manifest` turns the rows of the training split into a `CaseTable` of NumPy arrays. A
`Curriculum` (built by `clips_jax.curricula.get_curriculum`) turns that table into a state pytree once
(``init``, NumPy, not traced), and the training loop then calls the pure, ``jax.jit``-compatible functions

    w     = curriculum.weights(state, step)       # at each stage start: (N,) float32 sampling distribution
    sigma = curriculum.sigma(state, step)         # every step: curriculum-by-smoothing sigma, float32 scalar
    state = curriculum.update(state, observation) # after every step (per-case losses, prediction gain)
    state = curriculum.end_stage(state)           # when a sampling stage ends (stage-wise learners)

A stage's batches are drawn from its ``w``. Steps are *global optimisation steps*; every curriculum that
works in epochs converts with an explicit ``steps_per_epoch`` config value. The loop never tests config
classes: a curriculum *declares* what it needs (`Curriculum.needs_losses`, `needs_gain`, `smooths`) and how
often it learns (`update_every`), and the loop provides exactly that (docs/curricula.md, "The protocol").

Difficulty convention: each manifest measure has a direction ("harder when larger/smaller", see
`HARDER_WHEN`); `oriented_difficulty` flips signs so that larger always means harder. Lesion-free
(negative) cases have NaN lesion measures; curricula sample them at a fixed proportion outside the
ordering (`stratify_negatives`, curriculum rule 3 of docs/curricula.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clips_jax.errors import ConfigError, DataError

Array = Any  # a jax.Array or np.ndarray
State = dict[str, Any]  # a flat dict of arrays: a pytree orbax can checkpoint as is

#: Manifest difficulty keys and the direction in which a case is *harder* (+1: larger is harder,
#: -1: smaller is harder); docs/curricula.md, "Case table and difficulty measures". TMTV "smaller is harder"
#: because small lesions dominate Dice errors (choose the other sign via a custom measure if the target is TMTV
#: error).
HARDER_WHEN: dict[str, int] = {
    "tmtv_ml": -1,  # total metabolic tumour volume (ml): smaller is harder
    "n_lesions": +1,  # number of 18-connected lesions: more is harder
    "smallest_lesion_ml": -1,  # smallest lesion volume (ml): smaller is harder
    "suv_max": -1,  # SUVmax inside the ground truth: lower is harder
    "tbr": -1,  # tumour-to-background ratio: lower is harder
    "dmax_mm": +1,  # dissemination (largest lesion distance, mm): larger is harder
    "teacher_loss": +1,  # loss of a pretrained teacher on the case: higher is harder
    "composite": +1,  # mean rank percentile of the oriented measures: higher is harder
}

#: Measures that enter the composite by default (teacher_loss only when present, see `composite_difficulty`).
LESION_KEYS: tuple[str, ...] = ("tmtv_ml", "n_lesions", "smallest_lesion_ml", "suv_max", "tbr", "dmax_mm")


class CaseTable(NamedTuple):
    """Static per-case facts of the N training cases (NumPy arrays, built once from the manifest).

    Attributes:
      difficulty: measure name -> float64 (N,) raw values in manifest units; NaN where undefined
        (e.g. lesion measures of lesion-free cases). Always contains "composite".
      has_lesion: bool (N,), True for cases with at least one ground-truth lesion voxel.
      groups: optional int32 (N,) group label per case (centre, scanner, subtype...), used by the
        self-paced-with-diversity rule; None when no grouping is given.
    """

    difficulty: dict[str, np.ndarray]
    has_lesion: np.ndarray
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of cases N."""
        return int(self.has_lesion.shape[0])


class Observation(NamedTuple):
    """What the trainer reports to ``curriculum.update`` after one optimisation step.

    Attributes:
      indices: int32 (B,) case indices of the batch just trained on (entries outside [0, N) are ignored,
        so a padded batch may use -1).
      losses: float32 (B,) per-case loss of those cases (NaN = not measured, ignored).
      reward: float32 scalar raw learning progress for the bandit (e.g. prediction gain
        L(x; theta) - L(x; theta')); NaN = none (the bandit then skips the update).
      step: int32 scalar global step at which the batch was drawn.
    """

    indices: Array
    losses: Array
    reward: Array
    step: Array


def make_observation(
    indices: Array, losses: Array | None = None, reward: float | Array = float("nan"), step: int | Array = 0
) -> Observation:
    """Build an `Observation` with the dtypes every curriculum expects.

    Args:
      indices: (B,) integer case indices. losses: (B,) per-case losses or None (all NaN).
      reward: scalar raw bandit reward (NaN = none). step: global step (int).
    Returns: Observation(indices int32 (B,), losses float32 (B,), reward float32 (), step int32 ()).
    """
    idx = jnp.asarray(indices, dtype=jnp.int32).reshape(-1)
    if losses is None:
        loss = jnp.full(idx.shape, jnp.nan, dtype=jnp.float32)
    else:
        loss = jnp.asarray(losses, dtype=jnp.float32).reshape(-1)
    return Observation(idx, loss, jnp.asarray(reward, dtype=jnp.float32), jnp.asarray(step, dtype=jnp.int32))


def observation_from_step(positions, centred, finite, supervised, gain, step) -> Observation:
    """What a curriculum learns from one training step of the global batch: the one rule both training loops
    (host and device) use (jit-compatible; host arrays work too).

    Args: positions: int (B,) training-case positions of the batch; centred: bool (B,) lesion-centred crops;
      finite: bool scalar, the update was applied; supervised: float (B,) supervised losses
      (`clips_jax.trainer.supervised_loss`); gain: float (B,) per-sample prediction gains, or None when not
      measured; step: the step the batch was drawn at.
    Returns: `Observation` with losses = the supervised loss of lesion-centred crops (NaN for the others and
      for a skipped, non-finite step) and reward = the mean prediction gain over the lesion-centred crops
      (NaN when there is none, no gain was measured, or the step was skipped).
    """
    ok = jnp.asarray(centred, bool) & jnp.asarray(finite, bool)
    losses_ = jnp.where(ok, jnp.asarray(supervised, jnp.float32), jnp.nan)
    reward = jnp.float32(jnp.nan)
    if gain is not None:
        n = jnp.sum(ok)
        reward = jnp.where(
            n > 0, jnp.sum(jnp.where(ok, jnp.asarray(gain, jnp.float32), 0.0)) / jnp.maximum(n, 1), jnp.nan
        )
    return make_observation(positions, losses_, reward, step)


class Curriculum(NamedTuple):
    """A curriculum: one (static) config, four pure functions, and what it asks of the training loop.

    Attributes:
      name: registry name (preset or family) it was built from.
      config: the frozen dataclass of static options (plain Python values; closed over by the functions).
      init: ``init(case_table) -> State`` (NumPy work, not traced; the config is bound at construction).
      weights: ``weights(state, step) -> float32 (N,)``, >= 0, sums to 1; pure and jit-compatible. The loop
        calls it once at the start of every sampling stage (`config.curriculum.stage_steps` steps) and samples
        the whole stage from it.
      update: ``update(state, observation) -> State``; pure and jit-compatible; called after *every* step with
        that step's `Observation` (identity for static curricula; an accumulator for stage-wise ones).
      sigma: ``sigma(state, step) -> float32 ()`` curriculum-by-smoothing sigma (0.0 = no smoothing).
      end_stage: ``end_stage(state) -> State``; pure and jit-compatible; called once when a sampling stage
        ends, before the next stage's ``weights`` (identity unless `update_every == "stage"`).
      needs_losses: ``update`` reads `Observation.losses` (the per-case supervised loss of lesion-centred
        crops): the loop must sample lesion-centred crops (``data.p_foreground > 0``).
      needs_gain: ``update`` reads `Observation.reward`, the prediction gain of the step (the loop then runs
        a second forward pass after the update; Graves et al. 2017, section 3.1).
      smooths: ``sigma`` is not always 0: the model takes sigma as a traced argument.
      update_every: "step" (the state learns from every observation) or "stage" (``update`` only accumulates,
        ``end_stage`` learns once per sampling stage, e.g. one Exp3.S draw and update per stage).
    """

    name: str
    config: Any
    init: Callable[[CaseTable], State]
    weights: Callable[[State, Array], jax.Array]
    update: Callable[[State, Observation], State]
    sigma: Callable[[State, Array], jax.Array]
    end_stage: Callable[[State], State] = lambda state: state  # noqa: E731 - identity
    needs_losses: bool = False
    needs_gain: bool = False
    smooths: bool = False
    update_every: str = "step"


# ----------------------------------------------------------------------------------------------------
# Case table
# ----------------------------------------------------------------------------------------------------


def _float_or_nan(value: Any) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def composite_difficulty(difficulty: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> np.ndarray:
    """Composite difficulty: mean over measures of the oriented rank percentile (0 = easiest, 1 = hardest).

    For each measure, the finite values are ranked after orientation (`HARDER_WHEN`), ties get the average
    rank, and ranks are scaled to [0, 1] by (rank - 1) / (n_valid - 1) (a single valid value gets 0.5).
    The composite is the NaN-ignoring mean over measures; NaN where no measure is defined (e.g. negatives).

    Args:
      difficulty: measure name -> (N,) raw values (NaN = undefined).
      keys: measures to combine; default: the `LESION_KEYS` present, plus "teacher_loss" when present.
    Returns: float64 (N,) composite score in [0, 1] or NaN.
    Raises: ConfigError for an unknown measure name.
    """
    from scipy.stats import rankdata

    if keys is None:
        keys = [k for k in (*LESION_KEYS, "teacher_loss") if k in difficulty]
    n = None
    columns = []
    for key in keys:
        if key not in HARDER_WHEN or key == "composite":
            raise ConfigError(f"unknown difficulty measure {key!r} for the composite; use one of {LESION_KEYS}")
        d = np.asarray(difficulty[key], dtype=np.float64) * HARDER_WHEN[key]
        n = d.shape[0]
        pct = np.full(d.shape, np.nan)
        valid = np.isfinite(d)
        nv = int(valid.sum())
        if nv == 1:
            pct[valid] = 0.5
        elif nv > 1:
            pct[valid] = (rankdata(d[valid], method="average") - 1.0) / (nv - 1.0)
        columns.append(pct)
    if not columns:
        return np.full(0 if n is None else n, np.nan)
    stack = np.stack(columns)
    count = np.isfinite(stack).sum(0)
    total = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def case_table_from_manifest(
    manifest: Sequence[Mapping[str, Any]], ids: Sequence[str], group_key: str | None = None
) -> CaseTable:
    """Build the `CaseTable` of the training cases `ids` from case-store manifest rows.

    Each manifest row is a dict with at least "id" (str) and, when known, the difficulty keys of
    `HARDER_WHEN` (numbers; None/missing/non-numeric -> NaN) and "has_lesion" (bool). When "has_lesion" is
    missing it is derived as tmtv_ml > 0 (a case without TMTV counts as negative).

    Args:
      manifest: the manifest rows (any order, may contain cases not in `ids`).
      ids: case ids of the training split, in the order that defines case index i.
      group_key: optional manifest column holding a group label (any hashable; mapped to int32 codes in
        order of first appearance) for self-paced learning with diversity.
    Returns: CaseTable with difficulty[k] float64 (N,) for every key of `HARDER_WHEN` except "teacher_loss"
      (included only if at least one row has it), plus "composite" (`composite_difficulty` among the lesion
      cases; NaN for lesion-free cases); has_lesion bool (N,).
    Raises: DataError naming the case when an id is missing from the manifest or duplicated in `ids`.
    """
    by_id: dict[str, Mapping[str, Any]] = {}
    for row in manifest:
        if "id" not in row:
            raise DataError(f"manifest row without an 'id' field: {dict(row)!r}; rebuild the case store")
        by_id[str(row["id"])] = row
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"case ids listed twice in the split: {dup[:5]}; fix the split file")
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"case {missing[0]!r} (and {len(missing) - 1} more) not in the case-store manifest; "
            "rebuild the case store or fix the split"
        )
    rows = [by_id[i] for i in ids]
    keys = [k for k in HARDER_WHEN if k not in ("composite", "teacher_loss")]
    if any("teacher_loss" in r for r in rows):
        keys.append("teacher_loss")
    difficulty = {k: np.array([_float_or_nan(r.get(k)) for r in rows], dtype=np.float64) for k in keys}
    has = []
    for r, tmtv in zip(rows, difficulty["tmtv_ml"]):
        has.append(bool(r["has_lesion"]) if "has_lesion" in r else bool(np.isfinite(tmtv) and tmtv > 0))
    has_arr = np.asarray(has, dtype=bool)
    # Composite over lesion cases only (percentiles among positives); NaN for lesion-free cases, whose
    # lesion measures are undefined or degenerate (n_lesions = 0).
    composite = np.full(len(ids), np.nan)
    if has_arr.any():
        composite[has_arr] = composite_difficulty({k: v[has_arr] for k, v in difficulty.items()})
    difficulty["composite"] = composite
    groups = None
    if group_key is not None:
        codes: dict[Any, int] = {}
        groups = np.array([codes.setdefault(r.get(group_key), len(codes)) for r in rows], dtype=np.int32)
    return CaseTable(difficulty, has_arr, groups)


def oriented_difficulty(case_table: CaseTable, measure: str) -> np.ndarray:
    """The `measure` column of `case_table` with its sign flipped so that larger = harder (float64 (N,)).

    Raises: ConfigError when the measure is unknown or absent from the table (e.g. "teacher_loss" before
    the teacher command has filled it).
    """
    if measure not in HARDER_WHEN:
        raise ConfigError(f"unknown difficulty measure {measure!r}; use one of {sorted(HARDER_WHEN)}")
    if measure not in case_table.difficulty:
        raise ConfigError(
            f"difficulty measure {measure!r} is not in the case table; for 'teacher_loss' score the "
            "cases first: python -m clips_jax.experiments.teacher --store CACHE --weights DIR "
            "(or --run WORKDIR)"
        )
    return np.asarray(case_table.difficulty[measure], dtype=np.float64) * HARDER_WHEN[measure]


def ranks_from_scores(scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Rank the eligible cases easy -> hard by score (0 = easiest); NaN scores last; ties by case index.

    Args: scores float (N,) (larger = harder); eligible bool (N,).
    Returns: int32 (N,): ranks 0..n_eligible-1 for eligible cases, N (a sentinel beyond every n(t))
      for the others.
    """
    n = scores.shape[0]
    key = np.where(np.isfinite(scores), scores, np.inf)
    order = np.lexsort((np.arange(n), np.isnan(scores), key))  # last key is primary
    order = order[eligible[order]]
    ranks = np.full(n, n, dtype=np.int32)
    ranks[order] = np.arange(order.shape[0], dtype=np.int32)
    return ranks


# ----------------------------------------------------------------------------------------------------
# Jit-compatible helpers
# ----------------------------------------------------------------------------------------------------


def epochs_of(step: Array, steps_per_epoch: int) -> jax.Array:
    """Fractional epoch t = step / steps_per_epoch (float32 scalar; step is a global step, int or traced)."""
    return jnp.asarray(step, jnp.float32) / jnp.float32(steps_per_epoch)


def whole_epochs_of(step: Array, steps_per_epoch: int) -> jax.Array:
    """Completed epochs e = floor(step / steps_per_epoch) (int32 scalar)."""
    return jnp.asarray(step, jnp.int32) // jnp.int32(steps_per_epoch)


def finalise(w: Array) -> jax.Array:
    """Make any non-negative score vector a valid distribution: non-finite/negative -> 0, divide by the sum.

    If nothing is left (all zero or NaN) the result is uniform: a last line of defence, never reached when
    curricula apply their own k_min fallback. Returns float32 (N,) summing to 1.
    """
    w = jnp.asarray(w, jnp.float32)
    w = jnp.where(jnp.isfinite(w) & (w > 0), w, 0.0)
    s = jnp.sum(w)
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), jnp.ones_like(w) / w.shape[0])


def stratify(w_pos: Array, is_negative: Array, neg_fraction: Array) -> jax.Array:
    """Mix a distribution over positives with uniform sampling of negatives (curriculum rule 3, docs/curricula.md).

    w = (1 - q) * w_pos + q * uniform_over_negatives. With no negatives the result is w_pos; with no
    positives it is uniform over the negatives.

    Args:
      w_pos: float (N,) non-negative weights, zero on negatives (need not be normalised).
      is_negative: bool (N,) cases sampled outside the ordering (all False disables stratification).
      neg_fraction: q in [0, 1], float scalar.
    Returns: float32 (N,) distribution (sums to 1).
    """
    neg = jnp.asarray(is_negative, bool)
    n_neg = jnp.sum(neg)
    w_pos = jnp.where(neg, 0.0, finalise(jnp.where(neg, 0.0, w_pos)))
    s_pos = jnp.sum(w_pos)
    w_neg = neg.astype(jnp.float32) / jnp.maximum(n_neg, 1)
    q = jnp.asarray(neg_fraction, jnp.float32)
    mixed = jnp.where(n_neg == 0, w_pos, jnp.where(s_pos <= 0, w_neg, (1.0 - q) * w_pos + q * w_neg))
    return finalise(mixed)


def negative_setup(
    case_table: CaseTable, stratify_negatives: bool, neg_fraction: float | None
) -> tuple[np.ndarray, np.float32]:
    """State entries for `stratify`: (is_negative bool (N,), q float32).

    q defaults (neg_fraction=None) to the natural proportion of negatives, so that once the ordering covers
    every positive the sampling is exactly uniform over all cases.
    """
    neg = (~case_table.has_lesion) if stratify_negatives else np.zeros(case_table.n, bool)
    q = float(neg.mean()) if neg_fraction is None else float(neg_fraction)
    return neg.astype(bool), np.float32(q)


def zero_sigma(state: State, step: Array) -> jax.Array:
    """The sigma of a curriculum without smoothing: float32 0.0 (identity kernel)."""
    del state, step
    return jnp.float32(0.0)


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (config validation helper)."""
    if not condition:
        raise ConfigError(message)
