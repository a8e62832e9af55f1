"""Data: geometry, NIfTI/DICOM I/O, SUV, resampling, input channels, phantoms, case store and grain pipeline.

Arrays are `(z, y, x)` in the PET grid's voxel order; geometry (spacing in mm, affine) travels with them in
a frozen `Geometry`. Nothing downstream re-reads a file. Data knows no network (no model, inference, trainer or
evaluation imports; tested in tests/test_module_rules.py): the stage-A maps a refiner trains with are computed
by `clips_jax.cascade` (command `python -m clips_jax.stage_a`) and only stored and read here.
"""

from clips_jax.data.geometry import Geometry  # noqa: F401
