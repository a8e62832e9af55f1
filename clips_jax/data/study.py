"""Study loading: one entry point for NIfTI (autoPET layout) and DICOM study folders, and study discovery.

NIfTI study folder (autoPET layout, also what `clips_jax.data.export` writes):
    <case_id>/CTres.nii.gz   CT in HU (or CT.nii.gz; `.nii` also accepted)
    <case_id>/SUV.nii.gz     SUVbw (defines the PET grid)
    <case_id>/SEG.nii.gz     optional lesion mask (> 0 = lesion), must be on the PET grid
    <case_id>/meta.json      optional metadata (copied into Case.meta)
DICOM study folder: any folder whose files (recursively) include a PT and a CT series (see `dicom.py`).

Unlike TMTV-Net (which compared array shapes only), the CT is resampled onto the PET grid whenever the two
grids differ by geometry (shape or affine), trilinear with outside value -1024 HU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from clips_jax.data.case import Case
from clips_jax.data.dicom import CT_OUTSIDE_HU, dicom_modalities, read_dicom_study
from clips_jax.data.nifti import load_nifti
from clips_jax.data.resample import resample_to_grid
from clips_jax.errors import DataError
from clips_jax.fileio import safe_id

CT_NAMES = ("CTres.nii.gz", "CT.nii.gz", "CTres.nii", "CT.nii")
SUV_NAMES = ("SUV.nii.gz", "SUV.nii")
SEG_NAMES = ("SEG.nii.gz", "SEG.nii")
META_NAME = "meta.json"
LAYOUT_HELP = (
    "expected either a NIfTI study folder (CTres.nii.gz or CT.nii.gz, SUV.nii.gz, optional "
    "SEG.nii.gz) or a folder holding a PET (PT) and a CT DICOM series"
)


def _first(folder: Path, names) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def is_nifti_study(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a CT (CTres/CT) and an SUV NIfTI file."""
    folder = Path(folder)
    return folder.is_dir() and _first(folder, CT_NAMES) is not None and _first(folder, SUV_NAMES) is not None


def is_dicom_study(folder: str | os.PathLike) -> bool:
    """True if the DICOM files found recursively in `folder` include both a PT and a CT image."""
    folder = Path(folder)
    return folder.is_dir() and {"PT", "CT"} <= dicom_modalities(folder)


