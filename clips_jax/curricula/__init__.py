"""Curricula as pure, jit-compatible functions of (state, step).

Usage (the trainer's view)::

    from clips_jax.curricula import get_curriculum, case_table_from_manifest, make_observation
    table = case_table_from_manifest(manifest_rows, train_ids)
    cur = get_curriculum("predefined_tmtv_root", steps_per_epoch=250, grow_epochs=100)
    state = cur.init(table)                      # pytree of arrays (checkpoint it with orbax)
    w = jax.jit(cur.weights)(state, step)        # (N,) float32 distribution over cases
    idx = jax.random.choice(key, table.n, (batch,), p=w)
    ... train ...
    state = jax.jit(cur.update)(state, make_observation(idx, per_case_losses, reward, step))
    sigma = cur.sigma(state, step)               # curriculum-by-smoothing sigma for the model

Modules: core (types, case table, helpers), pacing (schedulers), predefined (uniform, predefined, anti,
random, transfer-teacher helpers), self_paced (SPL, SPLD), bandit (Exp3.S), smoothing (CBS schedule and
kernel), summary (logging and plots), registry (presets). User documentation: docs/curricula.md.
The package imports only its own modules and `clips_jax.errors` / `clips_jax.fileio` (no trainer, data, runs or
evaluation; tested in tests/test_module_rules.py); scoring cases with a teacher network, which the
transfer-teacher curriculum reads, is an experiment step: `python -m clips_jax.experiments.teacher`.
"""

from clips_jax.curricula.bandit import Exp3SConfig, exp3s_curriculum, exp3s_policy, exp3s_weights_update
from clips_jax.curricula.core import (
    HARDER_WHEN,
    CaseTable,
    Curriculum,
    Observation,
    case_table_from_manifest,
    composite_difficulty,
    make_observation,
    observation_from_step,
)
from clips_jax.curricula.pacing import (
    PACINGS,
    PacingConfig,
    exponential_stages,
    full_set_step,
    pacing_window,
    select_window,
)
from clips_jax.curricula.predefined import (
    PredefinedConfig,
    UniformConfig,
    out_of_fold_difficulty,
    predefined_curriculum,
    teacher_difficulty,
    teacher_difficulty_from_dice,
    uniform_curriculum,
)
from clips_jax.curricula.registry import FAMILIES, PRESETS, get_curriculum, options_from_config
from clips_jax.curricula.self_paced import SelfPacedConfig, self_paced_curriculum, spl_weights, spld_select
from clips_jax.curricula.smoothing import SmoothingConfig, cbs_sigma, kernel_1d, with_smoothing
from clips_jax.curricula.summary import plot_curriculum, summarise_weights

__all__ = [
    "HARDER_WHEN",
    "PACINGS",
    "PRESETS",
    "FAMILIES",
    "CaseTable",
    "Curriculum",
    "Observation",
    "PacingConfig",
    "UniformConfig",
    "PredefinedConfig",
    "SelfPacedConfig",
    "Exp3SConfig",
    "SmoothingConfig",
    "case_table_from_manifest",
    "composite_difficulty",
    "make_observation",
    "observation_from_step",
    "get_curriculum",
    "options_from_config",
    "uniform_curriculum",
    "predefined_curriculum",
    "self_paced_curriculum",
    "exp3s_curriculum",
    "with_smoothing",
    "pacing_window",
    "select_window",
    "full_set_step",
    "exponential_stages",
    "spl_weights",
    "spld_select",
    "exp3s_policy",
    "exp3s_weights_update",
    "cbs_sigma",
    "kernel_1d",
    "teacher_difficulty",
    "teacher_difficulty_from_dice",
    "out_of_fold_difficulty",
    "summarise_weights",
    "plot_curriculum",
]
