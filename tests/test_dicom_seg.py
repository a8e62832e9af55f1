"""DICOM SEG output and provenance of `clips_jax.predict`: the SEG read back with highdicom equals the NIfTI mask
voxel for voxel, slice by slice through the PET files' own positions; frame of reference, source references,
coded segment, research-use notice; an empty mask, resampled PET slices, no frame of reference, --nodicom_seg and
NIfTI input; the weights hash.

The PET is written here with pydicom in an orientation where nothing is the identity: rows run along +y and
columns along +x (ImageOrientationPatient [0,1,0, 1,0,0], so the slice normal is -z), 10 rows by 14 columns,
files shuffled. The mask is set by a stand-in for `predict.segment` (an asymmetric pattern, so a flip or a
transpose anywhere fails); tests/test_predict.py runs the real tiny networks on a DICOM study too.
"""

from __future__ import annotations

import io
import json
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from flax import nnx
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_dicom import PET_SOP, pet_tags

import clips_jax
from clips_jax import predict
from clips_jax.data.dicom import read_dicom_study, series_headers
from clips_jax.data.dicom_seg import write_dicom_seg
from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import save_nifti
from clips_jax.errors import DataError, DataWarning
from clips_jax.model import UNet, save_weights
from clips_jax.provenance import RESEARCH_NOTICE, provenance, weights_sha256

CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
FOR_UID = "1.2.826.0.1.3680043.8.498.777"
IOP = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # along a row: +y; down a column: +x (LPS); normal -z
SHAPE = (6, 10, 14)  # (slices, rows, columns)
STEP, DR, DC = 4.0, 3.0, 2.5  # slice step, row spacing, column spacing (mm)
ORIGIN = np.array([-30.0, 12.0, 100.0])
LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(folder, modality, stored, *, tags=None, positions=None, rng=None):
    """(slices, rows, columns) int16 as single-frame files in shuffled order; slice k at ORIGIN + positions[k] *
    normal (default k * STEP). Returns the SOP instance UIDs by slice."""
    folder.mkdir(parents=True)
    normal = np.cross(IOP[:3], IOP[3:])
    positions = np.arange(len(stored)) * STEP if positions is None else positions
    series, sop = generate_uid(), PET_SOP if modality == "PT" else CT_SOP
    uids = [generate_uid() for _ in stored]
    for k in (rng or np.random.default_rng(3)).permutation(len(stored)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, uids[k], modality
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyInstanceUID = "P7", "Test^Seg", "20240102", "1.2.3.4"
        ds.SeriesInstanceUID, ds.InstanceNumber = series, int(k) + 1
        ds.ImageOrientationPatient = list(IOP)
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + positions[k] * normal]
        ds.PixelSpacing, ds.SliceThickness = [DR, DC], STEP
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, (0.0 if modality == "PT" else -1024.0)
        for key, val in (tags or {}).items():
            setattr(ds, key, val)
        ds.PixelData = np.ascontiguousarray(stored[k].astype("<i2")).tobytes()
        ds.save_as(folder / f"IM{uids[k].rsplit('.', 1)[-1]}", enforce_file_format=True)
    return uids


def write_study(folder, *, frame_of_reference=FOR_UID, pet_positions=None):
    """A PET (SHAPE, FrameOfReferenceUID unless None) + CT (same grid) study in `folder`."""
    rng = np.random.default_rng(0)
    tags = pet_tags() | ({"FrameOfReferenceUID": frame_of_reference} if frame_of_reference else {})
    write_series(
        folder / "PT", "PT", rng.integers(100, 3000, SHAPE).astype(np.int16), tags=tags, positions=pet_positions
    )
    write_series(folder / "CT", "CT", rng.integers(900, 1200, SHAPE).astype(np.int16))


def asymmetric_mask(shape):
    """Lesion voxels that no flip or transpose maps onto themselves; planes 0, 2, 3 empty."""
    m = np.zeros(shape, np.uint8)
    m[1, 2, 3:5] = 1
    m[4, 7, 11] = 1
    m[4, 1:4, 0] = 1
    m[5, 0, 13] = 1
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random {unet} weights dir, loaded for --stage_a_only (the mask comes from `fake_segment`)."""
    d = tmp_path_factory.mktemp("w") / "unet"
    save_weights(d, {"unet": UNet(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3, rngs=nnx.Rngs(0))})
    return predict.load_models(d, stage_a_only=True)


@pytest.fixture
def fake_segment(monkeypatch):
    """Replace the networks by a known mask: `fake_segment(mask_fn)` makes predict's mask mask_fn(shape)."""

    def use(mask_fn):
        def segment(ct, suv, geometry, models, options, progress=None):
            seconds = {"stage_a": 0.0, "stage_b": None}
            return predict.Segmentation(mask_fn(geometry.shape), np.zeros((1, 1, 1), np.float32), seconds)

        monkeypatch.setattr(predict, "segment", segment)

    return use


