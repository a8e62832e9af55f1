"""The curriculum study on phantoms: a cohort and runs sized so that a comparison of curricula can answer.

    clips-compare --config curriculum_study:long --steps 0 --seeds 5 --controls --workdir runs/curriculum_study_6000

(`--steps 0` keeps this file's steps and validation periods; docs/experiments.md, "A powered, controlled
study on phantoms", has the pilot, the time it takes and where its results go.) Variants:

* "" (the default): 3000-step runs, validated every 300 steps; the longer study (2026-12-01/02,
  `docs/results/curriculum_study_3000/`; docs/experiments.md, "The longer study");
* "first": the first recorded study (2026-12-01, `docs/results/curriculum_study_2026-12/`): 1500-step runs
  validated every 150 steps, too short for cbs and self_paced_hard (below). Everything else is the same;
* "ema": the default with a moving average of the weights (`optim.ema_decay` = EMA_DECAY,
  `clips_jax.trainer.weight_average`) validated and kept as the best checkpoint instead of the last weights;
  training itself is unchanged. Piloted on two runs that had not plateaued: alone, it does not make them
  plateau (docs/experiments.md, "A weight average and longer runs");
* "long": "ema" with 6000-step runs (validated every 600 steps). In the same pilot both runs plateaued, peaking
  at step 3000-3600 and losing ground after. The config of the 6000-step study (2026-12-02/03,
  `docs/results/curriculum_study_6000/`; docs/experiments.md, "The 6000-step study"), the project's answer on
  phantoms: 53 of its 55 runs plateaued by the per-run rule below (none seed 4 and baby_step seed 1 were still
  gaining 0.012 and 0.017, a real gain on independent cases too), no curriculum differed from the baseline after
  Holm, and the positive control was detected:

      clips-compare --config curriculum_study:long --steps 0 --seeds 5 --controls \
          --workdir runs/curriculum_study_6000 --archive docs/results/curriculum_study_6000
* "long9000": "long" with 9000-step runs (validated every 900 steps), for the two runs "long" left rising: a
  study in progress (docs/experiments.md, "The 9000-step study"):

      clips-compare --config curriculum_study:long9000 --steps 0 --seeds 5 --controls \
          --workdir runs/curriculum_study_9000 --archive docs/results/curriculum_study_9000
* "stop": "long9000" validated every 300 steps (30 validations at most) and stopped at a plateau
  (`stop_at_plateau`): from step 4500, when every curriculum's pacing has reached the whole training set
  (`clips_jax.experiments.presets.GROW_FRACTION` of the 9000 steps), a run ends at the first validation at which
  the per-run rule below holds, with at least 3 validations in its last 20 % (900 steps or more). 9000 steps
  is then the most a run trains; the learning rate's cosine and the curricula's schedules still span all 9000,
  so a stopped run trained as the first part of a "long9000" run of its seed did (except transfer_teacher, whose
  teacher checkpoint other validations can change; docs/experiments.md, "Runs that stop at a plateau"). Why: in
  fixed-length runs the rule failed for a few runs of every study (longer runs did not fix it: "long9000"), and
  a run that is still gaining should go on while one that has stopped gaining need not.

What differs from `default.py` (the small U-Net, 32^3 patches, batch 2 and the loss stay):

* the cohort: 140 "small" phantoms (96 x 64 x 64 voxels at 3 x 2.04 x 2.04 mm: shrunken patients, lesion
  radii shrunk less, `clips_jax/data/phantoms.py`) on a 3 mm grid (96 x 44 x 44 voxels, 36 evaluation tiles of 32^3
  per case instead of the default store's 128), with the difficulty-stratified split of
  `clips_jax/data/cohort.py`: 40 lesion-bearing + 8 lesion-free test cases, 12 validation cases, the rest
  (57 lesion-bearing + 23 lesion-free) for training, every split covering the latent difficulty
  evenly, so the training split has its hard tail and the test split its hard third;
* the runs: meant to be long enough to plateau (the best validation Dice of the last 20 % of steps at most 0.01
  above the best before: `clips_jax/experiments/plateau.py`), with 10 validations per run and the learning
  rate annealed to 0 over the run (one cosine period, the default schedule). In the first study (1500 steps)
  37 of the 55 runs passed that per-run check, but only 1 of 5 cbs runs and 2 of 5 self_paced_hard runs
  (docs/experiments.md, "Results"). With 3000 steps all 6 pilot runs of the two arms that failed it most (cbs,
  self_paced_hard) and of the baseline plateaued, and 46 of the study's 55 runs did (docs/experiments.md, "The
  longer study", which also gives the time the 3000-step study took; the cbs runs of the first study and of
  that pilot had a sigma schedule since corrected: docs/experiments.md, "Correction"). Six runs of this config
  trained again and evaluated on 52 independent cases showed that a larger validation split would not make
  every run pass: the 3 of them that failed on the 12 validation cases failed there by as much or more
  (docs/experiments.md, "Are the late gains real?"). With 6000 steps and the weight average ("long") 53 of 55
  runs plateaued, most peaking at step 2400-4800 and overfitting after;
* the learning rate: 3e-3 instead of the default's 1e-2, which the pilot found to make runs differ far more from
  seed to seed (test Dice s.d. over 3 baseline seeds 0.11 against 0.02), and so the study far less able to see a
  difference between curricula; the slower start is why the runs are long.
"""

