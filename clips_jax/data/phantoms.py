"""Synthetic whole-body PET/CT phantoms with lymphoma-like lesions, written in the autoPET NIfTI layout.

Why: the default training job, the tests and the benchmarks need PET/CT studies with a known ground truth
and no patient data. A phantom is a "miniature patient" built from axis-aligned ellipsoids and cylinders:

* CT (HU): air -1000 outside the body; soft tissue ~40; subcutaneous fat ~-100; lungs ~-850; bones
  (skull, spine, pelvis, femurs) ~+700; organs 30-60; small Gaussian noise.
* SUV (body-weight): background soft tissue 0.5-1, fat/lung ~0.3-0.5, brain 7-10, heart 2-8, liver 2-2.5,
  spleen ~2, kidneys 3-6, bladder 10-30, marrow ~1.5, blood pool ~1.8; lesions with SUVmax 2.5-30 on the
  cervical, axillary, mediastinal, para-aortic and inguinal node chains and optionally in the spleen.
  The true activity map gets Poisson-like noise and is then blurred with a Gaussian of FWHM 6.5 mm
  (the PET resolution; sigma in voxels from the spacing) and clipped at 0.
* SEG (uint8 0/1): the lesion ellipsoids on the native grid, *before* blur. Lesions never touch each other
  (each lesion is one 18-connected component), so lesion counts and volumes can be checked exactly.

Anatomy is described in mm for the reference field of view of the "full" size (326 x 200 x 200 voxels at
(3.0, 2.04, 2.04) mm = 978 x 408 x 408 mm) and scaled per axis to the requested grid, so "small" phantoms
(96 x 64 x 64) are shrunken patients; lesion radii shrink by the square root of that factor (so they stay a few
voxels wide), with a floor of one voxel.

Difficulty spreads from big bright lesions far from physiological uptake (easy) to small faint lesions
next to the heart, kidneys or bladder (hard): each case draws a latent `difficulty` u in [0, 1] that shifts
lesion volume (log-normal around 150 ml -> 1.5 ml), SUVmax (18 -> 4) and the share of lesions placed
near high physiological uptake. About 20 % of cases are lesion-free.

Everything is a deterministic function of the seed (`np.random.default_rng(seed)` only).

Examples:
    clips-phantoms --out phantoms/ --cases 10 --seed 0               # small (96x64x64) studies
    clips-phantoms --out phantoms_full/ --cases 4 --size full        # 326x200x200
    python -m clips_jax.data.phantoms --out DIR --size 64,48,48      # any z,y,x size

writes `DIR/<case_id>/{CTres.nii.gz, SUV.nii.gz, SEG.nii.gz, truth.json}`, each case atomically (a temporary
directory renamed at the end); cases already present are skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.ndimage as ndi

from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import save_nifti
from clips_jax.errors import ConfigError
from clips_jax.fileio import atomic_dir

SIZES: dict[str, tuple[int, int, int]] = {"small": (96, 64, 64), "full": (326, 200, 200)}
"""Named grid sizes `(z, y, x)` in voxels."""

DEFAULT_SPACING_MM = (3.0, 2.04, 2.04)
"""autoPET-like anisotropic PET spacing, (z, y, x) mm."""

_REF_EXTENT_MM = np.array([326 * 3.0, 200 * 2.04, 200 * 2.04])  # (z, y, x) extent the anatomy is drawn for
PET_FWHM_MM = 6.5
"""Full width at half maximum of the simulated PET point-spread function (mm)."""

LESION_FREE_FRACTION = 0.2
"""Probability that a phantom has no lesion."""

MAX_LESIONS = 30

# Node chains: (site, start (z, y, x) mm, end (z, y, x) mm, near_high_uptake). Reference-FOV coordinates,
# origin at the FOV centre, +z superior, +y anterior, +x patient left (RAS). Mirrored sites are listed twice.
_CHAINS = (
    ("cervical", (235.0, 5.0, -42.0), (320.0, 15.0, -38.0), False),
    ("cervical", (235.0, 5.0, 42.0), (320.0, 15.0, 38.0), False),
    ("axillary", (190.0, 0.0, -125.0), (235.0, 10.0, -140.0), False),
    ("axillary", (190.0, 0.0, 125.0), (235.0, 10.0, 140.0), False),
    ("mediastinal", (105.0, 15.0, -12.0), (205.0, 45.0, 12.0), True),  # next to the heart
    ("para-aortic", (-150.0, -35.0, -5.0), (20.0, -40.0, 40.0), True),  # next to kidneys / aorta
    ("inguinal", (-320.0, 35.0, -95.0), (-275.0, 45.0, -80.0), True),  # next to the bladder
    ("inguinal", (-320.0, 35.0, 95.0), (-275.0, 45.0, 80.0), True),
)
_SPLEEN = ((0.0, -30.0, 95.0), (55.0, 40.0, 35.0))  # centre, radii (z, y, x) mm


class Phantom(NamedTuple):
    """One synthetic study on its native PET grid (all arrays `(z, y, x)`, shape `geometry.shape`).

    Attributes:
      ct: float32 HU.
      suv: float32 SUVbw, >= 0 (blurred + noisy).
      seg: uint8 lesion mask 0/1 (before blur).
      geometry: the grid (spacing `(z, y, x)` mm, RAS affine).
      truth: JSON-serialisable dict (see `make_phantom`).
    """

    ct: np.ndarray
    suv: np.ndarray
    seg: np.ndarray
    geometry: Geometry
    truth: dict


def _parse_size(size) -> tuple[int, int, int]:
    if isinstance(size, str):
        if size in SIZES:
            return SIZES[size]
        try:
            dims = tuple(int(v) for v in size.lower().split("x"))
        except ValueError:
            dims = ()
    else:
        dims = tuple(int(v) for v in size)
    if len(dims) != 3 or min(dims) < 8:
        raise ConfigError(f"phantom size {size!r}: use 'small', 'full' or three sizes >= 8 like '96x64x64'")
    return dims  # type: ignore[return-value]


class _Canvas:
    """Helper that paints ellipsoids/cylinders into (z, y, x) arrays through bounding-box slices."""

    def __init__(self, shape, spacing_mm, scale):
        self.shape = np.asarray(shape)
        self.sp = np.asarray(spacing_mm, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)  # reference mm -> phantom mm, per axis

    def to_mm(self, p_ref):
        return np.asarray(p_ref, dtype=np.float64) * self.scale

    def index_of(self, p_mm):
        """Continuous voxel index (z, y, x) of a point given in phantom mm (origin at the FOV centre)."""
        return np.asarray(p_mm) / self.sp + (self.shape - 1) / 2.0

    def ellipsoid(self, centre_mm, radii_mm):
        """(slices, local boolean mask) of an ellipsoid given in phantom mm; None if outside the grid."""
        c = self.index_of(centre_mm)
        r = np.asarray(radii_mm, dtype=np.float64) / self.sp
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        axes = [((np.arange(lo[a], hi[a]) - c[a]) / r[a]) for a in range(3)]
        d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        sl = tuple(slice(int(lo[a]), int(hi[a])) for a in range(3))
        return sl, d2 <= 1.0, d2

    def paint(self, arr, centre_ref, radii_ref, value, *, ref=True):
        """Set `arr` to `value` inside an ellipsoid; returns the (slices, mask) pair or None."""
        c = self.to_mm(centre_ref) if ref else np.asarray(centre_ref)
        r = self.to_mm(radii_ref) if ref else np.asarray(radii_ref)
        e = self.ellipsoid(c, r)
        if e is not None:
            sl, m, _ = e
            arr[sl][m] = value
        return e


def _lesion_radii(rng, volume_ml, scale_vol, min_radius_mm):
    """Radii (z, y, x) mm of an ellipsoid with the given reference volume, random aspect, scaled and floored."""
    aspect = rng.uniform(0.7, 1.3, size=3)
    aspect /= np.prod(aspect) ** (1 / 3)
    r_iso = (3.0 * volume_ml * 1000.0 * scale_vol / (4.0 * math.pi)) ** (1 / 3)
    return np.maximum(r_iso * aspect, min_radius_mm)


def make_phantom(seed: int, size="small", spacing_mm: Sequence[float] = DEFAULT_SPACING_MM) -> Phantom:
    """Build one synthetic PET/CT study.

    Args:
      seed: integer seed; the result is a deterministic function of (seed, size, spacing_mm).
      size: "small" (96, 64, 64), "full" (326, 200, 200), a "ZxYxX" string or a (z, y, x) tuple of voxels.
      spacing_mm: voxel size (z, y, x) in mm.
    Returns:
      `Phantom(ct, suv, seg, geometry, truth)`. `truth` holds `seed`, `shape`, `spacing_mm`, `difficulty`
      (latent u in [0, 1]), `uptake` (organ SUVs used), `tmtv_ml` (mask voxels x voxel volume),
      `n_lesions` and `lesions`: one dict per lesion with `id` (1-based), `site`, `centre_zyx_mm` (world,
      z, y, x order), `centre_voxel_zyx` (continuous index), `radii_mm` (z, y, x), `volume_ml` (voxels of
      that lesion in SEG x voxel volume), `suv_max` (max of the final SUV inside that lesion's voxels),
      `suv_nominal` (the uptake painted at the lesion centre before blur/noise), `near_high_uptake`.
      Lesions are separated by at least two voxels, so each one is its own 18-connected component.
    Edge cases: lesion-free cases (~20 %) have `lesions == []`, an all-zero SEG and `tmtv_ml == 0`.
    Lesions partly outside a small grid are clipped to the grid (volume counts the voxels inside).
    """
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: uptake, anatomy, lesions, PET noise
    cv, geometry, scale_vol = _grid(_parse_size(size), spacing_mm)
    uptake = _draw_uptake(rng)
    ct, act, arms = _paint_anatomy(rng, cv, uptake)
    u, spleen_involved, placed, seg, label = _place_lesions(rng, cv, scale_vol, ct, act)
    suv = _form_pet(rng, act, ct, cv.sp)
    lesions = _lesion_records(placed, label, suv, cv, geometry.voxel_volume_ml)
    truth = {
        "seed": int(seed),
        "shape": [int(v) for v in cv.shape],
        "spacing_mm": [float(v) for v in cv.sp],
        "difficulty": round(u, 6),
        "arms_in_fov": arms,
        "spleen_involved": spleen_involved and any(q["site"] == "spleen" for q in placed),
        "uptake": {k: round(float(v), 4) for k, v in uptake.items()},
        "pet_fwhm_mm": PET_FWHM_MM,
        "n_lesions": len(lesions),
        "tmtv_ml": float(seg.sum(dtype=np.int64)) * geometry.voxel_volume_ml,
        "lesions": lesions,
    }
    return Phantom(ct, suv.astype(np.float32, copy=False), seg, geometry, truth)


def _grid(shape: tuple[int, int, int], spacing_mm) -> tuple["_Canvas", Geometry, float]:
    """The phantom's canvas (reference body scaled to the field of view), its geometry (centred at the world
    origin) and the lesion volume scale. Raises ConfigError for a bad spacing."""
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ConfigError(f"phantom spacing {spacing_mm!r}: need three positive values (z, y, x) in mm")
    scale = np.asarray(shape) * sp / _REF_EXTENT_MM
    # lesions shrink more gently than the anatomy (square root of the linear factor) so that lesions of
    # "small" phantoms stay a few voxels wide instead of vanishing under the PET blur
    scale_vol = float(np.prod(scale)) ** 0.5
    origin_xyz = (-(np.asarray(shape) - 1) / 2.0 * sp)[::-1]
    return _Canvas(shape, sp, scale), Geometry.from_spacing(shape, sp, origin_xyz), scale_vol


def _draw_uptake(rng: np.random.Generator) -> dict[str, float]:
    """Organ SUVs of one patient (FDG: bright brain, bladder and kidneys, variable heart)."""
    return {
        "background": rng.uniform(0.5, 1.0),
        "fat": rng.uniform(0.25, 0.4),
        "lung": rng.uniform(0.3, 0.5),
        "brain": rng.uniform(7.0, 10.0),
        "heart": rng.uniform(2.0, 8.0),
        "liver": rng.uniform(2.0, 2.5),
        "spleen": rng.uniform(1.7, 2.2),
        "kidney": rng.uniform(3.0, 6.0),
        "bladder": rng.uniform(10.0, 30.0),
        "marrow": rng.uniform(1.2, 1.8),
        "blood": rng.uniform(1.5, 2.1),
    }


def _paint_anatomy(rng: np.random.Generator, cv: "_Canvas", uptake: dict) -> tuple[np.ndarray, np.ndarray, bool]:
    """CT (HU, float32, air elsewhere) and true activity (SUV before blur and noise) of the body and organs;
    also whether the arms are in the field of view."""
    ct = np.full(cv.shape, -1000.0, dtype=np.float32)
    act = np.zeros(cv.shape, dtype=np.float32)

    def organ(centre, radii, hu, suv):
        e = cv.paint(ct, centre, radii, hu)
        if e is not None:
            act[e[0]][e[1]] = suv
        return e

    def cylinder_z(z0, z1, y, x, ry, rx, hu, suv, step=10.0):
        # a z-aligned cylinder as a stack of overlapping short ellipsoids (cheap, bounded boxes)
        for zc in np.arange(z0, z1 + 1e-6, step):
            organ((zc, y, x), (step, ry, rx), hu, suv)

    bg = uptake["background"]
    # body outline (soft tissue), then subcutaneous fat as an outer shell of the trunk
    fat_mm = rng.uniform(12.0, 30.0)
    trunk_c, trunk_r = (0.0, 0.0, 0.0), np.array([300.0, 120.0, 160.0]) * rng.uniform(0.92, 1.05)
    organ(trunk_c, trunk_r, -100.0, uptake["fat"])
    organ(trunk_c, trunk_r - np.array([0.0, fat_mm, fat_mm]), 40.0, bg)
    organ((-420.0, 0.0, -85.0), (270.0, 75.0, 72.0), 40.0, bg)  # thighs
    organ((-420.0, 0.0, 85.0), (270.0, 75.0, 72.0), 40.0, bg)
    organ((290.0, 5.0, 0.0), (70.0, 55.0, 60.0), 40.0, bg)  # neck
    organ((395.0, 10.0, 0.0), (92.0, 95.0, 76.0), 700.0, uptake["marrow"])  # skull
    organ((400.0, 10.0, 0.0), (78.0, 84.0, 66.0), 35.0, uptake["brain"])  # brain
    arms = bool(rng.random() < 0.5)
    if arms:  # arms down along the trunk; otherwise raised out of the field of view
        organ((40.0, 0.0, -178.0), (290.0, 42.0, 30.0), 40.0, bg)
        organ((40.0, 0.0, 178.0), (290.0, 42.0, 30.0), 40.0, bg)
    organ((130.0, 0.0, -72.0), (125.0, 82.0, 58.0), -850.0, uptake["lung"])  # lungs
    organ((130.0, 0.0, 72.0), (125.0, 82.0, 58.0), -850.0, uptake["lung"])
    organ((75.0, 35.0, 22.0), (58.0, 52.0, 58.0), 40.0, uptake["heart"])  # heart
    organ((-20.0, 10.0, -70.0), (80.0, 88.0, 82.0), 55.0, uptake["liver"])  # liver (patient right)
    organ(_SPLEEN[0], _SPLEEN[1], 45.0, uptake["spleen"])
    organ((-60.0, -55.0, -68.0), (52.0, 30.0, 27.0), 30.0, uptake["kidney"])
    organ((-60.0, -55.0, 68.0), (52.0, 30.0, 27.0), 30.0, uptake["kidney"])
    organ((-232.0, 30.0, 0.0), (34.0, 40.0, 45.0), 10.0, uptake["bladder"])
    cylinder_z(-150.0, 150.0, -42.0, 14.0, 11.0, 11.0, 40.0, uptake["blood"])  # aorta
    cylinder_z(-230.0, 320.0, -82.0, 0.0, 17.0, 19.0, 700.0, uptake["marrow"])  # spine
    organ((-215.0, -25.0, -85.0), (55.0, 55.0, 25.0), 600.0, uptake["marrow"])  # iliac bones
    organ((-215.0, -25.0, 85.0), (55.0, 55.0, 25.0), 600.0, uptake["marrow"])
    cylinder_z(-489.0, -270.0, 0.0, -85.0, 13.0, 13.0, 700.0, uptake["marrow"])  # femurs
    cylinder_z(-489.0, -270.0, 0.0, 85.0, 13.0, 13.0, 700.0, uptake["marrow"])
    return ct, act, arms


def _lesion_site(rng: np.random.Generator, u: float, spleen_involved: bool) -> tuple[str, bool, np.ndarray]:
    """(site, near high physiological uptake, centre in reference-body mm) of one candidate lesion."""
    if spleen_involved and rng.random() < 0.3:
        d = rng.normal(size=3)
        d *= rng.uniform(0.0, 0.6) / max(np.linalg.norm(d), 1e-9)
        return "spleen", False, np.asarray(_SPLEEN[0]) + d * np.asarray(_SPLEEN[1])
    p_near = 0.15 + 0.7 * u  # harder cases favour chains next to high physiological uptake
    near_ids = [i for i, ch in enumerate(_CHAINS) if ch[3]]
    far_ids = [i for i, ch in enumerate(_CHAINS) if not ch[3]]
    ids = near_ids if rng.random() < p_near else far_ids
    site, a, b, near = _CHAINS[int(rng.choice(ids))]
    t = rng.uniform(0.0, 1.0)
    return site, near, np.asarray(a) + t * (np.asarray(b) - np.asarray(a)) + rng.normal(0.0, 6.0, size=3)


def _place_lesions(rng: np.random.Generator, cv: "_Canvas", scale_vol: float, ct: np.ndarray, act: np.ndarray):
    """Draw the latent difficulty u and place the lesions (painted into `ct` and `act` in place).

    Returns (u, spleen_involved, placed, seg uint8, label int16 per-lesion ids); `placed` holds one dict per
    lesion: centre "c" and radii "r" in canvas mm, "site", "near", nominal "suv".
    """
    u = float(rng.uniform(0.0, 1.0))
    lesion_free = bool(rng.random() < LESION_FREE_FRACTION)
    n_target = 0 if lesion_free else int(min(MAX_LESIONS, 1 + rng.poisson(2.0 + 8.0 * u)))
    spleen_involved = bool(not lesion_free and rng.random() < 0.25)
    seg = np.zeros(cv.shape, dtype=np.uint8)
    label = np.zeros(cv.shape, dtype=np.int16)  # per-lesion ids, to measure volume/SUVmax after blur
    placed: list[dict] = []
    min_r, gap = cv.sp * 1.0, 2.0 * float(cv.sp.max())
    tries = 0
    while len(placed) < n_target and tries < 40 * max(n_target, 1):
        tries += 1
        site, near, centre_ref = _lesion_site(rng, u, spleen_involved)
        log_v = np.clip(rng.normal(np.log(150.0) * (1 - u) + np.log(1.5) * u, 0.9), np.log(0.5), np.log(500.0))
        radii = _lesion_radii(rng, float(np.exp(log_v)), scale_vol, min_r)
        centre = cv.to_mm(centre_ref)
        if any(np.linalg.norm(centre - q["c"]) < radii.max() + q["r"].max() + gap for q in placed):
            continue
        e = cv.ellipsoid(centre, radii)
        if e is None or not e[1].any():
            continue
        suv_nom = float(np.clip(rng.normal(18.0 * (1 - u) + 4.0 * u, 3.0), 2.5, 30.0))
        placed.append({"c": centre, "r": radii, "site": site, "near": near, "suv": suv_nom})
        sl, m, d2 = e
        seg[sl][m] = 1
        label[sl][m] = len(placed)
        ct[sl][m] = rng.uniform(30.0, 50.0)
        profile = suv_nom * (1.0 - 0.3 * d2[m])  # slightly brighter core
        act[sl][m] = np.maximum(act[sl][m], profile.astype(np.float32))
    return u, spleen_involved, placed, seg, label


def _form_pet(rng: np.random.Generator, act: np.ndarray, ct: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """PET formation: Poisson-like noise on the true activity, then the scanner's resolution blur (FWHM
    PET_FWHM_MM); also adds CT noise to `ct` in place and clips it to [-1024, 3071] HU. Returns SUV float32."""
    sigma_vox = PET_FWHM_MM / (2.0 * math.sqrt(2.0 * math.log(2.0))) / sp
    noise = rng.standard_normal(act.shape, dtype=np.float32)
    noisy = act + np.float32(0.8) * np.sqrt(act + np.float32(0.02)) * noise
    suv = ndi.gaussian_filter(noisy, sigma_vox, truncate=3.0)
    np.maximum(suv, 0.0, out=suv)
    ct += np.float32(8.0) * rng.standard_normal(act.shape, dtype=np.float32)
    np.clip(ct, -1024.0, 3071.0, out=ct)
    return suv


def _lesion_records(placed: list[dict], label: np.ndarray, suv: np.ndarray, cv: "_Canvas", vox_ml: float) -> list[dict]:
    """The `truth["lesions"]` entries: position, size, measured volume (ml) and SUVmax of each lesion."""
    if not placed:
        return []
    idx = np.arange(1, len(placed) + 1)
    counts = ndi.sum_labels(np.ones(label.shape, np.float32), label, idx)
    maxima = ndi.maximum(suv, label, idx)
    lesions = []
    for i, q in enumerate(placed):
        cz, cy, cx = q["c"]
        world_zyx = (np.array([cx, cy, cz]) + 0.0)[::-1]  # world == phantom mm (origin chosen so)
        lesions.append(
            {
                "id": i + 1,
                "site": q["site"],
                "near_high_uptake": bool(q["near"]),
                "centre_zyx_mm": [round(float(v), 3) for v in world_zyx],
                "centre_voxel_zyx": [round(float(v), 3) for v in cv.index_of(q["c"])],
                "radii_mm": [round(float(v), 3) for v in q["r"]],
                "volume_ml": float(counts[i]) * vox_ml,
                "suv_max": float(maxima[i]),
                "suv_nominal": round(q["suv"], 4),
            }
        )
    return lesions


def case_seed(seed: int, index: int) -> int:
    """The per-case seed of case `index` of a dataset generated with `seed` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def case_id(seed: int, index: int) -> str:
    """Folder name of case `index` of a dataset generated with `seed`, e.g. `phantom_s0_0003`."""
    return f"phantom_s{int(seed)}_{int(index):04d}"


