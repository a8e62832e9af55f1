"""Tests of the synthetic PET/CT phantoms: determinism, ground truth consistency, realistic HU/SUV ranges."""

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from clips_jax.data.nifti import load_nifti
from clips_jax.data.phantoms import SIZES, case_id, make_phantom, write_phantoms
from clips_jax.errors import ConfigError

STRUCT18 = ndi.generate_binary_structure(3, 2)


@pytest.fixture(scope="module")
def phantoms():
    return {s: make_phantom(s, "small") for s in range(10)}


def test_deterministic_by_seed(phantoms):
    again = make_phantom(3, "small")
    p = phantoms[3]
    np.testing.assert_array_equal(again.ct, p.ct)
    np.testing.assert_array_equal(again.suv, p.suv)
    np.testing.assert_array_equal(again.seg, p.seg)
    assert again.truth == p.truth
    other = phantoms[4]
    assert not np.array_equal(other.suv, p.suv)
    assert not np.array_equal(other.ct, p.ct)


def test_shapes_dtypes_geometry(phantoms):
    p = phantoms[1]
    assert p.ct.shape == p.suv.shape == p.seg.shape == SIZES["small"] == p.geometry.shape
    assert p.ct.dtype == np.float32 and p.suv.dtype == np.float32 and p.seg.dtype == np.uint8
    np.testing.assert_allclose(p.geometry.spacing_mm, (3.0, 2.04, 2.04))
    assert set(np.unique(p.seg)) <= {0, 1}
    assert p.suv.min() >= 0.0
    q = make_phantom(1, (40, 32, 24), spacing_mm=(4.0, 3.0, 3.0))
    assert q.ct.shape == (40, 32, 24)
    with pytest.raises(ConfigError):
        make_phantom(0, "huge")


def test_truth_matches_mask(phantoms):
    n_free = 0
    for p in phantoms.values():
        t = p.truth
        vox = p.geometry.voxel_volume_ml
        lab, n = ndi.label(p.seg, structure=STRUCT18)
        assert n == t["n_lesions"] == len(t["lesions"])
        assert t["tmtv_ml"] == pytest.approx(p.seg.sum() * vox)
        n_free += n == 0
        for les in t["lesions"]:
            # the component containing the lesion centre voxel is that lesion: same voxel count and SUVmax
            ci = tuple(int(round(v)) for v in les["centre_voxel_zyx"])
            comp = lab[ci]
            assert comp > 0
            assert les["volume_ml"] == pytest.approx((lab == comp).sum() * vox)
            assert les["suv_max"] == pytest.approx(float(p.suv[lab == comp].max()), rel=1e-6)
            assert les["site"] in {"cervical", "axillary", "mediastinal", "para-aortic", "inguinal", "spleen"}
            assert 2.5 <= les["suv_nominal"] <= 30.0
            # world centre maps back to the voxel centre through the affine
            z, y, x = les["centre_zyx_mm"]
            ijk = np.linalg.solve(p.geometry.affine_array, [x, y, z, 1.0])[:3][::-1]
            np.testing.assert_allclose(ijk, les["centre_voxel_zyx"], atol=2e-3)
        assert len(t["lesions"]) <= 30
    assert n_free >= 1  # ~20 % lesion-free


def test_realistic_organ_values():
    p = make_phantom(11, "full")
    u = p.truth["uptake"]
    sp = np.asarray(p.geometry.spacing_mm)

    def centre_idx(zyx_mm):
        return tuple(int(round(v)) for v in np.asarray(zyx_mm) / sp + (np.asarray(p.ct.shape) - 1) / 2)

    def region(zyx_mm, half=2):
        c = centre_idx(zyx_mm)
        sl = tuple(slice(v - half, v + half + 1) for v in c)
        return p.ct[sl], p.suv[sl]

    # organ centres of the reference anatomy ("full" has scale 1), away from lesions by construction of sites
    ct_brain, suv_brain = region((400.0, 10.0, 0.0))
    ct_liver, suv_liver = region((-20.0, 10.0, -70.0))
    ct_lung, suv_lung = region((130.0, 0.0, -72.0))
    ct_bladder, suv_bladder = region((-232.0, 30.0, 0.0))
    ct_spine, _ = region((0.0, -82.0, 0.0), half=1)
    assert np.all(p.ct[0, 0, :5] < -900)  # air in the corner
    assert -950 < ct_lung.mean() < -750 and suv_lung.mean() < 1.0
    assert 0 < ct_liver.mean() < 100 and 1.7 < suv_liver.mean() < 2.8
    assert 6.0 < suv_brain.mean() < 11.0 and 0 < ct_brain.mean() < 80
    assert 8.0 < suv_bladder.mean() < 32.0 and 7.0 < suv_bladder.mean() / u["bladder"] * 10 < 11.0
    assert ct_spine.mean() > 400
    assert 7.0 <= u["brain"] <= 10.0 and 2.0 <= u["heart"] <= 8.0 and 3.0 <= u["kidney"] <= 6.0
    assert 0.5 <= u["background"] <= 1.0
    body = p.ct > -500
    assert 0.2 < body.mean() < 0.8


def test_write_phantoms_layout_and_skip(tmp_path):
    paths = write_phantoms(tmp_path, 2, seed=5, size=(32, 24, 24))
    assert [q.name for q in paths] == [case_id(5, 0), case_id(5, 1)]
    for q in paths:
        assert sorted(f.name for f in q.iterdir()) == ["CTres.nii.gz", "SEG.nii.gz", "SUV.nii.gz", "truth.json"]
    ct, g = load_nifti(paths[0] / "CTres.nii.gz")
    seg, _ = load_nifti(paths[0] / "SEG.nii.gz", dtype=np.uint8)
    truth = json.loads((paths[0] / "truth.json").read_text())
    assert ct.shape == (32, 24, 24) and g.shape == (32, 24, 24)
    assert truth["case_id"] == case_id(5, 0)
    assert seg.sum() * g.voxel_volume_ml == pytest.approx(truth["tmtv_ml"])
    mtime = (paths[0] / "SUV.nii.gz").stat().st_mtime_ns
    write_phantoms(tmp_path, 3, seed=5, size=(32, 24, 24))  # existing cases skipped, one new
    assert (paths[0] / "SUV.nii.gz").stat().st_mtime_ns == mtime
    assert (tmp_path / case_id(5, 2) / "truth.json").is_file()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary leftovers
