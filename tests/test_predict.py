"""Tests of `python -m clips_jax.predict`: report numbers against hand counts, the stage composition against
`cascade.cascade`, a tiny trained U-Net that finds a phantom's large lesions, the CLI on NIfTI and DICOM
studies written here (SEG geometry = PET geometry), batch mode with a corrupt study, resume, weights errors.

Tiny networks (U-Nets with channels (4, 4, 8, 8), refiner with 4 features) and small grids keep it fast.
"""

from __future__ import annotations

import io
import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import ndimage

from clips_jax import predict
from clips_jax.cascade import cascade
from clips_jax.data.case import Case
from clips_jax.data.channels import make_channels
from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import save_nifti
from clips_jax.data.phantoms import make_phantom, write_phantom
from clips_jax.data.resample import resample_case
from clips_jax.data.study import load_study
from clips_jax.losses import soft_dice_loss
from clips_jax.model import Ensemble, Refiner, UNet, save_weights

UNET_KW = dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3)
TILES = ["--stage_a_tile", "32,32,32", "--stage_b_tile", "32,32,32"]
SMALL = (24, 40, 32)  # native PET grid of the CLI phantoms (z, y, x) at 3 x 2.04 x 2.04 mm


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights dirs: full cascade {ensemble, refiner} and a {unet} dir (random tiny networks)."""
    root = tmp_path_factory.mktemp("weights")
    ens = Ensemble(4, unet_kwargs=UNET_KW, rngs=nnx.Rngs(0))
    ref = Refiner(features=4, n_blocks=1, rngs=nnx.Rngs(1))
    save_weights(root / "cascade", {"ensemble": ens, "refiner": ref}, source={"test": "random"})
    save_weights(root / "unet", {"unet": UNet(**UNET_KW, rngs=nnx.Rngs(2))})
    return root


def _oblique_geometry(shape, spacing_mm):
    """A PET grid with flipped x, rotated y/z axes and an offset origin (exercises the affine copy)."""
    sz, sy, sx = spacing_mm
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, 0] = [-sx, 0.0, 0.0]  # x index -> -R
    aff[:3, 1] = [0.0, c * sy, s * sy]  # y index -> rotated in the A-S plane
    aff[:3, 2] = [0.0, -s * sz, c * sz]
    aff[:3, 3] = [12.5, -40.0, 230.0]
    return Geometry(tuple(shape), tuple(map(tuple, aff)))


def _write_nifti_study(folder, seed, shape=SMALL):
    """A phantom written with an oblique affine: CTres/SUV/SEG on that grid. Returns the phantom."""
    ph = make_phantom(seed, shape)
    geom = _oblique_geometry(shape, ph.geometry.spacing_mm)
    folder.mkdir(parents=True)
    save_nifti(folder / "CTres.nii.gz", ph.ct, geom, dtype=np.float32)
    save_nifti(folder / "SUV.nii.gz", ph.suv, geom, dtype=np.float32)
    save_nifti(folder / "SEG.nii.gz", ph.seg, geom, dtype=np.uint8)
    return ph


# ----------------------------------------------------------------------------------------------------------
# Report numbers


def test_mask_statistics_against_hand_counts():
    spacing = (3.0, 2.0, 1.5)  # voxel 9 mm^3 = 0.009 ml
    mask = np.zeros((10, 12, 14), np.uint8)
    suv = np.ones(mask.shape, np.float32)
    mask[1:3, 1:4, 1:5] = 1  # 24 voxels
    suv[1:3, 1:4, 1:5] = 4.0
    suv[2, 3, 4] = 9.0
    mask[7, 9, 10] = 1  # 1 voxel, far away
    suv[7, 9, 10] = 2.0
    mask[8, 10, 11] = 1  # touches the previous one by a corner only (26-, not 18-conn.)
    s = predict.mask_statistics(mask, suv, spacing)
    assert s["voxels"] == 26 and s["lesion_count"] == 3
    np.testing.assert_allclose(s["tmtv_ml"], 26 * 9 / 1000)
    np.testing.assert_allclose(s["suv_max"], 9.0)
    mean = (23 * 4.0 + 9.0 + 2.0 + 1.0) / 26
    np.testing.assert_allclose(s["suv_mean"], mean)
    np.testing.assert_allclose(s["tlg"], mean * 26 * 9 / 1000)
    # farthest voxel centres: (1, 1, 1) and (8, 10, 11) in index space
    np.testing.assert_allclose(s["dmax_mm"], np.linalg.norm(np.array([7, 9, 10]) * spacing))
    empty = predict.mask_statistics(np.zeros_like(mask), suv, spacing)
    assert empty == {
        "tmtv_ml": 0.0,
        "lesion_count": 0,
        "dmax_mm": None,
        "suv_max": None,
        "suv_mean": None,
        "tlg": 0.0,
        "voxels": 0,
    }


def test_segment_equals_inference_cascade():
    ph = make_phantom(2, SMALL)
    ens = Ensemble(4, unet_kwargs=UNET_KW, rngs=nnx.Rngs(3))
    ref = Refiner(features=4, n_blocks=1, rngs=nnx.Rngs(4))
    models = predict.Models.from_modules(ens, ref)
    # the report embeds the model description: it must be plain JSON (a ModelConfig is not)
    info = json.loads(json.dumps(models.info, allow_nan=False))
    assert info["stage_a"]["class"] == "Ensemble" and info["stage_a"]["config"]["n_members"] == 4
    assert info["stage_b"]["config"]["features"] == 4
    opts = predict.Options(stage_a_tile=(32, 32, 32), stage_b_tile=(32, 32, 32))
    got = predict.segment(ph.ct, ph.suv, ph.geometry, models, opts)
    (pa, sa), (pb, sb) = models.stage_a, models.refiner
    want = cascade(
        ph.ct,
        ph.suv,
        ph.geometry,
        pa,
        pb,
        ensemble_params=sa,
        refiner_params=sb,
        stage_a_tile=(32, 32, 32),
        stage_a_step=(16, 16, 16),
        stage_b_tile=(32, 32, 32),
        stage_b_step=(16, 16, 16),
    )
    np.testing.assert_array_equal(got.stage_a_prob, want.stage_a_prob)
    np.testing.assert_array_equal(got.mask, want.mask)
    assert got.mask.dtype == np.uint8 and got.mask.shape == ph.geometry.shape
    only_a = predict.segment(
        ph.ct, ph.suv, ph.geometry, models, predict.Options(stage_a_tile=(32, 32, 32), stage_a_only=True)
    )
    np.testing.assert_array_equal(only_a.mask, (want.cascade_channel > 0.5).astype(np.uint8))
    assert only_a.seconds["stage_b"] is None


# ----------------------------------------------------------------------------------------------------------
# A tiny trained U-Net finds the large lesions


def _coarse_sample(seed):
    """(channels (48, 32, 32, 5), labels (48, 32, 32)) of a small phantom on its 6 mm grid, zero-padded."""
    ph = make_phantom(seed, "small")
    c = resample_case(Case("t", ph.ct, ph.suv, ph.seg, ph.geometry), 6.0)
    x = make_channels(c.ct, c.suv)
    pads = [(0, t - n) for n, t in zip(c.ct.shape, (48, 32, 32))]
    return np.pad(x, pads + [(0, 0)]), np.pad(c.seg, pads).astype(np.int32)


def _train_unet(seeds, steps, seed=0, crop_z=16, batch=4):
    """A few dozen Adam steps of a tiny U-Net on (crop_z, 32, 32) z-slabs of 6 mm phantoms (slabs centred on
    a lesion voxel 3 times in 4; random flips). Returns (model, per-step losses)."""
    model = UNet(**UNET_KW, rngs=nnx.Rngs(seed))
    data = [_coarse_sample(s) for s in seeds]
    opt = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            logits = m(x)
            w = jnp.where(y == 1, 5.0, 1.0)  # lesions are ~1 % of the voxels
            ce = jnp.mean(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))
            return ce + jnp.mean(soft_dice_loss(logits, y))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            x, y = data[rng.integers(len(data))]
            zz = np.nonzero(y)[0]
            c = int(rng.choice(zz)) if len(zz) and rng.random() < 0.75 else int(rng.integers(x.shape[0]))
            z0 = int(np.clip(c - crop_z // 2, 0, x.shape[0] - crop_z))
            x, y = x[z0 : z0 + crop_z], y[z0 : z0 + crop_z]
            flip = tuple(a for a in range(3) if rng.random() < 0.5)
            xs.append(np.flip(x, flip))
            ys.append(np.flip(y, flip))
        losses.append(float(step(model, opt, jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)))))
    return model, losses


def test_tiny_trained_unet_finds_large_lesions(tmp_path):
    trained, losses = _train_unet([1, 7, 11, 3], steps=40)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    study = tmp_path / "in" / "held_out"
    ph = make_phantom(2, "small")  # held-out phantom: 9 lesions, largest 43.8 ml
    write_phantom(study, ph)
    dice = {}
    for name, model in (("trained", trained), ("untrained", UNet(**UNET_KW, rngs=nnx.Rngs(5)))):
        save_weights(tmp_path / f"w_{name}", {"unet": model})
        out = tmp_path / f"out_{name}"
        rc = predict.main(
            [
                "predict",
                "--input",
                str(study),
                "--weights",
                str(tmp_path / f"w_{name}"),
                "--out",
                str(out),
                "--stage_a_only",
                "--stage_a_tile",
                "48,32,32",
            ]
        )
        assert rc == 0
        mask = np.asarray(nib.load(out / "held_out_SEG.nii.gz").dataobj).transpose(2, 1, 0) > 0
        truth = ph.seg > 0
        dice[name] = 2 * np.sum(mask & truth) / max(mask.sum() + truth.sum(), 1)
        if name == "trained":
            labels, n = ndimage.label(truth, ndimage.generate_binary_structure(3, 2))
            vox_ml = float(np.prod(ph.geometry.spacing_mm)) / 1000
            large = [i for i in range(1, n + 1) if np.sum(labels == i) * vox_ml > 5.0]
            assert len(large) >= 2
            for i in large:  # every lesion > 5 ml overlaps the prediction
                assert np.any(mask[labels == i]), f"lesion {i} ({np.sum(labels == i) * vox_ml:.1f} ml) missed"
    # 0.35-0.5 after this tiny training depending on the CPU's float rounding (0.346 seen on one VM)
    assert dice["trained"] > 0.3 and dice["trained"] > dice["untrained"] + 0.25, dice


# ----------------------------------------------------------------------------------------------------------
# CLI: NIfTI and DICOM inputs, batch mode, weights errors


def _nifti_grid(path):
    img = nib.load(path)
    return img.affine, img.shape, img.get_data_dtype()


def test_cli_nifti_study_outputs_on_the_pet_grid(tmp_path, weights, capsys):
    _write_nifti_study(tmp_path / "in" / "case_a", seed=11)
    out = tmp_path / "out"
    rc = predict.main(
        [
            "predict",
            "--input",
            str(tmp_path / "in" / "case_a"),
            "--weights",
            str(weights / "cascade"),
            "--out",
            str(out),
            *TILES,
        ]
    )
    assert rc == 0
    assert "[1/1] case_a: ok" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case_a_SEG.nii.gz", "case_a_mip.png", "case_a_report.json", "case_a_report.md"]
    seg_aff, seg_shape, seg_dtype = _nifti_grid(out / "case_a_SEG.nii.gz")
    suv_aff, suv_shape, _ = _nifti_grid(tmp_path / "in" / "case_a" / "SUV.nii.gz")
    np.testing.assert_allclose(seg_aff, suv_aff, atol=1e-5)
    assert seg_shape == suv_shape and seg_dtype == np.uint8
    # report numbers recomputed independently from the written files
    mask = np.asarray(nib.load(out / "case_a_SEG.nii.gz").dataobj) > 0  # nibabel (x, y, z) order
    suv = np.asarray(nib.load(tmp_path / "in" / "case_a" / "SUV.nii.gz").dataobj)
    rep = json.loads((out / "case_a_report.json").read_text())
    vox_ml = float(np.prod(nib.load(out / "case_a_SEG.nii.gz").header.get_zooms())) / 1000
    r = rep["results"]
    assert (
        r["voxels"] == mask.sum()
        and r["lesion_count"] == ndimage.label(mask, ndimage.generate_binary_structure(3, 2))[1]
    )
    np.testing.assert_allclose(r["tmtv_ml"], mask.sum() * vox_ml, rtol=1e-4)
    if mask.any():
        np.testing.assert_allclose(r["suv_max"], suv[mask].max(), rtol=1e-5)
        np.testing.assert_allclose(r["tlg"], suv[mask].mean() * mask.sum() * vox_ml, rtol=1e-4)
    assert rep["study_id"] == "case_a" and rep["model"]["stage_a"]["name"] == "ensemble"
    assert rep["model"]["stage_b"]["name"] == "refiner" and rep["options"]["stage_a_tile"] == [32, 32, 32]
    assert set(rep["seconds"]) >= {"load", "stage_a", "stage_b", "total"} and rep["software"]["clips_jax"]
    assert "TMTV" in (out / "case_a_report.md").read_text()
    assert (out / "case_a_mip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_dicom_series(folder, modality, stored, spacing_zyx, origin_lps, *, slope=1.0, intercept=0.0, extra=None):
    """A (z, y, x) int16 volume as single-frame DICOM files (axial, row +x, column +y in LPS)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    sop = "1.2.840.10008.5.1.4.1.1.128" if modality == "PT" else "1.2.840.10008.5.1.4.1.1.2"
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientSex, ds.StudyDate = modality, "P042", "M", "20240102"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = "1.2.3.4", series, k + 1
        ds.FrameOfReferenceUID = "1.2.3.4.5"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin_lps[0], origin_lps[1], origin_lps[2] + k * spacing_zyx[0]]
        ds.PixelSpacing = [spacing_zyx[1], spacing_zyx[2]]
        ds.SliceThickness = spacing_zyx[0]
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        for key, val in (extra or {}).items():
            setattr(ds, key, val)
        ds.PixelData = np.ascontiguousarray(stored[k].astype("<i2")).tobytes()
        ds.save_as(folder / f"{modality}{k:03d}.dcm", enforce_file_format=True)


