"""DICOM PET/CT study reader: series discovery, slice stacking, geometry, and checked SUVbw conversion.

`read_dicom_study(folder)` turns a folder of DICOM files (any depth, any file names) into a `Case` on the PET
grid. Compared with TMTV-Net's converter (`list_of_modality_dirs`, `dicomToNifti` and `bqml_to_suv` in
`main/src/DicomNiftiConversion.py` of qurit-frizi/TMTV-Net: `.dcm` files only, SUV parameters from the first file,
no Units (0054,1001) or DecayCorrection (0054,1102) check; CT resampled onto the PET grid only when the array
shapes differ, in `main/main.py`) it:

* finds DICOM files by content, not by the `.dcm` extension (files without the 128-byte preamble + "DICM"
  magic are skipped as non-DICOM); accounts for every file: one with the magic that cannot be parsed, is cut
  short (no pixel data, no SeriesInstanceUID) or has pixel data of the wrong size is a `DamagedFile` error
  naming it, or, with `skip_damaged` (--skip_damaged), is left out with a warning naming it
  (`meta["skipped_files"]`);
* groups files by SeriesInstanceUID and picks one PT and one CT series (PT series with Units BQML are
  preferred; among equals the one with most slices, with a logged warning naming the choice);
* orders slices by their position along the slice normal (ImagePositionPatient . normal from
  ImageOrientationPatient), checks consistent orientation, size and pixel spacing, applies the slice-position
  rules of `stack_series` (a regular grid within the fit tolerance; a gap of more than 1.5 steps is a
  missing-slice error; otherwise resampled along the stack with a warning), applies each slice's own
  RescaleSlope/Intercept, and builds the affine (DICOM LPS -> our RAS: x and y rows negated);
* computes SUVbw with checks (`clips_jax.data.suv`, re-exported here: `suv_factor`, `suv_parameters`,
  `acquisition_datetime`): Units BQML, GML / CM2ML of any SUVType, Philips CNTS with a scale factor;
  DecayCorrection START / ADMIN / NONE; weight, dose and half-life present and positive, a dose in MBq recognised;
* checks that the CT covers at least 90 % of the PET's axial extent (`allow_partial_ct`: a warning, air
  outside) and resamples it onto the PET grid (trilinear, outside -1024 HU) whenever the grids differ.

Single-frame images only (one slice per file); enhanced multi-frame objects raise DataError.
Compressed transfer syntaxes need pydicom's optional pixel plugins; without them a DataError names the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from clips_jax.data.case import Case
from clips_jax.data.geometry import Geometry
from clips_jax.data.resample import resample_to_grid
from clips_jax.data.suv import (  # the SUV arithmetic, re-exported for existing imports
    SERIES_SUV_TAGS,  # noqa: F401
    acquisition_datetime,
    injected_dose_bq,  # noqa: F401
    series_suv_inputs,
    suv_factor,
    suv_parameters,
)
from clips_jax.errors import DataError, DataWarning

CT_OUTSIDE_HU = -1024.0
_MODALITY_NAMES = {"PT": "PET", "CT": "CT"}


# --------------------------------------------------------------------------------------------------------------
# File discovery


def _walk_files(folder: Path):
    """All regular files below `folder`, in sorted (deterministic) order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


DAMAGED_ADVICE = "remove it or export the series again, or pass --skip_damaged to leave it out"