def write_phantom(case_dir: str | Path, phantom: Phantom) -> Path:
    """Write one phantom as `case_dir/{CTres,SUV,SEG}.nii.gz + truth.json`, atomically (whole directory).

    Raises FileExistsError if `case_dir` exists.
    """
    case_dir = Path(case_dir)
    with atomic_dir(case_dir) as tmp:
        save_nifti(tmp / "CTres.nii.gz", phantom.ct, phantom.geometry, dtype=np.float32)
        save_nifti(tmp / "SUV.nii.gz", phantom.suv, phantom.geometry, dtype=np.float32)
        save_nifti(tmp / "SEG.nii.gz", phantom.seg, phantom.geometry, dtype=np.uint8)
        (tmp / "truth.json").write_text(json.dumps(phantom.truth, indent=1), encoding="utf-8")
    return case_dir


def write_phantoms(
    out: str | Path,
    n: int,
    seed: int,
    size="small",
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Generate `n` phantoms under `out/<case_id>/` (see `case_id`), skipping cases already present.

    Case `i` uses `make_phantom(case_seed(seed, i), size, spacing_mm)` and its truth also records
    `case_id` and `dataset_seed`. `log`: optional one-line progress sink (a line per case). Returns the `n` case
    directories (existing and new), in index order.
    """
    if n < 0:
        raise ConfigError(f"--cases {n}: need a number >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        cid = case_id(seed, i)
        d = out / cid
        if not (d / "truth.json").is_file():
            ph = make_phantom(case_seed(seed, i), size, spacing_mm)
            ph.truth.update({"case_id": cid, "dataset_seed": int(seed), "index": i})
            write_phantom(d, ph)
            if log is not None:
                log(f"[{i + 1}/{n}] {cid}: {ph.truth['n_lesions']} lesions, TMTV {ph.truth['tmtv_ml']:.1f} ml")
        elif log is not None:
            log(f"[{i + 1}/{n}] {cid}: already present, skipped")
        paths.append(d)
    return paths


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_string(
        "out", None, "Output folder (autoPET layout: <case_id>/{CTres,SUV,SEG}.nii.gz).", flag_values=fv
    )
    flags.DEFINE_integer("cases", 10, "Number of studies.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Dataset seed.", flag_values=fv)
    flags.DEFINE_string("size", "small", "small (96x64x64), full (326x200x200) or z,y,x voxels.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def run_from_flags(fv) -> int:
    """Write the phantoms; returns 0 (errors: `cli.run_tool`)."""
    from clips_jax import cli

    size = fv["size"].value
    if size not in SIZES:
        size = cli.parse_zyx(size, "size")
    paths = write_phantoms(fv["out"].value, fv["cases"].value, fv["seed"].value, size, log=print)
    print(f"{len(paths)} phantom studies in {fv['out'].value}")
    return 0


def main(argv=None) -> int:
    """`clips-phantoms`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""
    from clips_jax import cli

    return cli.run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    import sys

    sys.exit(main())