def load_nifti_study(folder: str | os.PathLike) -> Case:
    """Load an autoPET-style NIfTI study folder into a Case on the PET (SUV) grid.

    Args:
      folder: directory with CTres.nii.gz (or CT.nii.gz), SUV.nii.gz, optional SEG.nii.gz and meta.json.
    Returns:
      Case(case_id=folder name, ct float32 HU on the SUV grid, suv float32, seg uint8 {0,1} or None,
      geometry=SUV grid, meta = meta.json contents (or {}) plus "source" (default "nifti") and
      "ct_resampled_to_pet").
    Raises:
      DataError naming the file: missing CT/SUV, unreadable/truncated or NaN image (from `load_nifti`),
      SEG on another grid (both shapes given), SEG with negative or non-integer values, bad meta.json.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; {LAYOUT_HELP}")
    ct_path, suv_path = _first(folder, CT_NAMES), _first(folder, SUV_NAMES)
    if ct_path is None or suv_path is None:
        missing = " and ".join(
            n for n, p in (("CTres.nii.gz/CT.nii.gz", ct_path), ("SUV.nii.gz", suv_path)) if p is None
        )
        raise DataError(f"{folder}: {missing} not found; {LAYOUT_HELP}")
    suv, geom = load_nifti(suv_path)
    ct, ct_geom = load_nifti(ct_path)
    if not ct_geom.same_grid(geom):
        ct = resample_to_grid(ct, ct_geom, geom, order=1, cval=CT_OUTSIDE_HU)
    seg = None
    seg_path = _first(folder, SEG_NAMES)
    if seg_path is not None:
        raw, seg_geom = load_nifti(seg_path, dtype=np.float32)
        if not seg_geom.same_grid(geom):
            why = "shape" if seg_geom.shape != geom.shape else "affine (position/orientation/spacing)"
            raise DataError(
                f"{seg_path}: mask grid differs from the PET grid of {suv_path.name} in {why}: "
                f"SEG shape {seg_geom.shape}, SUV shape {geom.shape} (z, y, x); resample the mask "
                "onto the PET grid"
            )
        if raw.size and raw.min() < 0:
            raise DataError(
                f"{seg_path}: mask has negative values (min {raw.min()}); expected 0 = background, > 0 = lesion"
            )
        if not np.all(raw == np.round(raw)):
            raise DataError(
                f"{seg_path}: mask has non-integer values; expected a label image (0 = background, "
                "> 0 = lesion), not probabilities"
            )
        seg = (raw > 0).astype(np.uint8)
    meta: dict = {}
    meta_path = folder / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_path}: cannot read metadata ({e}); fix or delete the file") from e
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object")
    meta.setdefault("source", "nifti")  # an exported DICOM study keeps "dicom"
    meta["ct_resampled_to_pet"] = bool(meta.get("ct_resampled_to_pet")) or not ct_geom.same_grid(geom)
    return Case(folder.name, ct, suv, seg, geom, meta)


def load_study(path: str | os.PathLike, *, allow_partial_ct: bool = False, skip_damaged: bool = False) -> Case:
    """Load a study folder of either layout (NIfTI checked first, then DICOM).

    `allow_partial_ct`: accept a DICOM CT covering less than 90 % of the PET's axial extent (a warning);
    `skip_damaged`: leave out DICOM files that cannot be read, with a warning naming each (see
    `dicom.read_dicom_study`). Both concern DICOM input only.

    Raises:
      DataError if `path` is not a directory or is neither layout (message says what is expected).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; {LAYOUT_HELP}")
    if is_nifti_study(path):
        return load_nifti_study(path)
    mods = dicom_modalities(path)
    if mods:
        # read_dicom_study reports which modality is missing
        return read_dicom_study(path, allow_partial_ct=allow_partial_ct, skip_damaged=skip_damaged)
    raise DataError(f"{path}: not a study folder; {LAYOUT_HELP}")


def why_not_a_study(folder: str | os.PathLike) -> str | None:
    """None if `folder` is a study (NIfTI or DICOM PET + CT); else why not, in words a user can act on."""
    folder = Path(folder)
    if is_nifti_study(folder) or is_dicom_study(folder):
        return None
    if any(folder.glob("*.nii*")):
        return "NIfTI files, but not a CT (CTres.nii.gz or CT.nii.gz) and an SUV (SUV.nii.gz) image"
    mods = dicom_modalities(folder)
    if mods == {"CT"} or ("CT" in mods and "PT" not in mods):
        return "DICOM CT but no PET (PT) series"
    if "PT" in mods:
        return "DICOM PET (PT) but no CT series"
    if mods:
        return f"DICOM of modalities {sorted(mods)} but no PET (PT) and CT series"
    return "no DICOM or NIfTI study files"


def _subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def skipped_folders(root: str | os.PathLike, studies: list[Path]) -> list[tuple[Path, str]]:
    """The folders of a batch `root` that `find_studies(root)` looked at and did not return (`studies`), with
    the reason (`why_not_a_study`), so batch commands can list every folder they skip: the immediate
    sub-folders that neither are nor hold a study, and the other sub-folders of those that hold NIfTI studies
    (autoPET's patient folders). Sorted by path; empty when `root` itself is the study."""
    root = Path(root)
    if studies == [root]:
        return []
    holders = {p.parent for p in studies if p.parent != root}
    looked_at = [p for p in _subfolders(root) if p not in holders] + [q for h in holders for q in _subfolders(h)]
    return [(p, why_not_a_study(p)) for p in sorted(looked_at) if p not in studies]


