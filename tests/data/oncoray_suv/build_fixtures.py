"""Rebuild the oncoray_suv test fixtures from a checkout of https://github.com/oncoray/suv_computation.

    git clone https://github.com/oncoray/suv_computation.git /tmp/suv_computation
    git -C /tmp/suv_computation checkout bf11a080babe1dc298fcd933896ffa94bbd682de
    .venv/bin/python tests/data/oncoray_suv/build_fixtures.py /tmp/suv_computation

For every DRO_<section>_<case>/PT series it keeps slices KEPT_SLICES of the 20 and crops each to rows ROWS and
columns COLS of the 256 x 256 matrix (both spheres, background and a strip of the zero-activity surround). Only
Rows, Columns, ImagePositionPatient (moved to the crop's first voxel, so every voxel keeps its position in
space) and PixelData change; every other element, UIDs included, is copied as it is. license.txt and
DRO/DRO_list.csv are copied unchanged (as LICENSE.txt and DRO_list.csv). The RTSTRUCT and NIfTI mask are not
kept: the script checks that, on the kept slices, the repository's mask is exactly the voxels with a non-zero
stored value, which is what tests/test_dicom_public.py uses as the mask. Output is deterministic.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

SOURCE_COMMIT = "bf11a080babe1dc298fcd933896ffa94bbd682de"
KEPT_SLICES = (9, 10, 11, 12)  # z = 36..48 mm: both spheres; slope change (DRO_1_0); both acquisition times (3_2, 3_4)
ROWS = (120, 136)  # spheres centred on row 128 (radius 5 voxels)
COLS = (64, 168)  # cold sphere at column 98, hot at 158; columns 64-67 lie outside the DRO (zero activity)


def crop_slice(src: Path, dst: Path) -> np.ndarray:
    """Write `src` cropped to ROWS x COLS as `dst`; returns the original (full) stored pixel array."""
    ds = pydicom.dcmread(src)
    full = ds.pixel_array
    if ds.file_meta.TransferSyntaxUID.is_compressed or int(ds.get("NumberOfFrames", 1)) != 1:
        raise SystemExit(f"{src}: expected an uncompressed single-frame image")
    r0, r1 = ROWS
    c0, c1 = COLS
    crop = np.ascontiguousarray(full[r0:r1, c0:c1])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    # Voxel (row r, column c) sits at IPP + c * col_spacing * row_direction + r * row_spacing * column_direction.
    new_ipp = ipp + c0 * col_spacing * iop[:3] + r0 * row_spacing * iop[3:]
    ds.ImagePositionPatient = [float(f"{v:.6g}") for v in new_ipp]
    ds.Rows, ds.Columns = crop.shape
    ds.PixelData = crop.astype(full.dtype.newbyteorder("<")).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return full


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"checkout of oncoray/suv_computation at {SOURCE_COMMIT[:7]}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    src, out = args.source, args.out
    dros = sorted(p for p in (src / "DRO").glob("DRO_*") if p.is_dir())
    if not dros:
        raise SystemExit(f"{src}: no DRO/DRO_* folders; give a checkout of oncoray/suv_computation")
    for dro in dros:
        kept = []
        for k in KEPT_SLICES:
            name = f"pet_{dro.name.lower()}_slice_{k:03d}.dcm"
            kept.append(crop_slice(dro / "PT" / name, out / dro.name / name))
        mask = np.asarray(nib.load(dro / "mask" / "DRO_mask.nii.gz").dataobj)  # (x, y, z) of the 256 x 256 x 20
        mask_zyx = mask.transpose(2, 1, 0)[list(KEPT_SLICES)] > 0
        if not np.array_equal(mask_zyx, np.stack(kept) > 0):
            raise SystemExit(f"{dro}: mask differs from the non-zero voxels on slices {KEPT_SLICES}")
        print(f"{dro.name}: {len(KEPT_SLICES)} slices cropped to {ROWS[1] - ROWS[0]} x {COLS[1] - COLS[0]}")
    shutil.copyfile(src / "license.txt", out / "LICENSE.txt")
    shutil.copyfile(src / "DRO" / "DRO_list.csv", out / "DRO_list.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
