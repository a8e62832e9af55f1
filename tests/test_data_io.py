"""Study loading: NIfTI (autoPET layout) studies, study discovery, Case validation, DICOM -> NIfTI export.

The DICOM study comes from the synthetic writer of tests/test_dicom.py; expected CT values on the PET grid
are derived by hand (pure shifts or exact sub-sampling), not from the resampler.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from test_dicom import write_study

from clips_jax.data.case import Case
from clips_jax.data.dicom import read_dicom_study
from clips_jax.data.export import export_case
from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import save_nifti
from clips_jax.data.study import find_studies, load_nifti_study, load_study
from clips_jax.errors import DataError

PET = Geometry.from_spacing((6, 8, 10), (3.0, 4.0, 4.0), origin_xyz_mm=(-20.0, 10.0, 100.0))


def make_nifti_study(folder, *, ct=None, ct_geom=PET, seg=None, seg_geom=PET, ct_name="CTres.nii.gz"):
    rng = np.random.default_rng(0)
    suv = rng.uniform(0, 10, PET.shape).astype(np.float32)
    if ct is None:
        ct = rng.uniform(-1000, 1000, ct_geom.shape).astype(np.float32)
    save_nifti(folder / "SUV.nii.gz", suv, PET)
    save_nifti(folder / ct_name, ct, ct_geom)
    if seg is not None:
        save_nifti(folder / "SEG.nii.gz", seg, seg_geom)
    return ct, suv


def test_nifti_study_same_grid(tmp_path):
    seg = np.zeros(PET.shape, np.uint8)
    seg[2:4, 3:5, 4:6] = 2  # any value > 0 is lesion
    ct, suv = make_nifti_study(tmp_path / "case7", seg=seg)
    case = load_nifti_study(tmp_path / "case7")
    assert case.case_id == "case7" and case.geometry.same_grid(PET)
    np.testing.assert_array_equal(case.ct, ct)
    np.testing.assert_array_equal(case.suv, suv)
    assert case.seg.dtype == np.uint8
    np.testing.assert_array_equal(case.seg, (seg > 0).astype(np.uint8))
    assert case.meta["ct_resampled_to_pet"] is False


def test_ct_with_same_shape_but_shifted_affine_is_resampled(tmp_path):
    # CT voxel 0 sits on PET voxel 1 along x (origin shifted by one 4 mm voxel): same shape, other grid.
    a = PET.affine_array.copy()
    a[0, 3] += 4.0
    ct_geom = Geometry(PET.shape, a)
    ct, _ = make_nifti_study(tmp_path / "c", ct_geom=ct_geom, ct_name="CT.nii.gz")
    case = load_study(tmp_path / "c")
    np.testing.assert_allclose(case.ct[:, :, 1:], ct[:, :, :-1], atol=1e-3)  # PET x = i <-> CT x = i - 1
    np.testing.assert_array_equal(case.ct[:, :, 0], -1024.0)  # CT index -1: outside
    assert case.meta["ct_resampled_to_pet"] is True


def test_ct_on_finer_grid_is_resampled(tmp_path):
    # CT spacing exactly half of the PET's with the same origin: PET voxel i <-> CT voxel 2i.
    ct_geom = Geometry.from_spacing((12, 16, 20), (1.5, 2.0, 2.0), origin_xyz_mm=PET.origin_mm)
    ct, _ = make_nifti_study(tmp_path / "c", ct_geom=ct_geom)
    case = load_nifti_study(tmp_path / "c")
    assert case.ct.shape == PET.shape
    np.testing.assert_allclose(case.ct, ct[::2, ::2, ::2], atol=1e-3)


def test_seg_errors_name_the_file(tmp_path):
    other = Geometry.from_spacing((6, 8, 9), (3.0, 4.0, 4.0), origin_xyz_mm=PET.origin_mm)
    make_nifti_study(tmp_path / "a", seg=np.zeros(other.shape, np.uint8), seg_geom=other)
    with pytest.raises(DataError, match=r"SEG\.nii\.gz.*\(6, 8, 9\).*\(6, 8, 10\)"):
        load_nifti_study(tmp_path / "a")
    for name, bad, match in (("neg", -1.0, "negative"), ("frac", 0.5, "non-integer")):
        seg = np.zeros(PET.shape, np.float32)
        seg[0, 0, 0] = bad
        make_nifti_study(tmp_path / name, seg=seg)
        with pytest.raises(DataError, match=rf"{name}/SEG\.nii\.gz.*{match}"):
            load_nifti_study(tmp_path / name)


def test_truncated_and_nan_images_name_the_file(tmp_path):
    make_nifti_study(tmp_path / "t")
    p = tmp_path / "t" / "SUV.nii.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t/SUV\.nii\.gz"):
        load_study(tmp_path / "t")
    ct = np.zeros(PET.shape, np.float32)
    ct[1, 2, 3] = np.nan
    make_nifti_study(tmp_path / "n", ct=ct)
    with pytest.raises(DataError, match=r"n/CTres\.nii\.gz.*NaN"):
        load_study(tmp_path / "n")
    # A gzip stream that is valid but too short for the header.
    (tmp_path / "g").mkdir()
    make_nifti_study(tmp_path / "g")
    (tmp_path / "g" / "CTres.nii.gz").write_bytes(gzip.compress(b"\0" * 40))
    with pytest.raises(DataError, match="CTres"):
        load_study(tmp_path / "g")


def test_find_studies_and_layout_errors(tmp_path):
    for name in ("b", "a"):
        make_nifti_study(tmp_path / "root" / name)
    (tmp_path / "root" / "notes").mkdir()
    assert find_studies(tmp_path / "root") == [tmp_path / "root" / "a", tmp_path / "root" / "b"]
    assert find_studies(tmp_path / "root" / "a") == [tmp_path / "root" / "a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no study found in .*empty.*SUV.nii.gz"):
        find_studies(tmp_path / "empty")
    with pytest.raises(DataError, match="not a study folder"):
        load_study(tmp_path / "empty")
    # DICOM: PT/ and CT/ sub-folders of one study -> the study folder itself; two such studies -> both.
    write_study(tmp_path / "dcm" / "p1")
    assert find_studies(tmp_path / "dcm" / "p1") == [tmp_path / "dcm" / "p1"]
    write_study(tmp_path / "dcm" / "p2")
    assert find_studies(tmp_path / "dcm") == [tmp_path / "dcm" / "p1", tmp_path / "dcm" / "p2"]
    # Only half a NIfTI study: the message says what is missing.
    save_nifti(tmp_path / "half" / "SUV.nii.gz", np.zeros(PET.shape, np.float32), PET)
    with pytest.raises(DataError, match="CTres.nii.gz/CT.nii.gz not found"):
        load_nifti_study(tmp_path / "half")


def test_find_studies_reads_autopets_tree_and_names_each_study_once(tmp_path):
    from clips_jax.data.study import skipped_folders, study_id

    root = tmp_path / "FDG-PET-CT-Lesions"
    for patient, date in (("PETCT_b", "2004"), ("PETCT_a", "03-23-2003 PET"), ("PETCT_b", "2001")):
        make_nifti_study(root / patient / date)
    (root / "PETCT_b" / "notes").mkdir()
    studies = find_studies(root)
    assert studies == [root / "PETCT_a" / "03-23-2003 PET", root / "PETCT_b" / "2001", root / "PETCT_b" / "2004"]
    assert [study_id(root, s) for s in studies] == ["PETCT_a__03-23-2003_PET", "PETCT_b__2001", "PETCT_b__2004"]
    assert [p for p, _ in skipped_folders(root, studies)] == [root / "PETCT_b" / "notes"]
    # a flat batch stays flat: a study one level further down is not one of its studies (a copy, an archive)
    flat = tmp_path / "flat"
    for name in ("a", "b", "old/a"):
        make_nifti_study(flat / name)
    assert find_studies(flat) == [flat / "a", flat / "b"]
    assert [p for p, _ in skipped_folders(flat, find_studies(flat))] == [flat / "old"]
    # a linked study folder keeps the name it has in the batch; a study given directly is named as given
    (flat / "linked").symlink_to(tmp_path / "FDG-PET-CT-Lesions" / "PETCT_b" / "2001", target_is_directory=True)
    assert study_id(flat, flat / "linked") == "linked" and study_id(flat / "linked", flat / "linked") == "linked"


def test_case_validation_names_the_case():
    z = np.zeros(PET.shape, np.float32)
    with pytest.raises(DataError, match="case X: suv has shape"):
        Case("X", z, z[:-1], None, PET)
    bad = np.zeros(PET.shape, np.uint8)
    bad[0, 0, 0] = 2
    with pytest.raises(DataError, match="case Y: seg must hold only 0 and 1"):
        Case("Y", z, z, bad, PET)
    c = Case("Z", z.astype(np.float64), z, z.astype(bool), PET)
    assert c.ct.dtype == np.float32 and c.seg.dtype == np.uint8


def test_export_round_trip_dicom_to_nifti(tmp_path):
    write_study(tmp_path / "dcm")
    direct = read_dicom_study(tmp_path / "dcm")
    out = tmp_path / "nifti" / "case1"
    export_case(direct, out)
    assert sorted(p.name for p in out.iterdir()) == ["CTres.nii.gz", "SUV.nii.gz", "meta.json"]
    back = load_study(out)
    np.testing.assert_array_equal(back.ct, direct.ct)
    np.testing.assert_array_equal(back.suv, direct.suv)
    assert back.geometry.same_grid(direct.geometry, atol_mm=1e-4)
    assert back.meta["suv_factor"] == pytest.approx(direct.meta["suv_factor"])
    assert back.meta["source"] == "dicom" and back.meta["patient_id"] == "P001"
    assert json.loads((out / "meta.json").read_text())["geometry"]["shape"] == list(direct.geometry.shape)
    with pytest.raises(FileExistsError):
        export_case(direct, out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_export_cli(tmp_path):
    write_study(tmp_path / "dcm")
    cmd = [sys.executable, "-m", "clips_jax.data.export", f"--dicom={tmp_path / 'dcm'}", f"--out={tmp_path / 'o'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_study(tmp_path / "o").suv.shape == (8, 16, 16)
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # exists, no --overwrite
    assert r2.returncode == 1 and "already exists" in r2.stderr
    r3 = subprocess.run(
        [
            sys.executable,
            "-m",
            "clips_jax.data.export",
            "--dicom",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r3.returncode == 1 and "nothing" in r3.stderr and not (tmp_path / "o2").exists()
    write_study(tmp_path / "two" / "p1")
    write_study(tmp_path / "two" / "p2")
    r4 = subprocess.run(
        [
            sys.executable,
            "-m",
            "clips_jax.data.export",
            "--dicom",
            str(tmp_path / "two"),
            "--out",
            str(tmp_path / "o3"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r4.returncode == 1 and "holds 2 studies" in r4.stderr and not (tmp_path / "o3").exists()
    h = subprocess.run(
        [sys.executable, "-m", "clips_jax.data.export", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "--dicom" in h.stdout and "autoPET" in h.stdout  # absl exits 1 after --help