OPTS = predict.Options(stage_a_only=True, stage_a_tile=(32, 32, 32))


def nifti_zyx(path):
    """(mask (z, y, x), RAS affine) of a NIfTI file written by predict."""
    img = nib.load(path)
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def pet_files(study):
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((study / "PT").iterdir())]


def slice_index(ds, affine):
    """The NIfTI z index of a PET file, from its own ImagePositionPatient; checks that the NIfTI's x and y axes
    are the file's column and row directions (so mask[z] is the file's (rows, columns) plane)."""
    ijk = np.linalg.inv(affine) @ np.append(LPS @ np.asarray(ds.ImagePositionPatient, float), 1.0)
    np.testing.assert_allclose(ijk[:2], 0.0, atol=1e-4)
    assert abs(ijk[2] - round(ijk[2])) < 1e-4
    iop = np.asarray(ds.ImageOrientationPatient, float)
    np.testing.assert_allclose(LPS @ affine[:3, 0], iop[:3] * float(ds.PixelSpacing[1]), atol=1e-5)
    np.testing.assert_allclose(LPS @ affine[:3, 1], iop[3:] * float(ds.PixelSpacing[0]), atol=1e-5)
    return int(round(ijk[2]))


def source_uids(seg):
    """SOP instance UIDs every frame names as its source (empty for frames without a reference)."""
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        refs = [s for d in item.get("DerivationImageSequence") or [] for s in d.get("SourceImageSequence") or []]
        out.append({str(s.ReferencedSOPInstanceUID) for s in refs})
    return out


# ----------------------------------------------------------------------------------------------------------
# The SEG of a DICOM study, read back


def test_seg_equals_the_nifti_mask_slice_by_slice(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study)
    fake_segment(asymmetric_mask)
    rep = predict.predict_study(study, out, models, OPTS)
    mask, affine = nifti_zyx(out / "study_SEG.nii.gz")
    np.testing.assert_array_equal(mask, asymmetric_mask(SHAPE))
    assert rep["outputs"]["dicom_seg"] == "study_SEG.dcm" and rep["dicom_seg"]["written"]
    seg = hd.seg.segread(out / "study_SEG.dcm")
    assert seg.FrameOfReferenceUID == FOR_UID and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    pets = pet_files(study)
    uids = [str(ds.SOPInstanceUID) for ds in pets]
    frames = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)[..., 0]
    for ds, frame in zip(pets, frames):  # the SEG's frame of each PET file is the NIfTI plane at that file's position
        np.testing.assert_array_equal(frame, mask[slice_index(ds, affine)])
    # one frame per non-empty plane, each naming exactly the PET file at its position as its source
    assert seg.NumberOfFrames == 3 and rep["dicom_seg"]["frames"] == 3
    by_z = {slice_index(ds, affine): str(ds.SOPInstanceUID) for ds in pets}
    assert sorted(map(sorted, source_uids(seg))) == sorted([[by_z[1]], [by_z[4]], [by_z[5]]])
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == pets[0].SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} == set(uids)
    assert seg.StudyInstanceUID == "1.2.3.4" and seg.PatientID == "P7"
    assert rep["dicom_seg"]["per_frame_references"] and rep["dicom_seg"]["frame_of_reference_uid"] == FOR_UID


def test_seg_segment_codes_and_provenance(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study)
    fake_segment(asymmetric_mask)
    rep = predict.predict_study(study, out, models, OPTS)
    digest = weights_sha256(models.info["weights_dir"])
    seg = pydicom.dcmread(out / "study_SEG.dcm")
    seg_desc = seg.SegmentSequence[0]
    assert seg_desc.SegmentLabel == "lymphoma lesion" and seg_desc.SegmentAlgorithmType == "AUTOMATIC"
    category, kind = seg_desc.SegmentedPropertyCategoryCodeSequence[0], seg_desc.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "52988006")
    algo = seg_desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "CLIPS-JAX TMTV-Net" and algo.AlgorithmVersion == clips_jax.__version__
    assert f"weights_sha256={digest}" in algo.AlgorithmParameters and '"stage_a_only":true' in algo.AlgorithmParameters
    assert "research use only" in seg.SeriesDescription and seg.ContentDescription == RESEARCH_NOTICE
    assert seg.ContentQualification == "RESEARCH" and seg.SoftwareVersions == clips_jax.__version__
    assert seg.DeviceSerialNumber == digest[:16]
    # the same provenance in the JSON and Markdown reports
    prov = json.loads((out / "study_report.json").read_text())["provenance"]
    assert prov == rep["provenance"]
    assert prov["weights_sha256"] == digest and prov["software_version"] == clips_jax.__version__
    assert prov["options"] == rep["options"] and prov["notice"] == RESEARCH_NOTICE
    md = (out / "study_report.md").read_text()
    assert "**Research use only, not for clinical decisions.**" in md and digest in md
    assert "DICOM SEG: `study_SEG.dcm` (3 frame(s)" in md and "each frame references its PET slice" in md


