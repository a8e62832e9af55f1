"""DICOM PET/CT reading: series discovery, slice order, geometry, checked SUVbw conversion, error messages.

Tiny synthetic series (8 slices of 16x16) are written with pydicom into tmp_path. Expected SUVs are computed
here by hand from the tag values (weight, dose, half-life, times), independently of the reader.
`write_series` / `write_study` are also used by tests/test_data_io.py (export round trip).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from clips_jax.data.dicom import read_dicom_study, suv_factor, suv_parameters
from clips_jax.errors import DataError, DataWarning

PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
WEIGHT_KG, DOSE_BQ, HALF_LIFE_S = 70.0, 350e6, 6586.2


def write_series(
    folder,
    modality,
    stored,
    *,
    spacing_zyx,
    origin_lps,
    slopes=None,
    intercept=0.0,
    series_uid=None,
    study_uid="1.2.3.4",
    tags=None,
    slice_tags=None,
    rng=None,
    description="",
):
    """Write a (z, y, x) int16 volume as a single-frame DICOM series, files in shuffled order, no extension.

    Slice k sits at origin_lps + k * spacing_z along +z (LPS); row direction +x, column direction +y.
    `slopes` gives one RescaleSlope per slice; `tags` extra (keyword -> value) for every slice;
    `slice_tags(k)` a dict of per-slice extras. Returns the SeriesInstanceUID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng or np.random.default_rng(0)
    series_uid = series_uid or generate_uid()
    nz, ny, nx = stored.shape
    sz, sy, sx = spacing_zyx
    order = rng.permutation(nz)
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PET_SOP if modality == "PT" else CT_SOP
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = "P001"
        ds.PatientSex = "F"
        ds.StudyDate = "20240102"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description or f"{modality} test"
        ds.InstanceNumber = int(k) + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2] + k * sz)]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = float(slopes[k]) if slopes is not None else 1.0
        ds.RescaleIntercept = float(intercept)
        for key, val in (tags or {}).items():
            setattr(ds, key, val)
        for key, val in (slice_tags(int(k)) if slice_tags else {}).items():
            setattr(ds, key, val)
        ds.PixelData = np.ascontiguousarray(stored[k].astype("<i2")).tobytes()
        ds.save_as(folder / f"IM{ds.SOPInstanceUID.rsplit('.', 1)[-1]}", enforce_file_format=True)
    return series_uid


def pet_tags(**over):
    """PET header tags of a START-corrected Bq/ml series: injection 09:00, series start 10:00 (dt = 3600 s)."""
    info = Dataset()
    info.RadionuclideTotalDose = DOSE_BQ
    info.RadionuclideHalfLife = HALF_LIFE_S
    info.RadiopharmaceuticalStartTime = "090000"
    tags = {
        "Units": "BQML",
        "DecayCorrection": "START",
        "PatientWeight": WEIGHT_KG,
        "SeriesDate": "20240102",
        "SeriesTime": "100000",
        "AcquisitionDate": "20240102",
        "AcquisitionTime": "100000",
        "RadiopharmaceuticalInformationSequence": [info],
    }
    tags.update(over)
    return tags


PET_SPACING, PET_ORIGIN_LPS = (3.0, 4.0, 4.0), (-100.0, -120.0, 50.0)


def pet_stored(shape=(8, 16, 16)):
    rng = np.random.default_rng(1)
    return rng.integers(0, 3000, size=shape).astype(np.int16)


def ct_stored(shape=(16, 32, 32)):
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (10 * z + 3 * y + x).astype(np.int16)


def write_study(folder, *, pet_over=None, ct=True, pet=True, slopes=None):
    """A PET (8x16x16, spacing 3x4x4 mm) + CT (16x32x32, spacing 1.5x2x2 mm, same origin) study.

    Returns (pet stored ints, per-slice slopes, ct stored ints). CT HU = stored - 1024.
    """
    p = pet_stored()
    slopes = np.linspace(0.5, 2.0, p.shape[0]) if slopes is None else slopes
    c = ct_stored()
    if pet:
        write_series(
            folder / "PT",
            "PT",
            p,
            spacing_zyx=PET_SPACING,
            origin_lps=PET_ORIGIN_LPS,
            slopes=slopes,
            tags=pet_tags(**(pet_over or {})),
        )
    if ct:
        write_series(folder / "CT", "CT", c, spacing_zyx=(1.5, 2.0, 2.0), origin_lps=PET_ORIGIN_LPS, intercept=-1024.0)
    return p, slopes, c


