"""Named curricula: `get_curriculum(name, **options)` and the `PRESETS` table.

How it fits: configs name a curriculum by preset (or family) plus option overrides, e.g.
``get_curriculum("predefined_tmtv_root", steps_per_epoch=250, grow_epochs=100, k_min=4)``; the result is a
`Curriculum` whose functions close over a frozen config dataclass. Every option, its default and meaning
is documented on the family's config class (`UniformConfig`, `PredefinedConfig` + `PacingConfig`,
`SelfPacedConfig`, `Exp3SConfig`) and in docs/curricula.md. Curriculum-by-smoothing composes with any
family through the options ``smoothing=True, sigma0=1.0, sigma_decay=0.9, sigma_every_epochs=5``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clips_jax.curricula.bandit import Exp3SConfig, exp3s_curriculum
from clips_jax.curricula.core import Curriculum
from clips_jax.curricula.predefined import PredefinedConfig, UniformConfig, predefined_curriculum, uniform_curriculum
from clips_jax.curricula.self_paced import SelfPacedConfig, self_paced_curriculum
from clips_jax.curricula.smoothing import SmoothingConfig, with_smoothing
from clips_jax.errors import ConfigError

FAMILIES: dict[str, tuple[type, Any]] = {
    "uniform": (UniformConfig, uniform_curriculum),
    "predefined": (PredefinedConfig, predefined_curriculum),
    "self_paced": (SelfPacedConfig, self_paced_curriculum),
    "exp3s": (Exp3SConfig, exp3s_curriculum),
}

#: Preset name -> {"family": ..., option: value}. Options not listed take the config-class defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"family": "uniform"},
    "random": {"family": "predefined", "order": "random", "pacing": "root"},
    "anti": {"family": "predefined", "order": "anti", "measure": "composite", "pacing": "root"},
    "predefined_composite_root": {"family": "predefined", "measure": "composite", "pacing": "root"},
    "predefined_tmtv_root": {"family": "predefined", "measure": "tmtv_ml", "pacing": "root"},
    "predefined_hacohen": {
        "family": "predefined",
        "measure": "composite",
        "pacing": "exponential",
        "start_fraction": 0.04,
        "inc": 1.9,
        "step_length_steps": 100,
    },
    "baby_step": {"family": "predefined", "measure": "composite", "pacing": "baby_step", "n_buckets": 5},
    "one_pass": {"family": "predefined", "measure": "composite", "pacing": "one_pass", "n_buckets": 5},
    "transfer_teacher": {"family": "predefined", "measure": "teacher_loss", "pacing": "root"},
    "self_paced_hard": {"family": "self_paced", "regularizer": "hard"},
    "self_paced_linear": {"family": "self_paced", "regularizer": "linear"},
    "self_paced_mixture": {"family": "self_paced", "regularizer": "mixture"},
    "self_paced_diversity": {"family": "self_paced", "regularizer": "hard", "diversity_gamma": 0.1},
    "exp3s": {"family": "exp3s"},
    "cbs": {"family": "uniform", "smoothing": True},
    # A deliberately harmful curriculum (the positive control of a comparison): the easiest two thirds of the
    # ordering (composite difficulty) for the whole run, i.e. the hardest third of the lesion cases is never
    # sampled (single_step pacing whose step never comes).
    "never_hardest_third": {
        "family": "predefined",
        "measure": "composite",
        "pacing": "single_step",
        "start_fraction": 2.0 / 3.0,
        "grow_epochs": 1e12,
    },
}

#: Options handled by the smoothing wrapper rather than the family config (name -> SmoothingConfig field).
SMOOTHING_OPTIONS = {"sigma0": "sigma0", "sigma_decay": "decay", "sigma_every_epochs": "every_epochs"}


def get_curriculum(name: str, **options: Any) -> Curriculum:
    """Build a curriculum from a preset or family name plus option overrides.

    Args:
      name: a key of `PRESETS` or of `FAMILIES`.
      **options: fields of the family's config class (override the preset's), plus ``smoothing`` (bool,
        default False except for "cbs") and the CBS options sigma0 (1.0), sigma_decay (0.9),
        sigma_every_epochs (5). ``steps_per_epoch`` is required by every curriculum whose weights or sigma
        change with the step.
    Returns: a `Curriculum` named `name`.
    Raises: ConfigError for an unknown name, an unknown option (listing the valid ones) or an invalid value.
    """
    if name in PRESETS:
        merged = {**PRESETS[name], **options}
    elif name in FAMILIES:
        merged = {"family": name, **options}
    else:
        raise ConfigError(f"unknown curriculum {name!r}; use a preset {sorted(PRESETS)} or a family {sorted(FAMILIES)}")
    family = merged.pop("family")
    smoothing = bool(merged.pop("smoothing", False))
    smooth_kwargs = {SMOOTHING_OPTIONS[k]: merged.pop(k) for k in list(merged) if k in SMOOTHING_OPTIONS}
    if smooth_kwargs and not smoothing:
        raise ConfigError(f"curriculum {name!r}: {sorted(smooth_kwargs)} given without smoothing=True")
    cfg_cls, build = FAMILIES[family]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ConfigError(f"curriculum {name!r} ({family}): unknown option(s) {unknown}; valid: {sorted(fields)}")
    try:
        cfg = cfg_cls(**merged)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"curriculum {name!r}: {exc}") from exc
    curriculum = build(cfg, name=name)
    if smoothing:
        curriculum = with_smoothing(
            curriculum, SmoothingConfig(steps_per_epoch=merged.get("steps_per_epoch"), **smooth_kwargs)
        )
    return curriculum


def options_from_config(config) -> dict:
    """Options for `get_curriculum` from a training config (an ml_collections ConfigDict with `curriculum`
    and `data.batch_size`): its `curriculum.options` plus `steps_per_epoch`, and,
    for families with a minimum selection size, `k_min` = the batch size unless given (curriculum rule 1 of
    docs/curricula.md, "k_min >= batch size"; the family default of 8 would select every case of a small dataset
    from the start)."""
    opts = dict(
        config.curriculum.options.to_dict()
        if hasattr(config.curriculum.options, "to_dict")
        else config.curriculum.options
    )
    opts.setdefault("steps_per_epoch", int(config.curriculum.steps_per_epoch))
    name = config.curriculum.name
    family = PRESETS.get(name, {}).get("family", name)
    if family in FAMILIES:
        fields = {f.name for f in dataclasses.fields(FAMILIES[family][0])}
        if "k_min" in fields:
            opts.setdefault("k_min", int(config.data.batch_size))
    return opts