import importlib.util
import pathlib

import ml_collections

from clips_jax.experiments.presets import GROW_FRACTION

# Load the sibling default config by path (config files are loaded by path, not as a package).
_spec = importlib.util.spec_from_file_location("clips_default_config", pathlib.Path(__file__).with_name("default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)

#: Validations (and checkpoints) per run: at least 5 are needed by the plateau check, 2 of them in the last 20 %.
EVALS = 10

#: Validations per run of the "stop" variant (at most: a run stopped at a plateau has fewer), dense enough that
#: the last 20 % of a run stopped from step 4500 on holds at least 3.
STOP_EVALS = 30

#: The decay of the "ema", "long" and "long9000" variants: a time constant of 1 / (1 - 0.998) = 500 steps (a sixth
#: of a 3000-step run, a twelfth of a 6000-step one, an eighteenth of a 9000-step one).
EMA_DECAY = 0.998


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The study config (module docstring); `variant` "" (3000-step runs), "first" (the first study's 1500) or
    "ema" (3000-step runs validating a weight average), "long" or "long9000" (6000- or 9000-step runs validating
    a weight average), "stop" ("long9000" validated every 300 steps and stopped at a plateau)."""
    variants = ("", "first", "ema", "long", "long9000", "stop")
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of clips_jax/configs/curriculum_study.py (one of {variants})")
    c = default.get_config()
    c.steps = {"first": 1500, "long": 6000, "long9000": 9000, "stop": 9000}.get(variant, 3000)
    c.log_every = 50
    c.optim.lr = 3e-3
    if variant in ("ema", "long", "long9000", "stop"):
        c.optim.ema_decay = EMA_DECAY

    c.data.spacing_mm = 3.0
    ph = c.data.phantoms
    ph.cases = 140
    ph.seed = 0
    ph.size = "small"
    ph.split = "study"  # clips_jax/data/cohort.py: study_split with the counts below
    ph.test_lesion_cases = 40
    ph.test_free_cases = 8
    ph.val_cases = 12

    c.eval.at_start = False  # the untrained model's Dice (~0) is the same for every run

    c.eval.every_steps = c.steps // (STOP_EVALS if variant == "stop" else EVALS)
    c.checkpoint.every_steps = c.eval.every_steps
    if variant == "stop":
        c.stop_at_plateau.enabled = True
        c.stop_at_plateau.after_steps = round(GROW_FRACTION * c.steps)
        c.stop_at_plateau.min_last_evals = 3
    return c
