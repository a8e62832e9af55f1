"""Uniform sampling, predefined curricula (difficulty measure x pacing) and their controls.

How it fits: the ordering is computed once in ``init`` from a `CaseTable` column (a difficulty measure of
docs/curricula.md; predefined curricula as in Wang, Chen & Zhu 2022, "A survey on curriculum learning"): cases are
ranked easy -> hard by the oriented measure (`HARDER_WHEN`), or by the reverse order ("anti", Hacohen &
Weinshall control), or by a seeded random permutation ("random" control). ``weights`` then selects the
n(t) easiest (hard selection, `select_window`) with the k_min fallback, and mixes in lesion-free cases at a
fixed proportion q outside the ordering (curriculum rule 3 of docs/curricula.md). The transfer-teacher /
bootstrapping curriculum (Hacohen & Weinshall 2019, "On the power of curriculum learning in training deep
networks") is the same thing with measure "teacher_loss"; `teacher_difficulty` and friends prepare that
column.

Selection is used as a *sampling* distribution (curriculum rule 4 of docs/curricula.md: we sample, we do not
re-weight the loss).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from clips_jax.curricula.core import (
    HARDER_WHEN,
    Array,
    CaseTable,
    Curriculum,
    Observation,
    State,
    check,
    finalise,
    negative_setup,
    oriented_difficulty,
    ranks_from_scores,
    stratify,
    zero_sigma,
)
from clips_jax.curricula.pacing import PacingConfig, pacing_window, select_window
from clips_jax.errors import DataError

ORDERS = ("easy_first", "anti", "random")


# ----------------------------------------------------------------------------------------------------
# Uniform
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UniformConfig:
    """Uniform sampling over all cases (the "none" curriculum).

    Attributes:
      steps_per_epoch: accepted for a uniform interface (unused; the weights never change).
    """

    steps_per_epoch: int | None = None


def uniform_curriculum(cfg: UniformConfig | None = None, name: str = "none") -> Curriculum:
    """The no-curriculum baseline: w_i = 1/N at every step.

    State: {"uniform": float32 (N,) = 1/N}; update is the identity; sigma is 0.
    """
    cfg = cfg or UniformConfig()

    def init(case_table: CaseTable) -> State:
        return {"uniform": np.ones(case_table.n, np.float32) / case_table.n}

    def weights(state: State, step: Array) -> jax.Array:
        del step
        return finalise(state["uniform"])

    def update(state: State, obs: Observation) -> State:
        del obs
        return state

    return Curriculum(name, cfg, init, weights, update, zero_sigma)


# ----------------------------------------------------------------------------------------------------
# Predefined (difficulty x pacing), anti, random, transfer teacher
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredefinedConfig(PacingConfig):
    """Options of a predefined curriculum (inherits the pacing options of `PacingConfig`).

    Attributes:
      measure: difficulty column (a key of `HARDER_WHEN`). Default "composite".
      order: "easy_first" (curriculum), "anti" (hardest first) or "random" (seeded permutation). Default
        "easy_first".
      seed: seed of the "random" permutation. Default 0.
      k_min: minimum number of selected (ranked) cases, set it >= the batch size. Default 8.
      stratify_negatives: sample lesion-free cases outside the ordering at proportion neg_fraction. Default
        True. When False every case is ranked, NaN difficulties last (hardest).
      neg_fraction: q in [0, 1]; None (default) = the natural proportion of negatives in the table, so the
        curriculum ends at uniform sampling over all cases.
    """

    measure: str = "composite"
    order: str = "easy_first"
    seed: int = 0
    k_min: int = 8
    stratify_negatives: bool = True
    neg_fraction: float | None = None

    def validate(self) -> None:
        """Raise ConfigError for an invalid option."""
        self.validate_pacing()
        check(self.measure in HARDER_WHEN, f"unknown measure {self.measure!r}; use one of {sorted(HARDER_WHEN)}")
        check(self.order in ORDERS, f"unknown order {self.order!r}; use one of {ORDERS}")
        check(int(self.k_min) >= 1, "k_min must be >= 1")
        check(self.neg_fraction is None or 0.0 <= self.neg_fraction <= 1.0, "neg_fraction must be in [0, 1]")


def predefined_ranks(case_table: CaseTable, cfg: PredefinedConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Ranks of the ordering (NumPy, run once): (ranks int32 (N,), is_negative bool (N,), n_ranked).

    easy_first: ascending oriented difficulty; anti: the reverse; random: np.random.default_rng(seed)
    permutation of the ranked cases. Ineligible cases (stratified negatives) get the sentinel rank N.
    """
    neg, _ = negative_setup(case_table, cfg.stratify_negatives, cfg.neg_fraction)
    eligible = ~neg
    n_ranked = int(eligible.sum())
    scores = oriented_difficulty(case_table, cfg.measure)
    ranks = ranks_from_scores(scores, eligible)
    if cfg.order == "anti":
        ranks = np.where(eligible, n_ranked - 1 - ranks, ranks).astype(np.int32)
    elif cfg.order == "random" and n_ranked > 0:
        perm = np.random.default_rng(cfg.seed).permutation(n_ranked).astype(np.int32)
        ranks = np.where(eligible, perm[np.minimum(ranks, max(n_ranked - 1, 0))], ranks).astype(np.int32)
    return ranks, neg, n_ranked


