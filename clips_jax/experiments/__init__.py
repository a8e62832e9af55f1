"""Experiments built on the trainer: `compare_curricula` trains every (curriculum, seed), evaluates each on
the held-out test split and writes a comparison (results.md, results.csv, plots). The named curriculum
settings it compares are defined once in `presets.py`. `teacher` scores the training cases with a trained model
for the transfer-teacher curriculum (`python -m clips_jax.experiments.teacher`). See docs/experiments.md.
"""

from clips_jax.experiments.presets import DEFAULT_CURRICULA, EXPERIMENTS, Experiment, curriculum_options

__all__ = ["DEFAULT_CURRICULA", "EXPERIMENTS", "Experiment", "curriculum_options"]
