"""CLIPS-JAX: curriculum learning for lymphoma PET/CT segmentation, with TMTV-Net ported to JAX/Flax NNX.

Package map (see README.md and DESIGN notes in docs/):
  model/        TMTV-Net in Flax NNX (U-Net, ensemble, refiner) and checkpoint loading
  data/         NIfTI/DICOM I/O, SUV, resampling, input channels, phantoms, case store, grain pipeline
  curricula/    curricula as pure functions of (state, step)
  losses.py     Dice, CE, focal, Mumford-Shah, deep supervision
  metrics/      per-patient metrics, reports, tables, plots
  inference.py  tiled whole-body inference (arrays in, probabilities out)
  cascade.py    the two-stage cascade and stage-A maps (above data/ and inference.py; CLI: stage_a.py)
  trainer.py    compiled, data-parallel training loop with orbax checkpoints
"""

__version__ = "0.1.0"
