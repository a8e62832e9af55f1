"""The named experiment presets of `compare_curricula`, defined in this one place.

An *experiment* is one curriculum setting compared against the others: a curriculum preset of
`clips_jax.curricula.PRESETS` plus option overrides. The table covers every curriculum family of
docs/curricula.md: the uniform baseline, the anti and random controls, a predefined (difficulty x pacing)
curriculum, baby steps, self-paced learning, the transfer-teacher / bootstrapping curriculum (Hacohen &
Weinshall 2019; the winner of Yousefirizi, Uribe & Rahmim 2022, "Curriculum learning for improved tumor
segmentation in PET imaging"), the Exp3.S bandit and curriculum by smoothing.

Short runs need short schedules: the library defaults grow the training set over 100 epochs, which a
comparison of a few hundred steps never reaches. `curriculum_options` therefore rescales every
step-dependent schedule to the run length (`steps`): the pacing reaches the whole training set at
`GROW_FRACTION` of the run, CBS's sigma falls below 0.2 at the same point (our recommendation for long
runs, docs/curricula.md, "Curriculum by smoothing"), and seeded curricula (random order, bandit draws) take
the run's seed so that seeds differ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from clips_jax.curricula.pacing import PacingConfig, exponential_stages
from clips_jax.curricula.registry import PRESETS
from clips_jax.errors import ConfigError

#: Training steps per run of the default comparison (`--steps`). With the `default` config (24 phantoms, U-Net
#: channels (8, 16, 32, 32), 32^3 patches, batch 2) one run of 100 steps took 65 s including its two validations
#: and the test evaluation on the idle 2-core development CPU (test Dice 0.22, untrained 0.001), so the whole
#: default comparison (9 experiments x 3 seeds) takes about 30 minutes (timed end to end: 33 min 50 s,
#: docs/experiments.md).
#: 40 steps (the first default) learnt nothing.
DEFAULT_STEPS = 100

#: Validation passes (and checkpoints) per run when `--steps` sets the run length.
EVALS_PER_RUN = 2

#: Settings of the default comparison applied over the base config unless `--noexperiment_defaults` (dotted
#: config key -> value). A key also given on the command line (`--config.KEY=...`) keeps the user's value.
RUN_OVERRIDES: dict = {
    "eval.at_start": False,  # the untrained model's validation is the same for every run: skip it
    "log_every": 10,
}

#: Fraction of the run after which paced curricula sample from the whole training set.
GROW_FRACTION = 0.5

#: sigma of CBS at GROW_FRACTION of the run ("sigma < 0.2 by mid-training": docs/curricula.md, "Curriculum by
#: smoothing").
CBS_SIGMA_AT_GROW = 0.2


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row of the experiment table.

    Attributes:
      preset: a key of `clips_jax.curricula.PRESETS`.
      options: fixed option overrides (merged over the preset by `get_curriculum`).
      paced: the family has a pacing schedule rescaled to the run length (`grow_epochs`, or `step_length_steps`
        for the exponential pacing).
      seeded: the curriculum has its own `seed` option (random order, bandit draws), set to the run's seed.
      smoothing: CBS schedule rescaled to the run length.
      needs_teacher: ranks cases by `teacher_loss` (filled from the first finished baseline seed).
      seed_offset: added to the comparison's seed k for the run's `seed` (the negative control: the baseline
        again with seeds no other run uses).
      stage_rounds: the curriculum learns once per sampling stage (Exp3.S): its learning rate eta is set from
        the run's number of stages (`curriculum_options`).
      control: "" for a curriculum; "negative" or "positive" for the two controls of `--controls`.
      family: a short description for the docs and results.md.
    """

    preset: str
    options: dict = dataclasses.field(default_factory=dict)
    paced: bool = False
    seeded: bool = False
    smoothing: bool = False
    needs_teacher: bool = False
    seed_offset: int = 0
    stage_rounds: bool = False
    control: str = ""
    family: str = ""