class DamagedFile(DataError):
    """A DICOM file that cannot be used: cut short, unparsable, or pixel data of the wrong size. `path` and
    `reason` (without advice); the message adds what to do. `--skip_damaged` leaves such files out."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}; {DAMAGED_ADVICE}")


def _read_header(path: Path, *, check_pixels: bool = False, **kwargs) -> Dataset | None:
    """The DICOM header of `path` (no pixel data), or None if the file is not DICOM.

    `check_pixels`: also require the Pixel Data element (7FE0,0010) (read lazily, not loaded): pydicom parses
    a file cut short before it without complaint, minus the pixels and every later element.
    Raises DamagedFile if the file carries the DICOM magic but cannot be parsed (or lacks its pixel data).
    """
    try:
        if not check_pixels:
            return pydicom.dcmread(path, stop_before_pixels=True, **kwargs)
        ds = pydicom.dcmread(path, defer_size=1024, **kwargs)
    except InvalidDicomError:
        return None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFile(path, f"damaged DICOM file ({type(e).__name__}: {e})") from e
    has_pixels = "PixelData" in ds
    if has_pixels:
        del ds.PixelData  # headers stay pixel-free (the stack reads the pixels itself)
    elif str(ds.get("Modality", "")).upper() in ("PT", "CT") or "Rows" in ds:  # an image without pixels
        raise DamagedFile(path, "DICOM image without pixel data (7FE0,0010): the file is cut short")
    return ds


def dicom_modalities(folder: str | os.PathLike, stop_when: frozenset[str] = frozenset({"PT", "CT"})) -> set[str]:
    """Modalities (e.g. {"PT", "CT"}) of the DICOM files found recursively in `folder`.

    Cheap probe used for study detection: reads only the Modality tag and stops as soon as every modality
    in `stop_when` has been seen. Non-DICOM files are ignored; damaged ones too (the full reader reports them).
    """
    found: set[str] = set()
    for path in _walk_files(Path(folder)):
        try:
            ds = _read_header(path, specific_tags=["Modality"])
        except DataError:
            continue
        if ds is not None and "Modality" in ds:
            found.add(str(ds.Modality).upper())
            if stop_when and stop_when <= found:
                break
    return found


def _scan_series(folder: Path, skipped: list | None = None) -> dict[str, list[tuple[Path, Dataset]]]:
    """Group the DICOM image files below `folder` by SeriesInstanceUID: uid -> [(path, header), ...].

    A file with the DICOM magic that cannot be parsed, lacks its pixel data, or lacks SeriesInstanceUID /
    Modality is a `DamagedFile` error naming it; with a `skipped` list (--skip_damaged) it is left out instead
    (`_leave_out`: a `DataWarning` naming it, and a record in `skipped`).
    """
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in _walk_files(folder):
        try:
            ds = _read_header(path, check_pixels=True)
            if ds is None or _is_dicomdir(ds):
                continue  # not DICOM, or a DICOMDIR (a directory record, not an object of the study)
            if "SeriesInstanceUID" not in ds or "Modality" not in ds:
                # Every composite DICOM object carries both (type 1): without them the file is cut short or damaged.
                raise DamagedFile(
                    path, "DICOM file without SeriesInstanceUID (0020,000E) or Modality (0008,0060): truncated"
                )
        except DamagedFile as e:
            if skipped is None:
                raise
            _leave_out(e, skipped)
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    return series


def _leave_out(error: DamagedFile, skipped: list) -> None:
    """Leave a damaged file out (--skip_damaged): a `DataWarning` naming it, and {"file", "reason"} in
    `skipped` (the study's `meta["skipped_files"]`)."""
    warnings.warn(DataWarning(f"left out {error.path} (--skip_damaged): {error.reason}"), stacklevel=3)
    skipped.append({"file": str(error.path), "reason": error.reason})


def series_headers(folder: str | os.PathLike, series_uid: str, *, exclude=None) -> list[Dataset]:
    """The pixel-free headers of the image series `series_uid` found below `folder`, in file-walk order.

    For writers that reference the source images, e.g. the DICOM SEG of `clips_jax.data.dicom_seg`, which
    needs the PET slices' UIDs, positions and patient/study modules (the Case keeps only JSON-friendly meta, so
    the headers are read again here rather than carried along).

    Args:
      exclude: None: every file must be readable (a damaged one is an error). Else the files the study was
        read without (`meta["skipped_files"]`, {"file"} records or paths): those are left out, and so, quietly,
        is any other damaged file (it was reported when the study was read with --skip_damaged).
    Raises:
      DataError naming the folder if no file of that series is found (or a file is damaged, `_scan_series`).
    """
    if exclude is None:
        items = _scan_series(Path(folder)).get(str(series_uid))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            items = _scan_series(Path(folder), skipped=[]).get(str(series_uid))
        left_out = {Path(e["file"] if isinstance(e, dict) else e) for e in exclude}
        items = [(path, ds) for path, ds in items or [] if path not in left_out]
    if not items:
        raise DataError(f"{folder}: no DICOM file of series {series_uid} (the folder changed since it was read?)")
    return [ds for _, ds in items]


def _is_dicomdir(ds: Dataset) -> bool:
    """Whether `ds` is a DICOMDIR (Media Storage Directory Storage, SOP class 1.2.840.10008.1.3.10)."""
    meta = getattr(ds, "file_meta", None)
    sop = str(getattr(meta, "MediaStorageSOPClassUID", "") if meta is not None else "")
    return sop == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds


def check_series_agree(items: list[tuple[Path, Dataset]], where: str) -> None:
    """Raise DataError naming two files when the series-level SUV inputs (`series_suv_inputs`: Units,
    DecayCorrection, weight, SUVType, the radiopharmaceutical's dose, start (date)time and half-life, ...) differ
    between slices; per-slice RescaleSlope and acquisition times legitimately differ."""
    first_path, first = items[0][0], series_suv_inputs(items[0][1])
    for path, ds in items[1:]:
        tags = series_suv_inputs(ds)
        k = next((k for k in [*first, *tags.keys() - first.keys()] if first.get(k) != tags.get(k)), None)
        if k is not None:
            raise DataError(
                f"{where}: {k} differs between slices ({first.get(k, '')!r} in {first_path.name}, "
                f"{tags.get(k, '')!r} in {path.name}); SUV needs one value per series: export the series "
                "again or correct the tag"
            )


def _series_label(ds: Dataset, n: int | None = None) -> str:
    """Human-readable name of the series `ds` belongs to, for messages."""
    mod = str(ds.get("Modality", "?"))
    desc = str(ds.get("SeriesDescription", "")).strip()
    uid = str(ds.get("SeriesInstanceUID", "?"))
    count = f", {n} files" if n is not None else ""
    return f"{_MODALITY_NAMES.get(mod, mod)} series {desc!r} (SeriesInstanceUID {uid}{count})"


def _choose_series(series: dict[str, list[tuple[Path, Dataset]]], modality: str, folder: Path) -> str:
    """UID of the series of `modality` to use; DataError if none, warning if several."""
    cands = [uid for uid, items in series.items() if str(items[0][1].Modality).upper() == modality]
    if not cands:
        found = sorted({str(items[0][1].Modality) for items in series.values()})
        raise DataError(
            f"no {_MODALITY_NAMES[modality]} series in {folder} (modalities found: "
            f"{', '.join(found) or 'none'}); a study folder needs one PT and one CT series"
        )
    if modality == "PT":  # prefer quantitative (Bq/ml) series over e.g. non-attenuation-corrected counts
        bqml = [u for u in cands if str(series[u][0][1].get("Units", "")).strip().upper() == "BQML"]
        cands = bqml or cands
    cands.sort(key=lambda u: (-len(series[u]), u))
    chosen = cands[0]
    if len(cands) > 1:
        others = "; ".join(_series_label(series[u][0][1], len(series[u])) for u in cands[1:])
        chosen_label = _series_label(series[chosen][0][1], len(series[chosen]))
        warnings.warn(
            DataWarning(
                f"{folder}: {len(cands)} {_MODALITY_NAMES[modality]} series found; using {chosen_label} "
                f"(most slices) and ignoring {others}"
            ),
            stacklevel=3,
        )
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Slice stacking and geometry


def _floats(ds: Dataset, keyword: str, n: int, label: str, path: Path) -> np.ndarray:
    if keyword not in ds or ds.get(keyword) is None:
        raise DataError(f"{path}: {label}: {keyword} is missing; cannot place the slice in space")
    raw = ds.get(keyword)
    try:
        v = np.asarray(
            [
                float(x)
                for x in (
                    raw
                    if isinstance(raw, (list, tuple)) or hasattr(raw, "__iter__") and not isinstance(raw, str)
                    else [raw]
                )
            ],
            dtype=np.float64,
        )
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label}: {keyword} = {raw!r} is not numeric") from e
    if v.shape != (n,) or not np.all(np.isfinite(v)):
        raise DataError(f"{path}: {label}: {keyword} = {list(v)} is invalid (need {n} finite numbers)")
    return v


