"""Convert a DICOM PET/CT study into an autoPET-style NIfTI study folder.

Examples:
    clips-export --dicom /data/dicom/patient_001 --out nifti/patient_001
    python -m clips_jax.data.export --dicom STUDY_DIR --out OUT_DIR --overwrite

writes OUT_DIR/CTres.nii.gz (CT in HU on the PET grid, float32), OUT_DIR/SUV.nii.gz (SUVbw, float32) and
OUT_DIR/meta.json (patient/series/SUV-conversion details and the PET geometry). The whole folder is written
atomically: it appears complete or not at all. The result loads with `clips_jax.data.study.load_study`,
giving the same arrays and geometry as reading the DICOM study directly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from clips_jax import cli
from clips_jax.data.case import Case
from clips_jax.data.nifti import save_nifti
from clips_jax.data.study import META_NAME, find_studies, load_study
from clips_jax.errors import DataError
from clips_jax.fileio import atomic_dir


def export_case(case: Case, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `case` as an autoPET-style NIfTI study folder, atomically.

    Args:
      case: the study (arrays on `case.geometry`).
      out_dir: folder to create: CTres.nii.gz, SUV.nii.gz (float32), SEG.nii.gz (uint8, only if `case.seg`),
        meta.json (case.meta + case_id + geometry).
      overwrite: replace an existing `out_dir` (after the new one is complete).
    Returns:
      `out_dir` as a Path.
    Raises:
      FileExistsError if `out_dir` exists and not `overwrite`.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_nifti(tmp / "CTres.nii.gz", case.ct, case.geometry)
        save_nifti(tmp / "SUV.nii.gz", case.suv, case.geometry)
        if case.seg is not None:
            save_nifti(tmp / "SEG.nii.gz", case.seg, case.geometry)
        meta = {**dict(case.meta), "case_id": case.case_id, "geometry": case.geometry.to_json()}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return out_dir


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_string(
        "dicom",
        None,
        "Study folder holding one PET (PT) and one CT DICOM series (searched recursively; file names do not matter).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out",
        None,
        "Output folder to create (autoPET layout: CTres.nii.gz, SUV.nii.gz, "
        "meta.json; SEG.nii.gz if the study has a mask).",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "overwrite",
        False,
        "Replace --out if it already exists (only after the new folder is complete).",
        flag_values=fv,
    )
    cli.define_study_flags(fv)
    flags.mark_flags_as_required(["dicom", "out"], flag_values=fv)


def run_from_flags(fv) -> int:
    """Export the one study under --dicom; returns 0 (errors: `cli.run_tool`)."""
    studies = find_studies(fv["dicom"].value)
    if len(studies) > 1:
        raise DataError(
            f"{fv['dicom'].value} holds {len(studies)} studies ({', '.join(p.name for p in studies[:5])}"
            f"{', ...' if len(studies) > 5 else ''}); export them one at a time"
        )
    case = load_study(studies[0], **cli.study_options(fv))
    try:
        out = export_case(case, fv["out"].value, overwrite=fv["overwrite"].value)
    except FileExistsError as e:
        raise DataError(f"{fv['out'].value}: already exists; choose another --out or add --overwrite") from e
    print(
        f"{case.case_id}: wrote {out} (grid {case.geometry.shape} (z, y, x), spacing "
        f"{tuple(round(s, 4) for s in case.geometry.spacing_mm)} mm)"
    )
    return 0


def main(argv=None) -> int:
    """`clips-export`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""

    return cli.run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