def test_empty_mask_gives_a_valid_seg_with_every_frame(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study)
    fake_segment(lambda shape: np.zeros(shape, np.uint8))
    rep = predict.predict_study(study, out, models, OPTS)
    seg = hd.seg.segread(out / "study_SEG.dcm")
    assert seg.NumberOfFrames == SHAPE[0] and rep["results"]["voxels"] == 0
    uids = [str(ds.SOPInstanceUID) for ds in pet_files(study)]
    frames = seg.get_pixels_by_source_instance(uids)  # every slice has its (empty) frame
    assert frames.shape == (SHAPE[0], *SHAPE[1:], 1) and not frames.any()
    assert all(len(s) == 1 for s in source_uids(seg))


def test_resampled_pet_slices_seg_on_the_grid_without_slice_references(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    positions = np.arange(SHAPE[0]) * STEP
    positions[3] += 0.8  # irregular, within a step: resampled onto a regular grid
    write_study(study, pet_positions=positions)
    fake_segment(asymmetric_mask)
    with pytest.warns(DataWarning, match="slice spacing varies"):
        rep = predict.predict_study(study, out, models, OPTS)
    info = rep["dicom_seg"]
    assert info["written"] and not info["per_frame_references"] and "resampled" in info["note"]
    mask, affine = nifti_zyx(out / "study_SEG.nii.gz")
    seg = pydicom.dcmread(out / "study_SEG.dcm")
    assert seg.FrameOfReferenceUID == FOR_UID and not any(source_uids(seg))
    assert {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        str(ds.SOPInstanceUID) for ds in pet_files(study)
    }
    pixels = hd.seg.Segmentation.from_dataset(seg).pixel_array
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels):  # a frame sits on its grid plane
        ijk = np.linalg.inv(affine) @ np.append(LPS @ np.asarray(item.PlanePositionSequence[0].ImagePositionPatient), 1)
        np.testing.assert_allclose(ijk[:2], 0.0, atol=1e-4)
        np.testing.assert_array_equal(frame, mask[int(round(ijk[2]))])
    assert "resampled onto a regular grid" in (out / "study_report.md").read_text()


def test_writer_refuses_slices_that_are_not_the_grid(tmp_path):
    write_study(tmp_path / "study")
    case = read_dicom_study(tmp_path / "study")
    headers = series_headers(tmp_path / "study", case.meta["pet_series_uid"])
    prov = provenance(software_version="0", weights_sha256=None, options={})
    mask, geom = asymmetric_mask(SHAPE), case.geometry
    shifted = geom.affine_array.copy()
    shifted[2, 3] += 0.6 * STEP  # every plane more than half a step from its slice

    def write(mask, geometry, headers):
        write_dicom_seg(tmp_path / "x.dcm", mask, geometry, headers, slices_resampled=False, provenance=prov)

    with pytest.raises(DataError, match="are not the 6 planes of the mask grid"):
        write(mask, geom, headers[1:])
    with pytest.raises(DataError, match="are not the 6 planes of the mask grid"):
        write(mask, Geometry(geom.shape, shifted), headers)
    with pytest.raises(DataError, match="mask shape"):
        write(mask[1:], geom, headers)
    assert not (tmp_path / "x.dcm").exists()


# ----------------------------------------------------------------------------------------------------------
# When no SEG is written


def test_no_frame_of_reference_warns_and_writes_the_rest(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study, frame_of_reference=None)
    fake_segment(asymmetric_mask)
    with pytest.warns(DataWarning, match="no DICOM SEG written: .*FrameOfReferenceUID"):
        rep = predict.predict_study(study, out, models, OPTS)
    assert not (out / "study_SEG.dcm").exists() and "dicom_seg" not in rep["outputs"]
    assert rep["dicom_seg"]["written"] is False and "FrameOfReferenceUID" in rep["dicom_seg"]["reason"]
    assert all(p.is_file() for p in predict.output_paths(out, "study").values())
    assert "DICOM SEG: not written (" in (out / "study_report.md").read_text()
    # a batch rerun counts the study as done (its headers cannot carry a SEG): not segmented again
    calls = []
    fake_segment(lambda shape: calls.append(shape) or asymmetric_mask(shape))
    result = predict.run_batch(study, out, models, OPTS, out=io.StringIO(), err=io.StringIO())
    assert result["skipped"] == ["study"] and calls == []