def test_cli_dicom_study_seg_matches_load_study_geometry(tmp_path, weights):
    from pydicom.dataset import Dataset

    ph = make_phantom(7, (24, 32, 32), spacing_mm=(3.0, 4.0, 4.0))
    info = Dataset()
    info.RadionuclideTotalDose, info.RadionuclideHalfLife, info.RadiopharmaceuticalStartTime = 3.5e8, 6586.2, "090000"
    pet = {
        "Units": "BQML",
        "DecayCorrection": "START",
        "PatientWeight": 70.0,
        "SeriesDate": "20240102",
        "SeriesTime": "100000",
        "RadiopharmaceuticalInformationSequence": [info],
    }
    study = tmp_path / "dicom_study"
    _write_dicom_series(
        study / "PT",
        "PT",
        np.round(ph.suv * 1000).astype(np.int16),
        (3.0, 4.0, 4.0),
        (-60.0, -70.0, 20.0),
        slope=0.5,
        extra=pet,
    )
    _write_dicom_series(
        study / "CT",
        "CT",
        np.clip(ph.ct + 1024, 0, 4000).astype(np.int16),
        (3.0, 4.0, 4.0),
        (-60.0, -70.0, 20.0),
        intercept=-1024.0,
    )
    out = tmp_path / "out"
    rc = predict.main(
        ["predict", "--input", str(study), "--weights", str(weights / "cascade"), "--out", str(out), *TILES]
    )
    assert rc == 0
    case = load_study(study)
    seg_aff, seg_shape, seg_dtype = _nifti_grid(out / "dicom_study_SEG.nii.gz")
    np.testing.assert_allclose(seg_aff, case.geometry.affine_array, atol=1e-5)
    assert seg_shape == tuple(reversed(case.geometry.shape)) and seg_dtype == np.uint8
    rep = json.loads((out / "dicom_study_report.json").read_text())
    assert rep["patient"]["patient_id"] == "P042" and rep["patient"]["patient_weight_kg"] == 70.0
    # the DICOM SEG (on by default for DICOM input) holds the NIfTI mask, slice by slice (tests/test_dicom_seg.py)
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(out / "dicom_study_SEG.dcm")
    assert rep["outputs"]["dicom_seg"] == "dicom_study_SEG.dcm" and seg.FrameOfReferenceUID == "1.2.3.4.5"
    mask = np.asarray(nib.load(out / "dicom_study_SEG.nii.gz").dataobj).transpose(2, 1, 0)
    pets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((study / "PT").iterdir())]
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in pets], assert_missing_frames_are_empty=True)
    for ds, frame in zip(pets, frames[..., 0]):  # axial slices 3 mm apart from z = 20 mm: plane (z - 20) / 3
        np.testing.assert_array_equal(frame, mask[round((float(ds.ImagePositionPatient[2]) - 20.0) / 3.0)])


