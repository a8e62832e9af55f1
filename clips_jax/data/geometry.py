"""Voxel-grid geometry that travels with every volume.

Convention (the whole project): arrays are indexed `(z, y, x)`; `Geometry.affine` is the NIfTI/nibabel
affine that maps a voxel index `(i, j, k) = (x, y, z)` to RAS+ world coordinates in mm. Spacings and shapes
are always given in `(z, y, x)` order, in mm and voxels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clips_jax.errors import DataError

Affine = tuple[tuple[float, float, float, float], ...]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shape and placement of a 3-D voxel grid.

    Attributes:
      shape: number of voxels `(z, y, x)`.
      affine: 4x4 voxel-(x, y, z)-index -> RAS world (mm) matrix, as nested tuples (hashable, JSON-friendly).
    """

    shape: tuple[int, int, int]
    affine: Affine

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise DataError(f"invalid affine {self.affine!r}: need a finite 4x4 matrix")
        object.__setattr__(self, "affine", tuple(tuple(float(v) for v in row) for row in a))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise DataError(f"invalid grid shape {self.shape}: need three positive sizes (z, y, x)")

    @classmethod
    def from_spacing(cls, shape, spacing_mm, origin_xyz_mm=(0.0, 0.0, 0.0)) -> "Geometry":
        """An axis-aligned grid. `shape`, `spacing_mm` are `(z, y, x)`; `origin_xyz_mm` is world (x, y, z)."""
        sz, sy, sx = (float(s) for s in spacing_mm)
        a = np.diag([sx, sy, sz, 1.0])
        a[:3, 3] = origin_xyz_mm
        return cls(tuple(shape), a)

    @property
    def affine_array(self) -> np.ndarray:
        """The affine as a float64 (4, 4) array."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm, `(z, y, x)` order (norms of the affine's columns k, j, i)."""
        norms = np.linalg.norm(self.affine_array[:3, :3], axis=0)  # (x, y, z)
        return tuple(float(v) for v in norms[::-1])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (= cm^3)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """World position (x, y, z) in mm of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine_array[:3, 3])

    def validate(self, name: str = "image") -> "Geometry":
        """Raise DataError naming `name` if any spacing is zero, negative or non-finite; return self."""
        sp = self.spacing_mm
        if not all(np.isfinite(s) and s > 0 for s in sp):
            raise DataError(f"{name}: voxel spacing {sp} mm (z, y, x) is not positive; fix the header")
        return self

    def resampled(self, spacing_mm) -> "Geometry":
        """The grid with the same origin and direction and a new voxel size (TMTV-Net's 6 mm grid rule).

        Voxel (0, 0, 0) keeps its centre (the grid is anchored at voxel 0, not re-centred), and the size per
        axis is `round(shape * spacing / new_spacing)`. `spacing_mm` is `(z, y, x)` in mm (or one number).
        """
        new = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        old = np.asarray(self.spacing_mm)
        shape = tuple(max(1, int(np.round(n * o / s))) for n, o, s in zip(self.shape, old, new))
        scale_xyz = (new / old)[::-1]
        a = self.affine_array.copy()
        a[:3, :3] = a[:3, :3] * scale_xyz[None, :]
        return Geometry(shape, a)

    def same_grid(self, other: "Geometry", atol_mm: float = 1e-3) -> bool:
        """True if both grids have the same shape and affines equal within `atol_mm`."""
        return self.shape == other.shape and bool(
            np.allclose(self.affine_array, other.affine_array, atol=atol_mm, rtol=0)
        )

    def to_json(self) -> dict:
        """A JSON-serialisable dict; inverse of `from_json`."""
        return {"shape": list(self.shape), "affine": [list(r) for r in self.affine]}

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        """The Geometry written by `to_json` ({"shape": [z, y, x], "affine": 4x4 nested lists, mm})."""
        return cls(tuple(d["shape"]), tuple(tuple(r) for r in d["affine"]))