def find_studies(root: str | os.PathLike) -> list[Path]:
    """Study folders under `root`: `root` itself if it is a study, else the studies among its sub-folders or,
    when none is, the NIfTI studies among theirs (autoPET: `DATA/<patient>/<study date>/`).

    Rules: a NIfTI study `root` -> [root]. Otherwise the immediate sub-folders that are studies (NIfTI, or
    DICOM with both PT and CT files somewhere below), sorted by name, if there are at least two; when none
    is, the NIfTI studies among their sub-folders (autoPET), sorted by path, if there are at least two. A DICOM
    `root` whose PT/CT files are spread over its sub-folders (e.g. root/PT, root/CT) -> [root]; so is a
    DICOM root with a single study sub-folder (one wrapper level). A single non-DICOM study -> [that study].
    Each study's id in every command's outputs is `study_id(root, study)`.

    Raises:
      DataError if `root` is not a directory or no study is found (message says the expected layout).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; {LAYOUT_HELP}")
    if is_nifti_study(root):
        return [root]
    subs = _subfolders(root)
    studies = [p for p in subs if is_nifti_study(p) or is_dicom_study(p)]
    if not studies:  # autoPET's tree: patient folders holding one NIfTI study folder per study date
        studies = [q for p in subs for q in _subfolders(p) if is_nifti_study(q)]
    if len(studies) >= 2:
        return studies
    if is_dicom_study(root):
        return [root]
    if studies:
        return studies
    raise DataError(
        f"no study found in {root}: {LAYOUT_HELP}, either {root} itself, its immediate sub-folders or, for NIfTI, "
        "their sub-folders (autoPET: DATA/<patient>/<study date>/)"
    )


def study_id(root: str | os.PathLike, study: str | os.PathLike) -> str:
    """The id of a study folder found under the batch folder `root` (`find_studies`): its path relative to
    `root`, each component made safe (`clips_jax.fileio.safe_id`) and joined with "__" (autoPET
    `PETCT_0af7/08-12-2002-NA-PET-CT Ganzkoerper` -> `PETCT_0af7__08-12-2002-NA-PET-CT_Ganzkoerper`); `root`
    itself -> its own name, made safe. Paths are made absolute without following links, so a linked study
    folder keeps the name it has under `root`.
    `clips-predict` names its outputs, `clips-prepare` its cases and `clips-evaluate` the cases of a nested
    folder by it, so one study has one id in all three."""
    return "__".join(id_parts(root, study))


def id_parts(root: str | os.PathLike, study: str | os.PathLike) -> tuple[str, ...]:
    """The components of `study_id(root, study)`, each made safe; the first names the patient in autoPET's tree
    (`clips-prepare` keeps a patient's studies in one split)."""
    root, study = Path(os.path.abspath(root)), Path(os.path.abspath(study))
    return tuple(safe_id(p) for p in study.relative_to(root).parts or (root.name,))


def input_notes(meta: dict) -> list[str]:
    """What a reader of a report (`clips-predict`) or a case store (`clips-prepare`) must know about how a
    study was read, from its `Case.meta`, in words (empty when nothing):
    a CT covering only part of the PET (--allow_partial_ct), damaged files left out (--skip_damaged), PET
    slices resampled onto a regular grid, the CT resampled onto the PET grid, and the SUV conversion's own
    notes (SUVType conversions, a dose read as MBq, the reference time used; `clips_jax.data.suv`)."""
    notes = []
    coverage = meta.get("ct_coverage")
    if coverage is not None and coverage < 1.0:
        notes.append(f"the CT covers {100 * coverage:.0f} % of the PET's axial extent; the rest was filled with air")
    notes += [f"file left out (--skip_damaged): {f['file']}: {f['reason']}" for f in meta.get("skipped_files") or []]
    if meta.get("pet_slices_resampled"):
        notes.append("the PET slices were irregularly spaced and were resampled onto a regular grid")
    if meta.get("ct_resampled_to_pet"):
        notes.append("the CT was resampled onto the PET grid (linear)")
    notes += [str(n) for n in meta.get("notes") or []]
    return notes