def test_batch_with_a_corrupt_study_finishes_the_others_and_resumes(tmp_path, weights, capsys):
    root = tmp_path / "in"
    for name, seed in (("a_good", 1), ("b_bad", 2), ("c_good", 3)):
        _write_nifti_study(root / name, seed, shape=(24, 32, 32))
    suv = root / "b_bad" / "SUV.nii.gz"
    suv.write_bytes(suv.read_bytes()[:300])  # truncated file
    (root / "d_ct_only").mkdir()
    (root / "d_ct_only" / "CTres.nii.gz").write_bytes((root / "a_good" / "CTres.nii.gz").read_bytes())
    (root / "e_empty").mkdir()
    out = tmp_path / "out"
    argv = ["predict", "--input", str(root), "--weights", str(weights / "cascade"), "--out", str(out), *TILES]
    assert predict.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err  # every folder that is not a study is listed, with why
    assert f"skipped folder {root / 'd_ct_only'}: NIfTI files, but not a CT" in err
    assert f"skipped folder {root / 'e_empty'}: no DICOM or NIfTI study files" in err
    text = captured.out.splitlines()
    assert "2 folder(s) without a study" in text[3]
    assert text[0].startswith("[1/3] a_good: ok, TMTV") and text[0].endswith(" s")
    assert text[1].startswith("[2/3] b_bad: FAILED, skipped (") and "SUV.nii.gz" in text[1]
    assert text[2].startswith("[3/3] c_good: ok") and "2 ok, 0 skipped, 1 failed of 3" in text[3]
    assert text[4].startswith("  failed b_bad: ") and "SUV.nii.gz" in text[4]
    for name in ("a_good", "c_good"):
        assert all(p.is_file() for p in predict.output_paths(out, name).values())
    assert not any(p.name.startswith("b_bad") for p in out.iterdir())
    before = (out / "a_good_SEG.nii.gz").stat().st_mtime_ns
    assert predict.main(argv) == 1  # resume: good ones skipped, bad one retried
    text = capsys.readouterr().out
    assert "[1/3] a_good: skipped (outputs exist" in text and "[3/3] c_good: skipped" in text
    assert "[2/3] b_bad: FAILED" in text
    assert (out / "a_good_SEG.nii.gz").stat().st_mtime_ns == before


