"""Tests of the shared foundation: geometry rules, NIfTI round trip and errors, atomic writes."""

import gzip

import numpy as np
import pytest

from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import load_nifti, save_nifti
from clips_jax.errors import DataError
from clips_jax.fileio import atomic_dir, atomic_path


def test_resampled_grid_is_anchored_at_voxel_zero():
    g = Geometry.from_spacing((326, 400, 400), (3.0, 2.0364, 2.0364), origin_xyz_mm=(-400.0, -350.0, 10.0))
    g6 = g.resampled(6.0)
    assert g6.shape == (round(326 * 3 / 6), round(400 * 2.0364 / 6), round(400 * 2.0364 / 6))
    np.testing.assert_allclose(g6.spacing_mm, (6, 6, 6))
    assert g6.origin_mm == g.origin_mm
    # PET voxel index i maps onto 6 mm continuous index i * s / 6: same world point.
    idx = np.array([10.0, 20.0, 30.0, 1.0])  # (x, y, z, 1) in PET voxels
    idx6 = idx.copy()
    idx6[:3] = idx[:3] * np.array(g.spacing_mm)[::-1] / 6.0
    np.testing.assert_allclose(g.affine_array @ idx, g6.affine_array @ idx6, atol=1e-9)


def test_nifti_round_trip_keeps_zyx_order_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    a = np.array([[0, 0, -2.0, 10], [0, 1.5, 0, 20], [3.0, 0, 0, 30], [0, 0, 0, 1]])  # oblique-ish permutation
    geom = Geometry((5, 6, 7), a)
    p = save_nifti(tmp_path / "x.nii.gz", arr, geom)
    back, g2 = load_nifti(p)
    np.testing.assert_array_equal(back, arr)
    assert g2.same_grid(geom)
    assert not list(tmp_path.glob(".*tmp*"))


def test_nifti_errors_name_the_file(tmp_path):
    arr = np.zeros((4, 4, 4), np.float32)
    p = save_nifti(tmp_path / "ok.nii.gz", arr, Geometry.from_spacing((4, 4, 4), (1, 1, 1)))
    raw = p.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        load_nifti(bad)
    nan = arr.copy()
    nan[1, 2, 3] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", nan, Geometry.from_spacing((4, 4, 4), (1, 1, 1)))
    with pytest.raises(DataError, match="nan.nii.gz.*NaN"):
        load_nifti(tmp_path / "nan.nii.gz")
    # Zero z-spacing in the sform (nibabel refuses to write one, so patch the header bytes: srow_z at 312).
    zp = save_nifti(tmp_path / "zero.nii", arr, Geometry.from_spacing((4, 4, 4), (1, 1, 1)))
    raw = bytearray(zp.read_bytes())
    raw[312 + 8 : 312 + 12] = np.float32(0.0).tobytes()
    zp.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="zero.nii.*spacing"):
        load_nifti(zp)
    (tmp_path / "notgz.nii.gz").write_bytes(gzip.compress(b"hello"))
    with pytest.raises(DataError, match="notgz"):
        load_nifti(tmp_path / "notgz.nii.gz")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x"


# ---- provenance of runs: the git commit and its fallbacks ---------------------------------------------------


def test_code_commit_is_empty_without_git_or_outside_a_checkout(monkeypatch):
    import subprocess

    from clips_jax import provenance

    provenance._code_commit.cache_clear()
    try:
        here = provenance.code_commit()
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=provenance.Path(provenance.__file__).parent,
            capture_output=True,
            text=True,
        )
        if head.returncode == 0:  # a source checkout (CI clones one)
            assert here["commit"] == head.stdout.strip() and isinstance(here["dirty"], bool)
        here["commit"] = "changed by the caller"
        assert provenance.code_commit() != here  # each call gets its own copy of the cached record

        def no_git(*args, **kwargs):
            raise FileNotFoundError("git")

        provenance._code_commit.cache_clear()
        monkeypatch.setattr(provenance.subprocess, "run", no_git)
        assert provenance.code_commit() == {}

        def untracked(cmd, **kwargs):  # e.g. a wheel installed inside a checkout: git answers, the file is not its
            return subprocess.CompletedProcess(cmd, 1 if "ls-files" in cmd else 0, "0" * 40, "")

        provenance._code_commit.cache_clear()
        monkeypatch.setattr(provenance.subprocess, "run", untracked)
        assert provenance.code_commit() == {}
    finally:
        provenance._code_commit.cache_clear()
