"""Data: geometry, NIfTI/DICOM I/O, SUV, resampling, input channels, phantoms, case store and grain pipeline.

Arrays are `(z, y, x)` in the PET grid's voxel order; geometry (spacing in mm, affine) travels with them in
a frozen `Geometry`. Nothing downstream re-reads a file.
"""

from clips_jax.data.geometry import Geometry  # noqa: F401