def test_an_autopet_tree_gets_one_id_per_study_in_predict_evaluate_and_prepare(tmp_path, weights, capsys):
    """autoPET's own layout, DATA/<patient>/<study date>/, with a date folder name holding spaces: every study is
    found, and clips-predict's outputs, clips-evaluate's cases and clips-prepare's case ids are one id."""
    from clips_jax import evaluate
    from clips_jax.data.prepare import prepare_dataset
    from clips_jax.data.store import CaseStore
    from clips_jax.metrics.report import read_metrics_csv

    root = tmp_path / "FDG-PET-CT-Lesions"
    dates = {"PETCT_a": ["03-23-2003-NA-PET-CT Ganzkoerper  primaer"], "PETCT_b": ["2001", "2004"]}
    for seed, (patient, date) in enumerate((p, d) for p, ds in dates.items() for d in ds):
        _write_nifti_study(root / patient / date, seed + 1, shape=(24, 32, 32))
    (root / "PETCT_b" / "notes").mkdir()  # no study: listed, as is an empty patient folder
    (root / "PETCT_c").mkdir()
    ids = ["PETCT_a__03-23-2003-NA-PET-CT_Ganzkoerper_primaer", "PETCT_b__2001", "PETCT_b__2004"]
    out = tmp_path / "out"
    argv = ["predict", "--input", str(root), "--weights", str(weights / "cascade"), "--out", str(out), *TILES]
    assert predict.main(argv) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()[:3]] == [
        f"[{k}/3] {s}" for k, s in enumerate(ids, 1)
    ]
    assert f"skipped folder {root / 'PETCT_b' / 'notes'}:" in captured.err
    assert f"skipped folder {root / 'PETCT_c'}:" in captured.err
    assert all(p.is_file() for sid in ids for p in predict.output_paths(out, sid).values())
    scored = tmp_path / "eval"
    assert evaluate.main(["evaluate", "--pred", str(out), "--truth", str(root), "--out", str(scored), "--nomips"]) == 0
    assert [row["case"] for row in read_metrics_csv(scored / "metrics.csv")] == ids
    prepare_dataset(root, tmp_path / "store", log=lambda m: None)
    store = CaseStore(tmp_path / "store")
    assert sorted(store.ids) == ids and sorted({c["patient"] for c in store.cases}) == ["PETCT_a", "PETCT_b"]


