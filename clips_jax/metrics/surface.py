"""Surface-distance metrics between two binary masks: HD, HD95, ASSD, NSD and BJI, in mm.

Definition (one, used everywhere in CLIPS-JAX): the *surfel* formulation of deepmind/surface-distance
(Nikolov et al. 2021), re-implemented here from its definition with numpy/scipy:

* The surface of a mask lives on the **voxel-corner lattice**. Each corner sees a 2x2x2 block of voxels;
  the block's 8 in/out bits form a neighbour code (0..255). A corner is a *surface point* when its code is
  neither 0 (all outside) nor 255 (all inside).
* Each surface point carries a **surfel area** a (mm^2): the area of the marching-cubes surface patch
  inside its 2x2x2 block (polygons through the edge midpoints, each polygon triangulated from its centroid),
  with the anisotropic voxel spacing applied. See `surfel_area_table`.
* d(s, B) is the Euclidean distance (mm, spacing-aware) from surface point s of one mask to the nearest
  surface point of the other, from `scipy.ndimage.distance_transform_edt(sampling=spacing_mm)`.

Metrics (P = prediction, G = ground truth, a = surfel area, d = distance to the other surface):
  hd_mm    max over both directions of the largest distance (Hausdorff distance).
  hd95_mm  max over both directions of the area-weighted 95th percentile (deepmind definition (a)).
  assd_mm  (sum_{dP} a d + sum_{dG} a d) / (sum_{dP} a + sum_{dG} a)   (area-weighted, symmetric).
  nsd      (area of dP within tau of dG + area of dG within tau of dP) / (area dP + area dG).
  bji      like NSD, each surfel weighted by (1 - (d/tau)^2) for d <= tau (the CLIPS precursor's "BJI";
           Dice-form, despite the name "Boundary Jaccard").

Empty masks: both empty -> all NaN; exactly one empty -> hd/hd95/assd NaN (undefined; counted apart in
summaries), nsd = bji = 0.

Speed: both masks are cropped to the bounding box of their union plus one voxel before anything else; the
crop is exact (every surface point of either mask lies inside it, and the EDT finds nearest surface points
inside the crop), so the cost depends on the lesions' extent, not on the whole-body volume.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from scipy import ndimage

__all__ = [
    "surfel_area_table",
    "surface_points",
    "SurfaceDistances",
    "surface_distances",
    "surface_metrics",
    "union_bbox",
]

# Bit of each corner of the 2x2x2 block, indexed by the corner's offset (d0, d1, d2) along the array axes
# (z, y, x). Offset (1, 1, 1) is bit 0 (value 1), offset (0, 0, 0) is bit 7 (value 128).
_BIT_OF_OFFSET = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)
_CORNERS = [tuple(c) for c in itertools.product((0, 1), repeat=3)]
# The 12 cube edges as pairs of corner offsets differing along exactly one axis.
_EDGES = [(a, b) for a, b in itertools.combinations(_CORNERS, 2) if sum(x != y for x, y in zip(a, b)) == 1]


def _code_polygons(code: int) -> list[np.ndarray]:
    """Surface polygons (each (k, 3) vertices in unit-cube coordinates) of one 2x2x2 neighbour code.

    Vertices sit at the midpoints of cube edges whose two corners differ. On each of the 6 faces the
    crossings are paired like marching squares; on a saddle face (two diagonal corners of one kind) each
    corner of the minority kind of the block is cut off on its own (codes with more than 4 inside corners are
    handled as their complement, as in the classic marching-cubes table, so a mask and its complement have
    the same surface). Every crossing belongs to exactly two faces, so pairing on faces yields closed
    polygons.
    """
    if bin(code).count("1") > 4:  # complement symmetry: the surface of a mask = that of its complement
        code = 255 - code
    inside = {c: bool(code & int(_BIT_OF_OFFSET[c])) for c in _CORNERS}
    crossing = [e for e in _EDGES if inside[e[0]] != inside[e[1]]]
    index = {e: i for i, e in enumerate(crossing)}
    neighbours: dict[int, list[int]] = {i: [] for i in range(len(crossing))}
    for axis, value in itertools.product(range(3), (0, 1)):
        corners = [c for c in _CORNERS if c[axis] == value]
        face_edges = [e for e in crossing if e[0][axis] == value and e[1][axis] == value]
        if len(face_edges) == 2:
            pairs = [tuple(face_edges)]
        elif len(face_edges) == 4:  # saddle: cut off each inside corner
            pairs = [tuple(e for e in face_edges if c in e) for c in corners if inside[c]]
        else:
            pairs = []
        for a, b in pairs:
            neighbours[index[a]].append(index[b])
            neighbours[index[b]].append(index[a])
    polygons, seen = [], set()
    for start in range(len(crossing)):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [n for n in neighbours[cur] if n != prev]
            nxt = nxt[0] if nxt else neighbours[cur][0]
            if nxt == start:
                break
            loop.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        pts = np.array([(np.add(crossing[i][0], crossing[i][1]) / 2.0) for i in loop], dtype=np.float64)
        polygons.append(pts)
    return polygons


@functools.lru_cache(maxsize=1)
def _unit_area_vectors() -> tuple[np.ndarray, ...]:
    """Per code, the (n_triangles, 3) half cross products of its centroid-fan triangles (unit cube)."""
    out = []
    for code in range(256):
        tris = []
        for poly in _code_polygons(code):
            c = poly.mean(axis=0)
            for i in range(len(poly)):
                tris.append(0.5 * np.cross(poly[i] - c, poly[(i + 1) % len(poly)] - c))
        out.append(np.array(tris, dtype=np.float64).reshape(-1, 3))
    return tuple(out)


def surfel_area_table(spacing_mm) -> np.ndarray:
    """Surface area (mm^2) of the surfel of each 2x2x2 neighbour code.

    Args:
      spacing_mm: voxel size (z, y, x) in mm.
    Returns:
      float64 array (256,); entries 0 and 255 are 0. A single-corner code gives sqrt(3)/8 * unit area for
      isotropic spacing 1; an axis-aligned face (4 corners on one side) gives the face area, e.g. dy*dx.
    """
    sz, sy, sx = (float(s) for s in spacing_mm)
    # (S a) x (S b) = det(S) S^-1 (a x b): component i scales by the product of the two other spacings.
    scale = np.array([sy * sx, sz * sx, sz * sy])
    return np.array([float(np.linalg.norm(v * scale, axis=1).sum()) for v in _unit_area_vectors()])


def union_bbox(*masks: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box (tuple of 3 slices) of the union of boolean `masks`, grown by `margin` voxels.

    Returns None when all masks are empty. The box is clipped to the array.
    """
    shape = masks[0].shape
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        any_ = np.zeros(shape[axis], dtype=bool)
        for m in masks:
            any_ |= np.any(m, axis=other)
        idx = np.flatnonzero(any_)
        if idx.size == 0:
            return None
        box.append(slice(max(0, int(idx[0]) - margin), min(shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(box)


def surface_points(mask: np.ndarray, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """Surface points of a boolean mask on its corner lattice, and their surfel areas.

    Args:
      mask: bool (z, y, x).
      spacing_mm: (z, y, x) in mm.
    Returns:
      (is_surface bool array of shape mask.shape + 1, areas float64 of the same shape, 0 off the surface).
      Corner (i, j, k) is the corner shared by voxels (i-1..i, j-1..j, k-1..k).
    """
    m = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    n = tuple(s - 1 for s in m.shape)
    code = np.zeros(n, dtype=np.uint8)
    for off in _CORNERS:
        code |= m[off[0] : off[0] + n[0], off[1] : off[1] + n[1], off[2] : off[2] + n[2]] * _BIT_OF_OFFSET[off]
    is_surface = (code != 0) & (code != 255)
    areas = surfel_area_table(spacing_mm)[code]
    return is_surface, areas


class SurfaceDistances:
    """Directed surface distances of both masks (the raw material of every surface metric).

    Attributes:
      dist_pred: (n,) float64 mm, distance of each prediction surface point to the truth surface.
      area_pred: (n,) float64 mm^2, surfel areas of those points.
      dist_true, area_true: the same for the truth surface towards the prediction surface.
    """

    def __init__(self, dist_pred, area_pred, dist_true, area_true):
        self.dist_pred, self.area_pred = dist_pred, area_pred
        self.dist_true, self.area_true = dist_true, area_true


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_mm) -> SurfaceDistances:
    """Directed surface distances between two boolean (z, y, x) masks on the same grid.

    Args:
      pred, truth: bool arrays of equal shape (z, y, x).
      spacing_mm: (z, y, x) voxel size in mm.
    Returns:
      SurfaceDistances; a side with an empty mask has empty arrays, and the other side's distances are
      +inf (there is no surface to reach).
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    box = union_bbox(pred, truth)
    empty = np.zeros(0)
    if box is None:
        return SurfaceDistances(empty, empty, empty, empty)
    p, t = pred[box], truth[box]
    sp = tuple(float(s) for s in spacing_mm)
    surf_p, area_p = surface_points(p, sp)
    surf_t, area_t = surface_points(t, sp)

    def directed(src_surf, dst_surf):
        if not dst_surf.any():
            return np.full(int(src_surf.sum()), np.inf)
        if not src_surf.any():
            return empty
        return ndimage.distance_transform_edt(~dst_surf, sampling=sp)[src_surf]

    return SurfaceDistances(directed(surf_p, surf_t), area_p[surf_p], directed(surf_t, surf_p), area_t[surf_t])


def _weighted_percentile(dist: np.ndarray, area: np.ndarray, percent: float) -> float:
    """Smallest distance whose cumulative area fraction reaches `percent` % (deepmind's robust HD)."""
    order = np.argsort(dist, kind="stable")
    d, a = dist[order], area[order]
    cum = np.cumsum(a) / np.sum(a)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(d[min(idx, len(d) - 1)])


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm, tolerance_mm: float = 5.0) -> dict[str, float]:
    """HD, HD95, ASSD (mm), NSD and BJI at `tolerance_mm` between two boolean (z, y, x) masks.

    Args:
      pred, truth: bool arrays of equal shape (z, y, x) on the same grid.
      spacing_mm: (z, y, x) voxel size in mm (anisotropy honoured).
      tolerance_mm: tau of NSD and BJI, in mm (> 0).
    Returns:
      {"hd_mm", "hd95_mm", "assd_mm", "nsd", "bji"} as floats. Both masks empty: all NaN. One empty:
      hd/hd95/assd NaN, nsd = bji = 0.
    """
    sd = surface_distances(pred, truth, spacing_mm)
    nan = float("nan")
    n_p, n_t = sd.dist_pred.size, sd.dist_true.size
    if n_p == 0 and n_t == 0:
        return {"hd_mm": nan, "hd95_mm": nan, "assd_mm": nan, "nsd": nan, "bji": nan}
    if n_p == 0 or n_t == 0:
        return {"hd_mm": nan, "hd95_mm": nan, "assd_mm": nan, "nsd": 0.0, "bji": 0.0}
    total = sd.area_pred.sum() + sd.area_true.sum()
    tau = float(tolerance_mm)

    def within(d, a):
        return float(a[d <= tau].sum())

    def bji_part(d, a):
        ok = d <= tau
        return float((a[ok] * (1.0 - (d[ok] / tau) ** 2)).sum())

    return {
        "hd_mm": float(max(sd.dist_pred.max(), sd.dist_true.max())),
        "hd95_mm": max(
            _weighted_percentile(sd.dist_pred, sd.area_pred, 95.0),
            _weighted_percentile(sd.dist_true, sd.area_true, 95.0),
        ),
        "assd_mm": float(((sd.dist_pred * sd.area_pred).sum() + (sd.dist_true * sd.area_true).sum()) / total),
        "nsd": (within(sd.dist_pred, sd.area_pred) + within(sd.dist_true, sd.area_true)) / float(total),
        "bji": (bji_part(sd.dist_pred, sd.area_pred) + bji_part(sd.dist_true, sd.area_true)) / float(total),
    }