def predefined_curriculum(cfg: PredefinedConfig, name: str = "predefined") -> Curriculum:
    """A predefined curriculum: fixed ordering from `cfg.measure`/`cfg.order`, paced by `cfg.pacing`.

    State: {"ranks": int32 (N,), "n_ranked": int32, "is_negative": bool (N,), "neg_fraction": float32}.
    weights(state, step) = stratify(select_window(ranks, pacing_window(step)), negatives, q).
    update is the identity (the ordering is fixed). Raises ConfigError for invalid options.
    """
    cfg.validate()

    def init(case_table: CaseTable) -> State:
        ranks, neg, n_ranked = predefined_ranks(case_table, cfg)
        _, q = negative_setup(case_table, cfg.stratify_negatives, cfg.neg_fraction)
        return {"ranks": ranks, "n_ranked": np.int32(n_ranked), "is_negative": neg, "neg_fraction": q}

    def weights(state: State, step: Array) -> jax.Array:
        lo, hi = pacing_window(step, cfg)
        w_pos = select_window(state["ranks"], state["n_ranked"], lo, hi, cfg.k_min)
        return stratify(w_pos, state["is_negative"], state["neg_fraction"])

    def update(state: State, obs: Observation) -> State:
        del obs
        return state

    return Curriculum(name, cfg, init, weights, update, zero_sigma)


# ----------------------------------------------------------------------------------------------------
# Transfer-teacher helpers (the scoring command: `python -m clips_jax.experiments.teacher`)
# ----------------------------------------------------------------------------------------------------


def teacher_difficulty(losses: Array) -> np.ndarray:
    """Validate per-case teacher losses for the "teacher_loss" manifest column (higher = harder).

    Args: losses: (N,) per-case loss of a trained teacher w.r.t. the ground truth (e.g. the combined loss
      of the TMTV-Net paper's Eq. 1, or 1 - Dice via `teacher_difficulty_from_dice`); NaN = not scored.
    Returns: float64 (N,) copy. Raises DataError for +-inf or negative losses (a broken scoring run).
    """
    d = np.array(losses, dtype=np.float64).reshape(-1)
    bad = np.isinf(d) | (d < 0)
    if bad.any():
        raise DataError(
            f"teacher losses contain {int(bad.sum())} infinite or negative values (first at case "
            f"index {int(np.argmax(bad))}); re-run the teacher scoring"
        )
    return d


def teacher_difficulty_from_dice(dice: Array) -> np.ndarray:
    """Teacher difficulty 1 - Dice (float64 (N,)); Dice must lie in [0, 1] (NaN allowed = not scored)."""
    dsc = np.array(dice, dtype=np.float64).reshape(-1)
    if np.any((dsc < 0) | (dsc > 1)):
        raise DataError("teacher Dice values must lie in [0, 1]; check the scoring output")
    return teacher_difficulty(1.0 - dsc)


def out_of_fold_difficulty(fold_scores: Array, held_out_fold: Array) -> np.ndarray:
    """Out-of-fold ("cross review") teacher difficulty: each case scored by the model that did not train on it.

    Args:
      fold_scores: (F, N) score of case i by the model of fold f (loss or 1 - Dice; higher = harder).
      held_out_fold: int (N,) the fold f in which case i was held out (-1 = never held out -> NaN).
    Returns: float64 (N,) d_i = fold_scores[held_out_fold[i], i].
    Raises: DataError when a fold index is out of range or shapes disagree.
    """
    s = np.asarray(fold_scores, dtype=np.float64)
    f = np.asarray(held_out_fold, dtype=np.int64).reshape(-1)
    if s.ndim != 2 or s.shape[1] != f.shape[0]:
        raise DataError(f"fold_scores shape {s.shape} does not match {f.shape[0]} cases; need (folds, cases)")
    if np.any(f >= s.shape[0]) or np.any(f < -1):
        raise DataError(f"held_out_fold values must be in [-1, {s.shape[0] - 1}]")
    out = np.where(f >= 0, s[np.maximum(f, 0), np.arange(f.shape[0])], np.nan)
    return teacher_difficulty(out)