def test_weights_errors_exit_with_instructions(tmp_path, weights, capsys):
    study = tmp_path / "s"
    _write_nifti_study(study, 1, shape=(24, 32, 32))
    assert predict.main(["predict", "--input", str(study), "--out", str(tmp_path / "o")]) == 2  # usage
    msg = capsys.readouterr().err
    assert len(msg.strip().splitlines()) == 1
    assert "e_latest.model" in msg and "python -m convert_weights" in msg and "--weights weights/tmtv-net" in msg
    assert "github.com/qurit-frizi/TMTV-Net" in msg
    for bad, expect in (
        (tmp_path, "not a CLIPS-JAX weights directory"),
        (tmp_path / "nope", "no such directory"),
        (weights / "unet", "--stage_a_only"),
    ):
        assert (
            predict.main(["predict", "--input", str(study), "--weights", str(bad), "--out", str(tmp_path / "o")]) == 1
        )  # input errors
        err = capsys.readouterr().err
        assert expect in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_input_notes_say_how_the_input_was_read():
    from clips_jax.data.study import input_notes

    assert input_notes({"source": "nifti"}) == []
    notes = input_notes(
        {
            "ct_coverage": 0.8,
            "skipped_files": [{"file": "/s/PT/7.dcm", "reason": "damaged DICOM file"}],
            "pet_slices_resampled": True,
            "ct_resampled_to_pet": False,
            "notes": ["RadionuclideTotalDose 368.08 read as MBq"],
        }
    )
    assert notes[0].startswith("the CT covers 80 % of the PET's axial extent")
    assert "/s/PT/7.dcm" in notes[1] and "resampled onto a regular grid" in notes[2]
    assert notes[3] == "RadionuclideTotalDose 368.08 read as MBq" and len(notes) == 4
    report = {"input_notes": notes}
    assert all(f"- {n}" in predict.report_markdown({**_minimal_report(), **report}) for n in notes)


def _minimal_report():
    """A report dict with just what `report_markdown` reads (the other tests build real ones)."""
    prov = {"notice": "research use only", "software": "clips-jax", "weights_sha256": None}
    results = {k: 0.0 for k in ("tmtv_ml", "dmax_mm", "suv_max", "suv_mean", "tlg")}
    return {
        "study_id": "s",
        "input": "s",
        "outputs": {"seg": "s_SEG.nii.gz"},
        "grid": {"shape": [1, 1, 1], "spacing_mm": [1, 1, 1]},
        "results": {**results, "lesion_count": 0},
        "provenance": prov,
        "patient": {},
        "model": {"stage_a": {}, "stage_b": None},
        "options": {},
        "seconds": {},
        "software": {},
    }


def test_two_study_folders_with_one_study_id_are_refused(tmp_path, weights):
    for name in ("Patient 1", "Patient_1"):  # both become the study id "Patient_1": outputs would collide
        _write_nifti_study(tmp_path / "in" / name, 1, shape=(24, 32, 32))
    models = predict.load_models(weights / "cascade")
    with pytest.raises(predict.DataError, match="'Patient_1'.*rename one folder"):
        predict.run_batch(tmp_path / "in", tmp_path / "out", models, predict.Options(), out=io.StringIO())