def test_suv_start_matches_hand_computation_and_geometry(tmp_path):
    p, slopes, c = write_study(tmp_path / "study")
    (tmp_path / "study" / "README.txt").write_text("not dicom")  # skipped, not an error
    case = read_dicom_study(tmp_path / "study")
    decay = 0.5 ** (3600.0 / HALF_LIFE_S)
    factor = WEIGHT_KG * 1000.0 / (DOSE_BQ * decay)
    expected = p.astype(np.float64) * slopes[:, None, None] * factor
    np.testing.assert_allclose(case.suv, expected, rtol=1e-5)
    assert case.meta["suv_factor"] == pytest.approx(factor, rel=1e-12)
    assert case.case_id == "study" and case.seg is None
    # Geometry: PET grid, RAS affine = LPS with x and y negated.
    assert case.geometry.shape == (8, 16, 16)
    np.testing.assert_allclose(case.geometry.spacing_mm, PET_SPACING)
    want = np.array([[-4.0, 0, 0, 100.0], [0, -4.0, 0, 120.0], [0, 0, 3.0, 50.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(case.geometry.affine_array, want, atol=1e-9)
    # CT (spacing exactly half of the PET's, same origin) resampled onto the PET grid: every other voxel.
    np.testing.assert_allclose(case.ct, c[::2, ::2, ::2].astype(np.float32) - 1024.0, atol=1e-3)
    assert case.meta["ct_resampled_to_pet"] is True


def test_shuffled_files_give_the_volume_in_position_order(tmp_path):
    p = pet_stored()
    for seed in (3, 4):
        d = tmp_path / f"s{seed}"
        write_series(
            d,
            "PT",
            p,
            spacing_zyx=PET_SPACING,
            origin_lps=PET_ORIGIN_LPS,
            tags=pet_tags(),
            rng=np.random.default_rng(seed),
        )
        write_series(
            d,
            "CT",
            p,
            spacing_zyx=PET_SPACING,
            origin_lps=PET_ORIGIN_LPS,
            intercept=-1024.0,
            rng=np.random.default_rng(seed + 10),
        )
        case = read_dicom_study(d)
        np.testing.assert_array_equal(case.ct, p.astype(np.float32) - 1024.0)  # same grid: no resampling
        assert case.meta["ct_resampled_to_pet"] is False


def test_suv_admin_has_no_decay(tmp_path):
    p, slopes, _ = write_study(tmp_path / "st", pet_over={"DecayCorrection": "ADMIN"})
    case = read_dicom_study(tmp_path / "st")
    np.testing.assert_allclose(case.suv, p * slopes[:, None, None] * (70.0 * 1000 / 350e6), rtol=1e-5)


def test_suv_none_decays_each_slice_to_its_acquisition_time(tmp_path):
    p = pet_stored()
    d = tmp_path / "st"
    # Slice k acquired at 10:00 + 2k minutes; injection given as a full date-time at 09:30.
    info = Dataset()
    info.RadionuclideTotalDose, info.RadionuclideHalfLife = DOSE_BQ, HALF_LIFE_S
    info.RadiopharmaceuticalStartDateTime = "20240102093000"
    write_series(
        d,
        "PT",
        p,
        spacing_zyx=PET_SPACING,
        origin_lps=PET_ORIGIN_LPS,
        tags=pet_tags(DecayCorrection="NONE", RadiopharmaceuticalInformationSequence=[info]),
        slice_tags=lambda k: {"AcquisitionTime": f"10{2 * k:02d}00"},
    )
    write_series(d, "CT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS)
    case = read_dicom_study(d)
    dt = 1800.0 + 120.0 * np.arange(8)
    factors = 70000.0 / (350e6 * 0.5 ** (dt / HALF_LIFE_S))
    np.testing.assert_allclose(case.suv, p * factors[:, None, None], rtol=1e-5)


def test_suv_factor_injection_before_midnight_and_full_datetime():
    info = Dataset()
    info.RadionuclideTotalDose, info.RadionuclideHalfLife = DOSE_BQ, HALF_LIFE_S
    info.RadiopharmaceuticalStartTime = "233000"  # previous evening; scan at 00:30 -> dt = 3600 s
    ds = Dataset()
    for k, v in pet_tags(SeriesTime="003000", RadiopharmaceuticalInformationSequence=[info]).items():
        setattr(ds, k, v)
    ds.AcquisitionTime = "003000"
    with pytest.warns(DataWarning, match="injection assumed the day before"):
        assert suv_factor(ds) == pytest.approx(70000.0 / (350e6 * 0.5 ** (3600.0 / HALF_LIFE_S)), rel=1e-12)
        assert any("day before" in n for n in suv_parameters(ds)["notes"])  # so the report shows the guess


def test_several_pet_series_pick_the_largest_with_a_warning(tmp_path):
    p, slopes, _ = write_study(tmp_path / "st")
    write_series(
        tmp_path / "st" / "PT_small",
        "PT",
        p[:4],
        spacing_zyx=PET_SPACING,
        origin_lps=PET_ORIGIN_LPS,
        tags=pet_tags(),
        description="small recon",
    )
    with pytest.warns(DataWarning, match="most slices.*small recon"):
        case = read_dicom_study(tmp_path / "st")
    assert case.suv.shape == (8, 16, 16)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("no_pt", r"no PET series in .*st"),
        ("no_ct", r"no CT series in .*st"),
        ("units", r"SeriesInstanceUID .*Units \(0054,1001\) is 'CNTS'"),
        ("weight", r"SeriesInstanceUID .*PatientWeight \(0010,1030\) is missing"),
        ("dose", r"SeriesInstanceUID .*RadionuclideTotalDose \(0018,1074\) is missing"),
        ("zero_weight", r"PatientWeight \(0010,1030\) is '0(\.0)?'; it must be present and > 0"),
        ("decay", r"DecayCorrection \(0054,1102\) is 'WEIRD'"),
    ],
)
def test_error_cases_name_folder_and_series(tmp_path, kind, match):
    d = tmp_path / "st"
    info = Dataset()
    info.RadionuclideHalfLife = HALF_LIFE_S
    info.RadiopharmaceuticalStartTime = "090000"
    over = {
        "units": {"Units": "CNTS"},
        "weight": {"PatientWeight": None},
        "zero_weight": {"PatientWeight": 0.0},
        "dose": {"RadiopharmaceuticalInformationSequence": [info]},
        "decay": {"DecayCorrection": "WEIRD"},
    }.get(kind, {})
    write_study(d, pet=kind != "no_pt", ct=kind != "no_ct", pet_over=over)
    if kind == "weight":  # remove the tag entirely rather than writing an empty value
        for f in (d / "PT").iterdir():
            ds = pydicom.dcmread(f)
            del ds.PatientWeight
            ds.save_as(f, enforce_file_format=True)
    with pytest.raises(DataError, match=match) as ei:
        read_dicom_study(d)
    assert str(d) in str(ei.value)


def test_damaged_file_is_named(tmp_path):
    write_study(tmp_path / "st")
    victim = sorted((tmp_path / "st" / "PT").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])  # truncated pixel data
    with pytest.raises(DataError, match=victim.name):
        read_dicom_study(tmp_path / "st")


def test_nonconstant_spacing_and_empty_folder(tmp_path):
    p = pet_stored()
    d = tmp_path / "gap"
    write_series(d, "PT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS, tags=pet_tags())
    write_series(d, "CT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS)
    # Remove one PET slice in the middle: a gap of 6 mm among 3 mm steps.
    pt_files = [f for f in d.iterdir() if pydicom.dcmread(f, stop_before_pixels=True).Modality == "PT"]
    mid = [f for f in pt_files if float(pydicom.dcmread(f).ImagePositionPatient[2]) == 50.0 + 4 * 3.0]
    mid[0].unlink()
    with pytest.raises(DataError, match="missing slice.*between positions 59.00 and 65.00 mm"):
        read_dicom_study(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM files in .*empty"):
        read_dicom_study(tmp_path / "empty")


def test_pet_and_ct_of_different_patients_is_an_error(tmp_path):
    p = pet_stored()
    d = tmp_path / "mixed"
    write_series(d / "PT", "PT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS, tags=pet_tags())
    write_series(d / "CT", "CT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS, tags={"PatientID": "P999"})
    with pytest.raises(DataError, match=r"mixed: the PET and CT series belong to different patients.*P999"):
        read_dicom_study(d)


def _positions_study(folder, z_positions):
    """A PET + CT study whose PET slices sit at the given z positions (LPS mm); CT regular over the same range."""
    p = pet_stored((len(z_positions), 16, 16))
    write_series(
        folder,
        "PT",
        p,
        spacing_zyx=PET_SPACING,
        origin_lps=PET_ORIGIN_LPS,
        tags=pet_tags(),
        slice_tags=lambda k: {
            "ImagePositionPatient": [float(PET_ORIGIN_LPS[0]), float(PET_ORIGIN_LPS[1]), float(z_positions[k])]
        },
    )
    ct = ct_stored((60, 32, 32))  # 1 mm slices from 5 mm below the first PET slice: covers the PET
    write_series(
        folder,
        "CT",
        ct,
        spacing_zyx=(1.0, 2.0, 2.0),
        origin_lps=(PET_ORIGIN_LPS[0], PET_ORIGIN_LPS[1], z_positions[0] - 5.0),
    )
    return p


def test_multibed_steps_within_the_fit_tolerance_are_a_regular_grid(tmp_path):
    # Steps of 3.27 mm, 3.19 mm at the bed joins (as a GE multi-bed PET): a line fits every slice within 0.05 mm.
    steps = [3.27] * 4 + [3.19] + [3.27] * 4 + [3.19] + [3.27] * 3
    z = 50.0 + np.concatenate([[0.0], np.cumsum(steps)])
    p = _positions_study(tmp_path / "mb", z)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DataWarning: nothing resampled
        case = read_dicom_study(tmp_path / "mb")
    assert case.suv.shape[0] == len(z) and not case.meta["pet_slices_resampled"]
    np.testing.assert_allclose(case.geometry.spacing_mm[0], (z[-1] - z[0]) / (len(z) - 1), rtol=1e-6)
    assert case.suv.shape == p.shape


def test_irregular_slices_are_resampled_with_a_warning(tmp_path):
    # Steps of 3 mm with one 4 mm step in the middle: beyond the fit tolerance, below a missing slice.
    steps = [3.0] * 5 + [4.0] + [3.0] * 5
    z = 50.0 + np.concatenate([[0.0], np.cumsum(steps)])
    _positions_study(tmp_path / "irr", z)
    from clips_jax.errors import DataWarning

    with pytest.warns(DataWarning, match="slice spacing varies.*resampled linearly onto 12 slices at 3.091 mm"):
        case = read_dicom_study(tmp_path / "irr")
    assert case.meta["pet_slices_resampled"] and case.suv.shape[0] == 12  # round(34 mm / 3 mm) + 1
    np.testing.assert_allclose(case.geometry.spacing_mm[0], (z[-1] - z[0]) / 11, rtol=1e-6)
    assert np.isfinite(case.suv).all()


def test_a_damaged_header_is_named_not_skipped(tmp_path):
    write_study(tmp_path / "st")
    victim = sorted((tmp_path / "st" / "PT").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:600])  # cut in the header: parses, but without the series UID
    with pytest.raises(DataError, match=f"{victim.name}: DICOM (file without SeriesInstanceUID|image without pixel)"):
        read_dicom_study(tmp_path / "st")


def test_skip_damaged_leaves_out_named_files_and_a_gap_stays_an_error(tmp_path):
    write_study(tmp_path / "st")
    full = read_dicom_study(tmp_path / "st")
    files = sorted(
        (tmp_path / "st" / "PT").iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    end = files[-1]  # an end slice with truncated pixel data: left out, the stack is one slice shorter
    end.write_bytes(end.read_bytes()[:-300])
    with pytest.warns(DataWarning, match=f"left out {end} \\(--skip_damaged\\): .*pixel data cut short"):
        case = read_dicom_study(tmp_path / "st", skip_damaged=True)
    assert case.suv.shape[0] == full.suv.shape[0] - 1
    ((left_out,),) = [case.meta["skipped_files"]]
    assert left_out["file"] == str(end) and "--skip_damaged" not in left_out["reason"]
    same_start = np.allclose(case.geometry.origin_mm, full.geometry.origin_mm)  # which end of the volume went
    np.testing.assert_allclose(case.suv, full.suv[:-1] if same_start else full.suv[1:], rtol=1e-6)
    middle = files[3]  # a damaged header inside the series: left out, and the gap is the missing-slice error
    middle.write_bytes(middle.read_bytes()[:600])
    with pytest.warns(DataWarning, match=middle.name), pytest.raises(DataError, match="missing slice"):
        read_dicom_study(tmp_path / "st", skip_damaged=True)
    with pytest.raises(DataError, match=f"{middle.name}.*--skip_damaged"):
        read_dicom_study(tmp_path / "st")


def test_skip_damaged_with_too_few_readable_slices_is_one_error(tmp_path):
    write_study(tmp_path / "st")
    files = sorted((tmp_path / "st" / "PT").iterdir())
    for f in files:
        f.write_bytes(f.read_bytes()[:-300])
    with pytest.warns(DataWarning), pytest.raises(DataError, match=f"only 0 of {len(files)} slices readable"):
        read_dicom_study(tmp_path / "st", skip_damaged=True)


def test_patient_weight_must_agree_across_slices(tmp_path):
    write_study(tmp_path / "st", pet_over={})
    victim = sorted((tmp_path / "st" / "PT").iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.PatientWeight = float(ds.PatientWeight) + 7.0
    ds.save_as(victim)
    with pytest.raises(DataError, match=f"PatientWeight differs between slices .*{victim.name}"):
        read_dicom_study(tmp_path / "st")


def test_ct_must_cover_the_pet(tmp_path):
    from clips_jax.errors import DataWarning

    p = pet_stored()  # PET z from 50 to 71 mm
    d = tmp_path / "far"
    write_series(d / "PT", "PT", p, spacing_zyx=PET_SPACING, origin_lps=PET_ORIGIN_LPS, tags=pet_tags())
    write_series(
        d / "CT",
        "CT",
        ct_stored(),
        spacing_zyx=(1.5, 2.0, 2.0),
        origin_lps=(PET_ORIGIN_LPS[0], PET_ORIGIN_LPS[1], 300.0),
        intercept=-1024.0,
    )  # another bed range
    with pytest.raises(DataError, match=r"CT covers 0 % of the PET.*--allow_partial_ct"):
        read_dicom_study(d)
    with pytest.warns(DataWarning, match="CT covers 0 %"):
        case = read_dicom_study(d, allow_partial_ct=True)
    assert case.meta["ct_coverage"] == 0.0 and np.all(case.ct == -1024.0)
    write_study(tmp_path / "ok")
    assert read_dicom_study(tmp_path / "ok").meta["ct_coverage"] == 1.0


def test_units_gml_is_suv_already_and_other_units_are_refused_clearly(tmp_path):
    p, slopes, _ = write_study(tmp_path / "gml", pet_over={"Units": "GML"})
    case = read_dicom_study(tmp_path / "gml")
    np.testing.assert_allclose(case.suv, (p * slopes[:, None, None]).astype(np.float32), rtol=1e-6)
    assert case.meta["units"] == "GML" and case.meta["suv_factor"] == 1.0 and "SUVbw already" in case.meta["note"]
    write_study(tmp_path / "cnts", pet_over={"Units": "CNTS"})
    with pytest.raises(DataError, match="Units .* is 'CNTS'; supported are BQML .* and GML"):
        read_dicom_study(tmp_path / "cnts")