def test_nodicom_seg_flag_writes_no_seg(tmp_path, models, fake_segment):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study)
    fake_segment(asymmetric_mask)
    argv = ["predict", "--input", str(study), "--weights", models.info["weights_dir"], "--out", str(out)]
    assert predict.main([*argv, "--stage_a_only", "--stage_a_tile", "32,32,32", "--nodicom_seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in predict.output_paths(out, "study").values())
    rep = json.loads((out / "study_report.json").read_text())
    assert rep["dicom_seg"] == {"written": False, "reason": "--nodicom_seg"} and rep["options"]["dicom_seg"] is False
    # a later plain run does not count the study as done: its SEG is missing
    assert predict.main([*argv, "--stage_a_only", "--stage_a_tile", "32,32,32"]) == 0
    assert (out / f"study{predict.DICOM_SEG_SUFFIX}").is_file()
    # redone with --nodicom_seg: the older SEG would not match the new mask, so it goes (and the report says so)
    assert predict.main([*argv, "--stage_a_only", "--stage_a_tile", "32,32,32", "--nodicom_seg", "--overwrite"]) == 0
    assert not (out / f"study{predict.DICOM_SEG_SUFFIX}").exists()
    rep = json.loads((out / "study_report.json").read_text())
    assert rep["dicom_seg"]["removed_stale"] == f"study{predict.DICOM_SEG_SUFFIX}"


def test_nifti_input_writes_no_seg_even_from_an_exported_dicom_study(tmp_path, models, fake_segment):
    study, out = tmp_path / "nifti", tmp_path / "out"
    study.mkdir()
    geom = Geometry.from_spacing(SHAPE, (STEP, DR, DC))
    save_nifti(study / "CTres.nii.gz", np.zeros(SHAPE, np.float32), geom)
    save_nifti(study / "SUV.nii.gz", np.ones(SHAPE, np.float32), geom)
    (study / "meta.json").write_text(json.dumps({"source": "dicom", "pet_series_uid": "1.2.3"}))  # as export writes
    fake_segment(asymmetric_mask)
    rep = predict.predict_study(study, out, models, OPTS)
    assert rep["dicom_seg"] is None and "dicom_seg" not in rep["outputs"]
    assert not list(out.glob("*.dcm"))
    assert rep["provenance"]["notice"] == RESEARCH_NOTICE
    assert "Research use only, not for clinical decisions" in (out / "nifti_report.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# Weights hash


def test_weights_hash_follows_the_files_not_their_place(tmp_path, models):
    src = models.info["weights_dir"]
    digest = weights_sha256(src)
    assert len(digest) == 64 and models.info["weights_sha256"] == digest == weights_sha256(src)
    copy = shutil.copytree(src, tmp_path / "copy")
    assert weights_sha256(copy) == digest
    (copy / "clips_weights.json").write_text((copy / "clips_weights.json").read_text() + " ")
    assert weights_sha256(copy) != digest
    (copy / "clips_weights.json").rename(copy / "renamed.json")
    assert weights_sha256(copy) not in (digest, weights_sha256(src))


def test_skip_damaged_study_gets_its_seg_without_the_left_out_slices(tmp_path, models, fake_segment, capsys):
    study, out = tmp_path / "study", tmp_path / "out"
    write_study(study)
    files = sorted(
        (study / "PT").iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    files[-1].write_bytes(files[-1].read_bytes()[:-200])  # an end slice with its pixel data cut short
    files[0].write_bytes(files[0].read_bytes()[:600])  # the other end cut in its header
    fake_segment(lambda shape: np.ones(shape, np.uint8))
    argv = ["predict", "--input", str(study), "--weights", models.info["weights_dir"], "--out", str(out)]
    argv += ["--stage_a_only", "--stage_a_tile", "32,32,32"]
    assert predict.main(argv) == 1  # without the flag: the study fails, naming a damaged file, and writes nothing
    assert not out.exists() or not any(out.iterdir())
    capsys.readouterr()
    assert predict.main([*argv, "--skip_damaged"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: left out")]
    assert len(warned) == 2 and all("--skip_damaged" in line for line in warned)
    rep = json.loads((out / "study_report.json").read_text())
    assert rep["dicom_seg"]["written"] and rep["grid"]["shape"][0] == len(files) - 2
    assert sum("file left out (--skip_damaged)" in n for n in rep["input_notes"]) == 2
    seg = pydicom.dcmread(out / f"study{predict.DICOM_SEG_SUFFIX}")
    kept = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[1:-1]}
    assert set().union(*source_uids(seg)) == kept