#: Experiment name -> Experiment. The first nine are the default `--curricula`, in its order: the baseline first
#: (the transfer teacher needs a finished baseline run), then the comparison of Yousefirizi et al. 2022 (IEEE
#: NSS/MIC: bootstrapping, random, anti, self-paced), then the other families; opt-in variants follow.
EXPERIMENTS: dict[str, Experiment] = {
    "none": Experiment("none", family="baseline: uniform sampling"),
    "transfer_teacher": Experiment(
        "transfer_teacher",
        paced=True,
        needs_teacher=True,
        family="transfer teacher / bootstrapping: baseline model's soft-Dice loss",
    ),
    "random": Experiment("random", paced=True, seeded=True, family="control: random order, root pacing"),
    "anti": Experiment("anti", paced=True, family="control: hardest first (composite), root pacing"),
    "self_paced_hard": Experiment(
        "self_paced_hard", paced=True, family="self-paced (Kumar 2010), hard regulariser, quantile lambda"
    ),
    "predefined": Experiment(
        "predefined_composite_root", paced=True, family="predefined: easiest first (composite), root pacing"
    ),
    "baby_step": Experiment("baby_step", paced=True, family="predefined: composite, 5 baby-step buckets"),
    # eta: Graves et al.'s 1e-3 assumes ~1e5 rounds; set from the run's number of rounds (`exp3s_eta`).
    "exp3s": Experiment(
        "exp3s",
        seeded=True,
        stage_rounds=True,
        family="Exp3.S bandit (Graves 2017), 5 composite buckets, one round per stage, mean prediction gain",
    ),
    "cbs": Experiment("cbs", smoothing=True, family="curriculum by smoothing (Sinha 2020), uniform sampling"),
    # Variants outside the default comparison (name them with --curricula): the other curricula.PRESETS.
    # TMTV is "harder when smaller" (core.HARDER_WHEN), so easiest-first samples the LARGEST volumes first.
    "predefined_tmtv": Experiment(
        "predefined_tmtv_root", paced=True, family="predefined: largest TMTV first (small TMTV is hard), root pacing"
    ),
    "hacohen": Experiment(
        "predefined_hacohen", paced=True, family="predefined: composite, exponential pacing (Hacohen & Weinshall 2019)"
    ),
    "one_pass": Experiment("one_pass", paced=True, family="predefined: composite, 5 buckets visited once"),
    "self_paced_linear": Experiment("self_paced_linear", paced=True, family="self-paced, linear regulariser"),
    "self_paced_mixture": Experiment("self_paced_mixture", paced=True, family="self-paced, mixture regulariser"),
    "self_paced_diversity": Experiment(
        "self_paced_diversity", paced=True, family="self-paced with diversity (Jiang 2014), hard regulariser"
    ),
    # The controls of `--controls` (compare_curricula): how the comparison behaves when the truth is known.
    "control_negative": Experiment(
        "none",
        seed_offset=1000,
        control="negative",
        family="negative control: the baseline again, independent seeds (must not differ)",
    ),
    "control_positive": Experiment(
        "never_hardest_third",
        control="positive",
        family="positive control: never samples the hardest third of the "
        "training lesion cases (must be worse on hard cases)",
    ),
}

#: The experiments `--controls` adds to a comparison.
CONTROLS: tuple[str, ...] = ("control_negative", "control_positive")

#: The default `--curricula` list: one experiment per family and control (the variants above are opt-in).
DEFAULT_CURRICULA: tuple[str, ...] = (
    "none",
    "transfer_teacher",
    "random",
    "anti",
    "self_paced_hard",
    "predefined",
    "baby_step",
    "exp3s",
    "cbs",
)
BASELINE = "none"


def get_experiment(name: str) -> Experiment:
    """The `Experiment` named `name`; ConfigError listing the valid names if unknown."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; use one of {list(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    if exp.preset not in PRESETS:  # pragma: no cover - the table and the registry drifted apart
        raise ConfigError(f"experiment {name!r} names curriculum preset {exp.preset!r}, which is not in PRESETS")
    return exp


def exp3s_eta(rounds: int, num_buckets: int = 5) -> float:
    """Exp3.S learning rate for a run of `rounds` bandit rounds (sampling stages) over K = `num_buckets` arms:
    eta = sqrt(ln K / (K T)) (the horizon-tuned rate of Exp3; Auer, Cesa-Bianchi, Freund & Schapire 2002,
    SIAM J. Comput. 32:48-77, Corollary 3.2, up to its constant), at most 1. Graves et al.'s eta = 1e-3 is this
    rule's value for their ~3e5 rounds; a 100-step run of 10 stages gets 0.18."""
    k = max(2, int(num_buckets))
    return float(min(1.0, math.sqrt(math.log(k) / (k * max(1, int(rounds))))))


#: CBS's decay factor per period in Sinha et al. 2020 (and their code's default).
CBS_PAPER_DECAY = 0.9