class SeriesStack(NamedTuple):
    """A series read into a volume (`stack_series`): volume (z, y, x) float32, its Geometry, the slice headers in
    position order, and whether the slices were resampled onto a regular grid along the stack."""

    volume: np.ndarray
    geometry: Geometry
    headers: list
    resampled: bool


def stack_series(items: list[tuple[Path, Dataset]], slice_factors=None, *, skipped: list | None = None) -> SeriesStack:
    """Read one single-frame image series into a volume.

    Slice positions along the stack normal follow the established converters' rules (`_regular_positions`):
    a straight-line fit within max(SLICE_FIT_TOL_MM, SLICE_FIT_TOL_FRACTION x step) of every slice is a regular
    grid (multi-bed PET whose steps vary slightly at the bed joins); a gap of more than 1.5 steps is a
    missing-slice error; anything else is resampled (linearly, along the stack) onto a regular grid with the
    median step, with a `DataWarning` naming the irregular slices.

    Args:
      items: [(path, header), ...] of one series (any order).
      slice_factors: optional `f(headers in position order) -> (n,) factors` applied to each slice before any
        resampling along the stack (per-slice SUV factors).
      skipped: None: a slice whose pixel data is damaged (cut short, wrong size) is a `DamagedFile` error. A
        list (--skip_damaged): such slices are left out (`_leave_out`: a warning naming each, recorded in the
        list) and the stack is built from the others, so a slice missing inside the series is still the
        missing-slice error of the geometry rules. Pixel data that cannot be decoded for want of a codec
        plugin is always an error (it is not damage).
    Returns:
      SeriesStack(volume (z, y, x) float32 with each slice's RescaleSlope/Intercept (and factor) applied,
       its Geometry (RAS affine), the slice headers (no pixel data) in position order, resampled: whether the
       slices were resampled along the stack, the volume's slices then no longer matching the headers).
    Raises:
      DataError naming the series/file: fewer than 2 slices, multi-frame object, missing geometry tags,
      inconsistent orientation/size/pixel spacing, duplicate positions, non-constant slice spacing,
      unreadable pixel data.
    """
    label = _series_label(items[0][1], len(items))
    if len(items) < 2:
        raise DataError(f"{items[0][0].parent}: {label} has {len(items)} slice; need a 3-D series")
    iop, ps, (rows, cols), ipps = _slice_geometry(items, label)
    normal = _stack_normal(items, label, iop)
    order, pos = _slice_order(items, label, normal, ipps)
    grid = _regular_positions(items, label, order, pos)
    vol, datasets, damaged = _read_pixels(items, order, label, rows, cols, collect=skipped is not None)
    if damaged:
        for error in damaged:
            _leave_out(error, skipped)
        bad = {error.path for error in damaged}
        kept = [it for it in items if it[0] not in bad]
        if len(kept) < 2:
            raise DataError(
                f"{items[0][0].parent}: {label}: only {len(kept)} of {len(items)} slices readable (first damaged: "
                f"{damaged[0].path}: {damaged[0].reason}); export the series again"
            )
        return stack_series(kept, slice_factors)  # read again without them (the damaged ones are gone)
    if slice_factors is not None:
        vol = (vol.astype(np.float64) * np.asarray(slice_factors(datasets), np.float64)[:, None, None]).astype(
            np.float32
        )
    first = ipps[order[0]]
    if grid is None:
        return SeriesStack(vol, _series_geometry(iop, ps, first, ipps[order[-1]], vol.shape, label), datasets, False)
    vol = _resample_slices(vol, pos, grid)
    last = first + normal * (grid[-1] - grid[0])
    return SeriesStack(vol, _series_geometry(iop, ps, first, last, vol.shape, label), datasets, True)


def _slice_geometry(items: list[tuple[Path, Dataset]], label: str):
    """The series' common ImageOrientationPatient (6,), PixelSpacing (row, column) mm, (Rows, Columns) and every
    slice's ImagePositionPatient ((n, 3) mm, in `items` order). Raises DataError for multi-frame objects,
    missing tags or slices that differ in orientation, spacing or size."""
    iop0 = ps0 = rc0 = None
    ipps = []
    for path, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(
                f"{path}: {label} is a multi-frame (enhanced) object; export it as one file per "
                "slice (classic single-frame images)"
            )
        iop = _floats(ds, "ImageOrientationPatient", 6, label, path)
        ipp = _floats(ds, "ImagePositionPatient", 3, label, path)
        ps = _floats(ds, "PixelSpacing", 2, label, path)
        rc = (int(ds.Rows), int(ds.Columns))
        if iop0 is None:
            iop0, ps0, rc0 = iop, ps, rc
        elif not (np.allclose(iop, iop0, atol=1e-4) and np.allclose(ps, ps0, atol=1e-4) and rc == rc0):
            raise DataError(
                f"{path}: {label}: slices differ in orientation, pixel spacing or size "
                f"({list(iop)}, {list(ps)}, {rc} vs {list(iop0)}, {list(ps0)}, {rc0}); "
                "the series mixes several acquisitions"
            )
        ipps.append(ipp)
    return iop0, ps0, rc0, np.asarray(ipps)