def cbs_schedule(grow_epochs: float, sigma0: float = 1.0) -> tuple[float, int]:
    """CBS (sigma_decay, sigma_every_epochs) for sigma to fall to CBS_SIGMA_AT_GROW near epoch `grow_epochs`.

    sigma(e) = sigma0 * decay^floor(e / period) (`clips_jax.curricula.smoothing.cbs_sigma`, e in whole epochs).
    With G = floor(grow_epochs) (at least 1) and n = the number of the paper's 0.9 decays that take sigma0 to
    CBS_SIGMA_AT_GROW or below (16 from sigma0 = 1: 0.9^16 = 0.185):
      * G >= n: period p = G // n; the paper's decay 0.9 when its n-th decay (epoch n * p) comes after 80 % of
        G, else (p steps too coarse, e.g. G = 31) the decay that reaches CBS_SIGMA_AT_GROW exactly at epoch
        p * (G // p), the last period boundary by G (0.923-0.949 from sigma0 = 1);
      * G < n: a decay every epoch that reaches CBS_SIGMA_AT_GROW exactly at epoch G (faster than the paper's).
    Either way sigma > CBS_SIGMA_AT_GROW up to 80 % of G, and <= it from G on (tested: 60-40 000-step runs, 10-step
    epochs).

    Args: grow_epochs: epochs (float, > 0) by which sigma should have fallen to CBS_SIGMA_AT_GROW; sigma0: the
      initial sigma (voxels, >= 0; at or below CBS_SIGMA_AT_GROW the paper's decay every epoch is returned).
    Returns: (decay in (0, 1], period in whole epochs >= 1).
    """
    epochs = max(1, math.floor(grow_epochs))
    if sigma0 <= CBS_SIGMA_AT_GROW:  # already there: keep the paper's decay, once per epoch
        return CBS_PAPER_DECAY, 1
    needed = math.ceil(math.log(CBS_SIGMA_AT_GROW / sigma0) / math.log(CBS_PAPER_DECAY))
    if epochs < needed:
        return float((CBS_SIGMA_AT_GROW / sigma0) ** (1.0 / epochs)), 1
    period = epochs // needed
    if needed * period > 0.8 * epochs:
        return CBS_PAPER_DECAY, period
    return float((CBS_SIGMA_AT_GROW / sigma0) ** (1.0 / (epochs // period))), period


def curriculum_options(
    name: str, steps: int, steps_per_epoch: int, seed: int, stage_steps: int | None = None
) -> dict[str, Any]:
    """Option overrides of experiment `name` for a run of `steps` steps (to put in `config.curriculum.options`).

    Args:
      name: an experiment name (key of EXPERIMENTS).
      steps: total optimisation steps of the run (> 0).
      steps_per_epoch: the config's `curriculum.steps_per_epoch` (> 0).
      seed: the run's seed (used by seeded curricula).
      stage_steps: the config's `curriculum.stage_steps` (steps per sampling stage; default `steps_per_epoch`),
        which sets the number of bandit rounds of a stage-wise curriculum.
    Returns:
      dict of options: the experiment's fixed options, plus
        paced: `grow_epochs = GROW_FRACTION * steps / steps_per_epoch` (float epochs); for the exponential
          pacing (steps between stages instead of epochs) `step_length_steps` such that the last stage starts
          by GROW_FRACTION of the run;
        seeded: `seed`;
        smoothing: `sigma_decay` and `sigma_every_epochs` of `cbs_schedule(grow_epochs, sigma0)`: sigma
          reaches CBS_SIGMA_AT_GROW at about GROW_FRACTION of the run, not before;
        stage_rounds: `eta = exp3s_eta(steps // stage_steps)` unless the experiment fixes eta.
    Raises: ConfigError for an unknown name or non-positive steps / steps_per_epoch.
    """
    exp = get_experiment(name)
    if int(steps) <= 0 or int(steps_per_epoch) <= 0:
        raise ConfigError(f"experiment {name!r}: steps={steps} and steps_per_epoch={steps_per_epoch} must be > 0")
    opts: dict[str, Any] = dict(exp.options)
    grow_epochs = GROW_FRACTION * int(steps) / int(steps_per_epoch)
    if exp.paced:
        preset = {**PRESETS[exp.preset], **exp.options}
        if preset.get("pacing") == "exponential":
            pacing = PacingConfig(**{k: v for k, v in preset.items() if k in PacingConfig.__dataclass_fields__})
            stages = max(1, exponential_stages(pacing))
            opts["step_length_steps"] = max(1, math.floor(GROW_FRACTION * int(steps) / stages))
        else:
            opts["grow_epochs"] = float(grow_epochs)
    if exp.seeded:
        opts["seed"] = int(seed)
    if exp.smoothing:
        sigma0 = float({**PRESETS[exp.preset], **exp.options}.get("sigma0", 1.0))
        opts["sigma_decay"], opts["sigma_every_epochs"] = cbs_schedule(grow_epochs, sigma0)
    if exp.stage_rounds and "eta" not in opts:
        rounds = int(steps) // max(1, int(stage_steps or steps_per_epoch))
        buckets = {**PRESETS[exp.preset], **exp.options}.get("num_buckets", 5)
        opts["eta"] = exp3s_eta(rounds, buckets)
    return opts