SLICE_FIT_TOL_MM = 0.1
"""Slices within max(this, SLICE_FIT_TOL_FRACTION x step) of a straight-line fit of their positions form a
regular grid (as dicom2nifti and SimpleITK accept multi-bed PET whose steps differ slightly at bed joins)."""
SLICE_FIT_TOL_FRACTION = 0.05
MISSING_SLICE_STEPS = 1.5
"""A gap between neighbouring slices of more than this many median steps is a missing slice (an error)."""


def _stack_normal(items: list[tuple[Path, Dataset]], label: str, iop: np.ndarray) -> np.ndarray:
    """The slice normal (row x column direction, LPS). Raises DataError if the orientation is not orthonormal."""
    normal = np.cross(iop[:3], iop[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(
            f"{items[0][0].parent}: {label}: ImageOrientationPatient {list(iop)} is not two "
            "orthonormal direction vectors"
        )
    return normal


def _slice_order(items: list[tuple[Path, Dataset]], label: str, normal: np.ndarray, ipps: np.ndarray):
    """(indices of `items` sorted along the normal, their positions (mm) in that order). Raises DataError for two
    slices at one position."""
    positions = ipps @ normal
    order = np.argsort(positions, kind="stable")
    pos = positions[order]
    steps = np.diff(pos)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise DataError(
            f"{items[order[k]][0]} and {items[order[k + 1]][0]}: {label}: two slices at the same "
            f"position {pos[k]:.3f} mm; the series mixes several acquisitions"
        )
    return order, pos


def _regular_positions(
    items: list[tuple[Path, Dataset]], label: str, order: np.ndarray, pos: np.ndarray
) -> np.ndarray | None:
    """None when the sorted slice positions `pos` (mm) form a regular grid; otherwise the regular positions to
    resample onto (first to last slice, median step), after a `DataWarning` naming the irregular slices.

    Raises DataError naming the neighbouring files when a gap exceeds MISSING_SLICE_STEPS median steps.
    """
    k = np.arange(len(pos))
    slope, intercept = np.polyfit(k, pos, 1)
    tol = max(SLICE_FIT_TOL_MM, SLICE_FIT_TOL_FRACTION * abs(slope))
    if np.max(np.abs(pos - (intercept + slope * k))) <= tol:
        return None
    steps = np.diff(pos)
    med = float(np.median(steps))
    if np.any(steps > MISSING_SLICE_STEPS * med):
        i = int(np.argmax(steps))
        raise DataError(
            f"{items[order[i]][0]} and {items[order[i + 1]][0]}: {label}: missing slice(s) between "
            f"positions {pos[i]:.2f} and {pos[i + 1]:.2f} mm (a gap of {steps[i]:.2f} mm among "
            f"{med:.2f} mm steps); export the complete series"
        )
    odd = [str(items[order[i + 1]][0].name) for i in np.flatnonzero(np.abs(steps - med) > tol)]
    n_new = int(round((pos[-1] - pos[0]) / med)) + 1
    warnings.warn(
        DataWarning(
            f"{items[0][0].parent}: {label}: slice spacing varies (between {steps.min():.3f} and {steps.max():.3f} mm; "
            f"irregular at {', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}); resampled linearly onto "
            f"{n_new} slices at {(pos[-1] - pos[0]) / (n_new - 1):.3f} mm"
        ),
        stacklevel=3,
    )
    return np.linspace(pos[0], pos[-1], n_new)


def _resample_slices(vol: np.ndarray, pos: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of the (z, y, x) stack at slice positions `pos` (mm, increasing) onto `grid` (mm)."""
    f = np.interp(grid, pos, np.arange(len(pos), dtype=np.float64))
    i0 = np.clip(np.floor(f).astype(int), 0, len(pos) - 2)
    w = (f - i0).astype(np.float32)[:, None, None]
    return ((1.0 - w) * vol[i0] + w * vol[i0 + 1]).astype(np.float32)


def _is_compressed(path: Path) -> bool:
    """Whether the file's transfer syntax is a compressed one (False when that cannot be read)."""
    try:
        return bool(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed)
    except Exception:  # noqa: BLE001 - a best guess for the advice
        return False


def _read_pixels(
    items: list[tuple[Path, Dataset]], order: np.ndarray, label: str, rows: int, cols: int, collect: bool = False
):
    """(volume (z, y, x) float32 with each slice's RescaleSlope/Intercept applied, the pixel-free headers in
    volume order, damaged: [DamagedFile, ...]). A damaged slice file (`_slice_values`) raises, or, with
    `collect`, is listed in `damaged`; pixel data that cannot be decoded for another reason always raises."""
    vol = np.empty((len(items), rows, cols), dtype=np.float32)
    datasets, damaged = [], []
    for z, i in enumerate(order):
        path = items[i][0]
        try:
            vol[z] = _slice_values(path, label, rows, cols)
        except DamagedFile as e:
            if not collect:
                raise
            damaged.append(e)
        datasets.append(items[i][1])
    return vol, datasets, damaged


def _slice_values(path: Path, label: str, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float64 values of one slice file (RescaleSlope/Intercept applied).

    Raises DamagedFile for uncompressed pixel data of the wrong length or shape (a file cut short), and a
    plain DataError naming the file when a compressed transfer syntax lacks its codec plugin."""
    try:
        ds = pydicom.dcmread(path)
        pix = ds.pixel_array
    except Exception as e:  # pixel decoding can fail in many ways (codec plugins missing, truncation)
        if _is_compressed(path):
            raise DataError(
                f"{path}: {label}: cannot decode pixel data ({type(e).__name__}: {e}); install pydicom's pixel "
                "plugins for this compression (pylibjpeg, gdcm) or export uncompressed"
            ) from e
        raise DamagedFile(path, f"{label}: pixel data cut short or damaged ({type(e).__name__}: {e})") from e
    if pix.shape != (rows, cols):
        raise DamagedFile(path, f"{label}: pixel array shape {pix.shape} != Rows x Columns {(rows, cols)}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pix.astype(np.float64) * slope + intercept


def _series_geometry(
    iop: np.ndarray, ps: np.ndarray, first: np.ndarray, last: np.ndarray, shape: tuple, label: str
) -> Geometry:
    """The RAS Geometry of a sorted series: voxel (i=column, j=row, k=slice) -> IPP_first + i*dc*row_cos +
    j*dr*col_cos + k*(IPP_last - IPP_first)/(n - 1), in LPS, then flipped to RAS."""
    dr, dc = ps
    a = np.eye(4)
    a[:3, 0] = iop[:3] * dc
    a[:3, 1] = iop[3:] * dr
    a[:3, 2] = (last - first) / (shape[0] - 1)
    a[:3, 3] = first
    a[:2, :] *= -1.0  # LPS -> RAS
    return Geometry(shape, a).validate(label)


# --------------------------------------------------------------------------------------------------------------
# Study


MIN_CT_COVERAGE = 0.9
"""Fraction of the PET's axial extent the CT must cover (else an error, or a warning with allow_partial_ct)."""


def _axial_range(geom: Geometry, direction: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) position (mm) along `direction` of the centres of the first and last slice of `geom`."""
    a = np.asarray(geom.affine, dtype=np.float64)
    ends = [a @ np.array([0.0, 0.0, k, 1.0]) for k in (0, geom.shape[0] - 1)]
    p = sorted(float(e[:3] @ direction) for e in ends)
    return p[0], p[1]


def ct_axial_coverage(ct_geom: Geometry, pet_geom: Geometry) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """(fraction 0..1 of the PET's axial extent that the CT's slice range covers, PET range, CT range), the
    ranges in mm from the first to the last slice centre along the PET's slice axis."""
    a = np.asarray(pet_geom.affine, dtype=np.float64)
    direction = a[:3, 2] / np.linalg.norm(a[:3, 2])
    (p0, p1), (c0, c1) = _axial_range(pet_geom, direction), _axial_range(ct_geom, direction)
    if p1 - p0 <= 0:
        fraction = 1.0 if c0 <= p0 <= c1 else 0.0
    else:
        fraction = max(0.0, min(p1, c1) - max(p0, c0)) / (p1 - p0)
    return fraction, (p0, p1), (c0, c1)


def _check_ct_coverage(ct_geom: Geometry, pet_geom: Geometry, where: str, allow: bool) -> float:
    """The CT's coverage of the PET (`ct_axial_coverage`); below MIN_CT_COVERAGE a DataError naming both ranges,
    or with `allow` a DataWarning."""
    coverage, (p0, p1), (c0, c1) = ct_axial_coverage(ct_geom, pet_geom)
    if coverage >= MIN_CT_COVERAGE:
        return coverage
    msg = (
        f"{where}: the CT covers {100 * coverage:.0f} % of the PET's axial extent (PET {p0:.1f} to {p1:.1f} mm, "
        f"CT {c0:.1f} to {c1:.1f} mm along the PET slice axis; need {100 * MIN_CT_COVERAGE:.0f} %)"
    )
    if not allow:
        raise DataError(
            msg + "; give the CT of the same bed range, or pass --allow_partial_ct to fill the "
            "uncovered PET slices with air"
        )
    warnings.warn(
        DataWarning(msg + "; the uncovered PET slices get air (-1024 HU), as --allow_partial_ct asks"), stacklevel=3
    )
    return coverage


def read_dicom_study(folder: str | os.PathLike, *, allow_partial_ct: bool = False, skip_damaged: bool = False) -> Case:
    """Read a DICOM PET/CT study folder into a Case on the PET grid (SUVbw, CT in HU, seg None).

    Steps: find the series (`_scan_series`; the largest PT and CT series when there are several) -> check they
    belong to one patient -> the PET in SUVbw (`_pet_suv`: SUV tags checked on every header before any pixel
    is read) -> the CT, checked to cover the PET (`_check_ct_coverage`) and resampled onto the PET grid -> meta.

    Args:
      folder: directory searched recursively for DICOM files (names and extensions do not matter).
      allow_partial_ct: accept a CT covering less than MIN_CT_COVERAGE of the PET's axial extent (a warning;
        the uncovered PET slices get air, -1024 HU; `meta["ct_coverage"]` records the fraction). Default: an error.
      skip_damaged: leave out files that cannot be parsed or decoded, with a `DataWarning` naming each
        (`meta["skipped_files"]` lists them); a slice so missing inside a series is still a missing-slice error.
        Default: an error naming the first damaged file.
    Returns:
      Case(case_id=folder name, ct float32 HU resampled onto the PET grid if needed (outside -1024),
      suv float32, seg=None, geometry=PET grid, meta with patient/series/SUV details).
    Raises:
      DataError naming the folder/series: no DICOM files, no PT or no CT series, PET and CT of different
      patients (PatientID), bad geometry, or any SUV check of `suv_factor`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; give the folder holding the PET and CT DICOM series")
    skipped: list | None = [] if skip_damaged else None  # files left out under --skip_damaged
    series = _scan_series(folder, skipped)
    if not series:
        raise DataError(f"no DICOM files in {folder}; expected a PET (PT) and a CT series")
    pt_uid, ct_uid = _choose_series(series, "PT", folder), _choose_series(series, "CT", folder)
    _check_same_patient(series[pt_uid][0][1], series[ct_uid][0][1], folder)
    suv, pet_geom, pet_ds, pet_resampled, params = _pet_suv(series[pt_uid], folder, skipped)
    ct, ct_geom, ct_ds, _ = stack_series(series[ct_uid], skipped=skipped)
    coverage = _check_ct_coverage(ct_geom, pet_geom, f"{folder}", allow_partial_ct)
    ct_resampled = not ct_geom.same_grid(pet_geom)
    if ct_resampled:
        ct = resample_to_grid(ct, ct_geom, pet_geom, order=1, cval=CT_OUTSIDE_HU)
    h = pet_ds[0]
    meta = {
        "source": "dicom",
        "patient_id": str(h.get("PatientID", "")),
        "patient_sex": str(h.get("PatientSex", "")),
        "patient_birth_date": str(h.get("PatientBirthDate", "")),
        "study_date": str(h.get("StudyDate", "")),
        "study_instance_uid": str(h.get("StudyInstanceUID", "")),
        "pet_series_uid": pt_uid,
        "ct_series_uid": ct_uid,
        "pet_series_description": str(h.get("SeriesDescription", "")),
        "ct_series_description": str(ct_ds[0].get("SeriesDescription", "")),
        "manufacturer": str(h.get("Manufacturer", "")),
        "ct_geometry": ct_geom.to_json(),
        "ct_resampled_to_pet": bool(ct_resampled),
        "pet_slices_resampled": bool(pet_resampled),
        "ct_coverage": round(float(coverage), 4),
        "skipped_files": skipped or [],
        **params,
    }
    return Case(folder.name, ct, suv, None, pet_geom, meta)


def _check_same_patient(pt_h: Dataset, ct_h: Dataset, folder: Path) -> None:
    """DataError when the PET and CT headers name different patients; a log warning for different studies."""
    if str(pt_h.get("PatientID", "")) != str(ct_h.get("PatientID", "")):
        raise DataError(
            f"{folder}: the PET and CT series belong to different patients (PatientID "
            f"{pt_h.get('PatientID', '')!r} vs {ct_h.get('PatientID', '')!r}); give one study per folder"
        )
    if str(pt_h.get("StudyInstanceUID", "")) != str(ct_h.get("StudyInstanceUID", "")):
        warnings.warn(
            DataWarning(
                f"{folder}: PET and CT series come from different studies (StudyInstanceUID "
                f"{pt_h.get('StudyInstanceUID', '')} vs {ct_h.get('StudyInstanceUID', '')})"
            ),
            stacklevel=3,
        )


def _pet_suv(items: list[tuple[Path, Dataset]], folder: Path, skipped: list | None):
    """(suv (z, y, x) float32 SUVbw, Geometry, headers in volume order, slices resampled, SUV parameters) of
    the PET series `items`. The series-level SUV tags are checked on every header before any pixel is read
    (`check_series_agree`, `suv_parameters`); DecayCorrection NONE applies each slice's own factor before any
    resampling along the stack (then `suv_factor` in the parameters is None: it varies by slice)."""
    label = f"{folder}: {_series_label(items[0][1], len(items))}"
    check_series_agree(items, label)
    acq = [t for t in (acquisition_datetime(ds) for _, ds in items) if t is not None]
    earliest = min(acq) if acq else None
    suv_parameters(items[0][1], earliest_acquisition=earliest, where=label)  # fail fast, before any pixel
    if str(items[0][1].get("DecayCorrection", "")).strip().upper() == "NONE":
        factors = lambda hs: [suv_factor(ds, where=label) for ds in hs]  # noqa: E731 - one use, named by its role
        suv, geom, datasets, resampled = stack_series(items, slice_factors=factors, skipped=skipped)
        params = suv_parameters(datasets[0], earliest_acquisition=earliest, where=label)
        return suv, geom, datasets, resampled, {**params, "suv_factor": None}
    pet, geom, datasets, resampled = stack_series(items, skipped=skipped)
    params = suv_parameters(datasets[0], earliest_acquisition=earliest, where=label)  # the first slice's, as applied
    suv = (pet.astype(np.float64) * params["suv_factor"]).astype(np.float32)
    return suv, geom, datasets, resampled, params
