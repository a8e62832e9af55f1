"""Tests of the case store: difficulty measures vs hand counts, prepare (skip, failures, splits), CaseStore."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import load_nifti
from clips_jax.data.phantoms import write_phantoms
from clips_jax.data.prepare import assign_splits, is_native, parse_spacing, prepare_dataset, study_id
from clips_jax.data.store import CaseStore, difficulty_measures, dmax_centroids_mm
from clips_jax.errors import ConfigError, DataError


def _hand_case():
    """A (20, 16, 16) grid, spacing (2, 3, 4) mm, with 3 lesions under 18-connectivity (hand-made)."""
    seg = np.zeros((20, 16, 16), np.uint8)
    seg[2:4, 2:4, 2:4] = 1  # A: 8 voxels, centroid (2.5, 2.5, 2.5)
    seg[10, 10, 10] = 1  # B: 2 voxels joined by an edge (18-connected), centroid (10.5, 10.5, 10)
    seg[11, 11, 10] = 1
    seg[15, 5, 12:15] = 1  # C: 3 voxels, centroid (15, 5, 13)
    seg[16, 6, 15] = 1  # D: touches C only by a corner -> separate under 18-conn; (16, 6, 15)
    ct = np.full(seg.shape, -1000.0, np.float32)
    ct[:, 1:15, 1:15] = 40.0  # body: 20 * 14 * 14 voxels
    suv = np.where(ct > -500, 1.0, 0.0).astype(np.float32)
    suv[seg > 0] = 4.0
    suv[2, 2, 2] = 9.0
    return seg, suv, ct, (2.0, 3.0, 4.0)


def test_difficulty_measures_hand_case():
    seg, suv, ct, sp = _hand_case()
    m = difficulty_measures(seg, suv, ct, sp)
    vox = 2 * 3 * 4 / 1000.0
    assert m["n_lesions"] == 4
    assert m["tmtv_ml"] == pytest.approx(14 * vox)
    assert m["smallest_lesion_ml"] == pytest.approx(1 * vox)
    assert m["suv_max"] == pytest.approx(9.0)
    assert m["tbr"] == pytest.approx(9.0 / 1.0)  # body background is exactly 1
    assert m["body_ml"] == pytest.approx(20 * 14 * 14 * vox)
    cents = np.array([(2.5, 2.5, 2.5), (10.5, 10.5, 10.0), (15, 5, 13), (16, 6, 15)]) * np.array(sp)
    far = max(np.linalg.norm(a - b) for a in cents for b in cents)
    assert m["dmax_mm"] == pytest.approx(far)


def test_dmax_edge_cases():
    z = np.zeros((8, 8, 8), np.uint8)
    assert math.isnan(dmax_centroids_mm(z, 2.0))
    z[2:4, 2:4, 2:4] = 1
    assert dmax_centroids_mm(z, (2.0, 3.0, 4.0)) == 0.0
    z[7, 7, 7] = 1  # centroid distance (4.5, 4.5, 4.5) voxels
    assert dmax_centroids_mm(z, (1.0, 2.0, 3.0)) == pytest.approx(4.5 * math.sqrt(1 + 4 + 9))
    m = difficulty_measures(np.zeros((4, 4, 4)), np.ones((4, 4, 4)), np.zeros((4, 4, 4)), 1.0)
    assert m["n_lesions"] == 0 and m["tmtv_ml"] == 0.0
    assert all(math.isnan(m[k]) for k in ("smallest_lesion_ml", "suv_max", "tbr", "dmax_mm"))
    u = difficulty_measures(None, np.ones((4, 4, 4)), np.zeros((4, 4, 4)), 1.0)
    assert math.isnan(u["tmtv_ml"]) and u["body_ml"] == pytest.approx(64 / 1000)


def test_assign_splits():
    pats = {f"c{i}": f"p{i // 2}" for i in range(40)}  # 20 patients, 2 studies each
    s = assign_splits(pats, seed=3)
    assert s == assign_splits(pats, seed=3)
    assert s != assign_splits(pats, seed=4)
    for i in range(0, 40, 2):
        assert s[f"c{i}"] == s[f"c{i + 1}"]  # by patient
    n = {k: sum(v == k for v in s.values()) for k in ("train", "val", "test")}
    assert n == {"train": 28, "val": 6, "test": 6}  # 14 / 3 / 3 patients
    j = assign_splits(pats, split_json={"train": ["p0"], "val": ["c2"], "test": []})
    assert j["c0"] == j["c1"] == "train" and j["c2"] == "val" and j["c3"] == "unused"
    with pytest.raises(ConfigError):
        assign_splits(pats, split_json={"train": ["p0"], "val": ["p0"]})
    with pytest.raises(ConfigError):
        assign_splits(pats, split_json={"training": []})


# ---- prepare + CaseStore on tiny phantoms -------------------------------------------------------------


@pytest.fixture()
def dataset(tmp_path):
    data = tmp_path / "data"
    paths = write_phantoms(data, 4, seed=2, size=(36, 24, 24), spacing_mm=(4.0, 4.0, 4.0))
    return data, paths


def test_prepare_store_and_rerun(dataset, tmp_path):
    data, paths = dataset
    (paths[3] / "SEG.nii.gz").unlink()  # an unlabeled study
    cache = tmp_path / "cache"
    lines = []
    s = prepare_dataset(data, cache, spacing_mm=6.0, seed=0, log=lines.append)
    assert len(s["prepared"]) == 4 and not s["failed"]
    assert "summary" in lines[-1]
    store = CaseStore(cache)
    assert store.ids == sorted(p.name for p in paths)
    for i, p in enumerate(paths[:3]):
        truth = json.loads((p / "truth.json").read_text())
        seg, g = load_nifti(p / "SEG.nii.gz", dtype=np.uint8)
        c = store.cases[store.index(p.name)]
        assert c["has_seg"] and c["n_lesions"] == truth["n_lesions"]
        assert c["tmtv_ml"] == pytest.approx(truth["tmtv_ml"])
        assert Geometry.from_json(c["native_geometry"]).same_grid(g)
        if truth["n_lesions"]:
            assert c["smallest_lesion_ml"] == pytest.approx(min(les["volume_ml"] for les in truth["lesions"]))
            assert c["suv_max"] == pytest.approx(max(les["suv_max"] for les in truth["lesions"]), rel=1e-5)
        arr = store.case_arrays(p.name)
        rg = g.resampled(6.0)
        assert store.geometry(p.name).same_grid(rg)
        assert arr["ct"].shape == arr["suv"].shape == arr["seg"].shape == rg.shape
        assert isinstance(arr["ct"], np.memmap) and arr["seg"].dtype == np.uint8
        np.testing.assert_array_equal(np.argwhere(arr["seg"] > 0), store.foreground(p.name))
    un = store.index(paths[3].name)
    assert not store.has_seg[un] and not store.has_lesion[un]
    assert np.isnan(store.difficulty("tmtv_ml")[un])
    assert store.case_arrays(un)["seg"].max() == 0
    np.testing.assert_array_equal(
        store.has_lesion, [bool(store.cases[i]["has_seg"]) and store.cases[i]["tmtv_ml"] > 0 for i in range(4)]
    )
    allidx = np.sort(np.concatenate([store.split_indices(k) for k in ("train", "val", "test")]))
    np.testing.assert_array_equal(allidx, np.arange(4))
    json.loads((cache / "manifest.json").read_text())  # strict JSON (NaN written as null)
    # re-run: everything skipped, arrays untouched
    mt = (cache / "cases" / store.ids[0] / "ct.npy").stat().st_mtime_ns
    s2 = prepare_dataset(data, cache, log=lambda m: None)
    assert len(s2["skipped"]) == 4 and not s2["prepared"]
    assert (cache / "cases" / store.ids[0] / "ct.npy").stat().st_mtime_ns == mt
    assert CaseStore(cache).manifest["cases"] == store.manifest["cases"]
    with pytest.raises(DataError):
        CaseStore(tmp_path / "nothing")


def test_prepare_reports_corrupt_case(dataset, tmp_path):
    data, paths = dataset
    bad = paths[1] / "SUV.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip
    lines = []
    s = prepare_dataset(data, tmp_path / "c", log=lines.append)
    assert s["failed"] == [paths[1].name] and len(s["prepared"]) == 3
    assert sum("FAILED" in m and paths[1].name in m for m in lines) == 1
    assert paths[1].name not in CaseStore(tmp_path / "c").ids
    assert not (tmp_path / "c" / "cases" / paths[1].name).exists()


def test_prepare_lists_skipped_folders_names_unlabelled_studies_and_creates_nothing_on_failure(dataset, tmp_path):
    data, paths = dataset
    (paths[3] / "SEG.nii.gz").unlink()  # an unlabelled study
    (data / "empty_folder").mkdir()
    (data / "only_ct").mkdir()
    (paths[0] / "CTres.nii.gz").rename(data / "only_ct" / "CTres.nii.gz")  # paths[0] is no study any more
    lines = []
    s = prepare_dataset(data, tmp_path / "c", log=lines.append)
    assert set(s["not_studies"]) == {str(data / "empty_folder"), str(data / "only_ct"), str(paths[0])}
    assert sum(line.startswith("skipped folder") for line in lines) == 3
    (line,) = [m for m in lines if paths[3].name in m and ": ok" in m]
    assert "no lesion mask" in line and "nan" not in line
    assert all(c["input_notes"] == [] for c in CaseStore(tmp_path / "c").cases)  # phantoms: nothing to say
    # every study fails: no store folder is left behind, and the summary says so
    for p in paths[1:]:
        (p / "SUV.nii.gz").write_bytes(b"broken")
    lines = []
    s = prepare_dataset(data, tmp_path / "none", log=lines.append)
    assert len(s["failed"]) == 3 and not s["prepared"]
    assert not (tmp_path / "none").exists() and "nothing written" in lines[-4]


def test_prepare_usage_errors_leave_no_folder(tmp_path):
    for argv, code in (
        (["--input", str(tmp_path / "missing")], 1),
        (["--input", str(tmp_path)], 1),  # a folder without studies
        (["--input", str(tmp_path), "--split", str(tmp_path / "no_split.json")], 1),
        (["--input", str(tmp_path), "--spacing", "abc"], 2),
    ):
        out = tmp_path / "store"
        r = subprocess.run(
            [sys.executable, "-m", "clips_jax.data.prepare", *argv, "--output", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == code, (argv, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert not out.exists(), argv


def test_study_id(tmp_path):
    (tmp_path / "PETCT_a" / "2001-01").mkdir(parents=True)
    assert study_id(tmp_path, tmp_path / "PETCT_a" / "2001-01") == ("PETCT_a__2001-01", "PETCT_a")


def test_prepare_cli(dataset, tmp_path):
    data, paths = dataset
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [paths[0].name, paths[1].name], "val": [paths[2].name], "test": []}))
    cache = tmp_path / "cli_cache"
    cmd = [
        sys.executable,
        "-m",
        "clips_jax.data.prepare",
        "--input",
        str(data),
        "--output",
        str(cache),
        "--split",
        str(split),
        "--dtype",
        "float16",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "summary: 4 studies, 4 prepared" in r.stdout
    store = CaseStore(cache)
    assert [store.cases[i]["split"] for i in range(4)] == ["train", "train", "val", "unused"]
    assert store.case_arrays(0)["ct"].dtype == np.float16
    (paths[3] / "CTres.nii.gz").write_bytes(b"not a nifti")
    (cache / "cases" / paths[3].name / "ct.npy").unlink()  # forces a redo of that case, which now fails
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stdout and "3 already done" in r.stdout


def test_prepare_native_grid_keeps_the_pet_grid(dataset, tmp_path):
    from clips_jax.data.study import load_study

    data, paths = dataset
    cache = tmp_path / "native"
    s = prepare_dataset(data, cache, spacing_mm="native", log=lambda m: None)
    assert len(s["prepared"]) == 4 and not s["failed"]
    store = CaseStore(cache)
    assert store.manifest["spacing_mm"] is None and store.manifest["grid"] == "native"
    for p in paths[:2]:
        case = load_study(p)
        assert store.geometry(p.name).same_grid(case.geometry)
        assert store.native_geometry(p.name).same_grid(case.geometry)
        arr = store.case_arrays(p.name)
        np.testing.assert_array_equal(arr["ct"], case.ct)  # no resampling at all
        np.testing.assert_array_equal(arr["suv"], case.suv)
        np.testing.assert_array_equal(arr["seg"], case.seg)
    # the same store cannot be continued at another spacing; the same spacing (0 == native) just skips
    with pytest.raises(ConfigError, match="another --output"):
        prepare_dataset(data, cache, spacing_mm=6.0, log=lambda m: None)
    assert len(prepare_dataset(data, cache, spacing_mm=0, log=lambda m: None)["skipped"]) == 4


def test_parse_spacing():
    assert parse_spacing("native") == "native" and parse_spacing("NATIVE") == "native"
    assert parse_spacing("0") == "native"
    assert parse_spacing("6") == 6.0 and parse_spacing("3,4,4") == [3.0, 4.0, 4.0]
    for bad in ("", "x", "1,2", "-6", "6,0,6"):
        with pytest.raises(ConfigError):
            parse_spacing(bad)
    assert is_native(None) and is_native(0.0) and not is_native(6.0) and not is_native((6.0, 6.0, 6.0))


def test_case_arrays_extra(dataset, tmp_path):
    data, paths = dataset
    prepare_dataset(data, tmp_path / "c", log=lambda m: None)
    store = CaseStore(tmp_path / "c")
    shape = store.geometry(0).shape
    p = np.linspace(0, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    np.save(store.case_dir(0) / "stage_a.npy", p.astype(np.float16))
    a = store.case_arrays(0, extra=("stage_a",))
    assert set(a) == {"ct", "suv", "seg", "stage_a"} and a["stage_a"].dtype == np.float16
    np.testing.assert_array_equal(a["stage_a"], p.astype(np.float16))
    assert set(store.case_arrays(0)) == {"ct", "suv", "seg"}  # default unchanged
    assert store.missing_extra(("stage_a",)) == store.ids[1:]
    with pytest.raises(ConfigError, match="clips_jax.stage_a") as e:
        store.case_arrays(1, extra=("stage_a",))
    assert store.ids[1] in str(e.value)
    store.require_extra(("stage_a",), [0])
    with pytest.raises(ConfigError):
        store.require_extra(("stage_a",))
    np.save(store.case_dir(0) / "stage_a.npy", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(DataError, match="shape"):
        store.case_arrays(0, extra=("stage_a",))


def test_store_of_a_newer_format_is_refused(tmp_path):
    import json as _json

    from clips_jax.data.store import MANIFEST_VERSION, CaseStore
    from clips_jax.errors import DataError

    (tmp_path / "manifest.json").write_text(_json.dumps({"version": MANIFEST_VERSION + 1, "cases": []}))
    with pytest.raises(DataError, match="newer than this clips-jax"):
        CaseStore(tmp_path)
    (tmp_path / "manifest.json").write_text(_json.dumps({"version": MANIFEST_VERSION, "cases": []}))
    assert len(CaseStore(tmp_path)) == 0


def test_prepare_refuses_a_store_it_cannot_read_and_touches_nothing(dataset, tmp_path):
    data, _ = dataset
    import json as _json

    from clips_jax.data.store import MANIFEST_VERSION
    from clips_jax.errors import DataError

    out = tmp_path / "cache"
    prepare_dataset(data, out, spacing_mm=6.0, seed=0, log=lambda m: None)
    doc = _json.loads((out / "manifest.json").read_text())
    doc["version"] = MANIFEST_VERSION + 1  # a store written by a newer clips-jax
    (out / "manifest.json").write_text(_json.dumps(doc))
    before = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="newer than this clips-jax"):
        prepare_dataset(data, out, spacing_mm=6.0, seed=0, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()} == before
    (out / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="unreadable manifest.*delete it and run prepare again"):
        prepare_dataset(data, out, spacing_mm=6.0, seed=0, log=lambda m: None)


# ---- the manifest's one writer: lock, derived namespace, migration ------------------------------------------


def _tiny_manifest(path, n=4, version=None, top=None, extra=None):
    """A hand-written manifest of `n` cases c0..; `extra` {case index: more entry keys}, `top`: more top keys."""
    cases = [
        {"id": f"c{i}", "split": "train", "has_seg": True, "tmtv_ml": float(i + 1), **(extra or {}).get(i, {})}
        for i in range(n)
    ]
    doc = {"spacing_mm": [6.0] * 3, "grid": "resampled", "cases": cases, **(top or {})}
    if version is not None:
        doc["version"] = version
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(doc))
    return doc


def test_update_api_derived_namespace_and_permissions(tmp_path):
    import os
    import stat

    from clips_jax.data.store import MANIFEST_VERSION

    _tiny_manifest(tmp_path / "s")
    store = CaseStore(tmp_path / "s")
    old_mask = os.umask(0o027)
    try:
        store.set_derived("stage_a", {"c1": {"weights": "w"}})
    finally:
        os.umask(old_mask)
    path = tmp_path / "s" / "manifest.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # from the umask, not mkstemp's 0600
    assert (tmp_path / "s" / ".manifest.lock").is_file()
    disk = json.loads(path.read_text())
    assert disk["version"] == MANIFEST_VERSION and disk["grid"] == "resampled"
    assert disk["cases"][1]["derived"] == {"stage_a": {"weights": "w"}} and "derived" not in disk["cases"][0]
    assert store.derived("c1", "stage_a") == {"weights": "w"} and store.derived(0, "stage_a") is None  # refreshed
    # teacher losses: per teacher id, NaN -> null -> NaN; the default teacher is what readers get
    store.set_teacher_losses("A", {"c0": 0.25, "c1": float("nan")}, {"model": "unet"})
    store.set_teacher_losses("B", {"c0": 0.75}, {"model": "x"}, default=False)
    again = CaseStore(tmp_path / "s")
    assert again.teachers == {"A": {"model": "unet"}, "B": {"model": "x"}} and again.default_teacher == "A"
    assert again.cases[0]["derived"]["teacher"] == {"A": 0.25, "B": 0.75}
    rows = again.case_rows()
    assert rows[0]["teacher_loss"] == 0.25 and math.isnan(rows[1]["teacher_loss"]) and "teacher_loss" not in rows[2]
    assert again.case_rows("B")[0]["teacher_loss"] == 0.75 and "teacher_loss" not in again.case_rows("B")[1]
    assert "teacher_loss" not in again.cases[0]  # the prepared entry is not changed by the accessor
    with pytest.raises(ConfigError, match="no teacher 'C'"):
        again.case_rows("C")
    # unknown case ids or a failing change: nothing written
    text = path.read_text()
    with pytest.raises(DataError, match="nope"):
        store.set_derived("stage_a", {"c0": {}, "nope": {}})
    with pytest.raises(DataError, match="nope"):
        store.set_teacher_losses("A", {"nope": 0.1}, None)

    def boom(doc):
        doc["cases"] = []
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update(boom)
    assert path.read_text() == text and len(store) == 4
    store.update_cases({"c3": lambda e: e.update(split="val")})
    assert CaseStore(tmp_path / "s").split_indices("val").tolist() == [3]


def test_version1_manifest_is_migrated_on_read(tmp_path):
    from clips_jax.data.store import LEGACY_TEACHER, MANIFEST_VERSION

    rec = {"source": "/w", "model": "unet", "loss": "soft_dice"}
    v1 = _tiny_manifest(
        tmp_path / "s",
        version=1,
        top={"teacher": rec, "seed": 3},
        extra={
            0: {"stage_a": {"weights": "w"}, "teacher_loss": 0.5, "teacher": rec},
            1: {"teacher_loss": None, "teacher": rec},
            2: {"teacher_loss": 0.1, "teacher": {**rec, "loss": "combined"}},
        },
    )  # a mixed column
    store = CaseStore(tmp_path / "s")
    assert store.manifest["version"] == MANIFEST_VERSION and store.manifest["seed"] == 3
    assert store.derived(0, "stage_a") == {"weights": "w"}
    assert all(k not in c for c in store.cases for k in ("stage_a", "teacher_loss", "teacher"))
    assert store.default_teacher == LEGACY_TEACHER and store.teachers == {LEGACY_TEACHER: rec}
    # readers get the old column exactly as it was
    old = {c["id"]: c.get("teacher_loss", "absent") for c in v1["cases"]}
    new = {r["id"]: r.get("teacher_loss", "absent") for r in store.case_rows()}
    assert new["c0"] == 0.5 and math.isnan(new["c1"]) and new["c2"] == 0.1 and new["c3"] == old["c3"] == "absent"
    # the file is rewritten in the new format at its next update, keeping the migrated data
    store.set_derived("stage_a", {"c3": {"weights": "v"}})
    disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert disk["version"] == MANIFEST_VERSION and "teacher" not in disk and disk["seed"] == 3
    assert disk["cases"][0]["derived"] == {"stage_a": {"weights": "w"}, "teacher": {LEGACY_TEACHER: 0.5}}
    assert CaseStore(tmp_path / "s").case_rows()[2]["teacher_loss"] == 0.1


_WRITER = r"""
import pathlib, sys, time
from clips_jax.data.store import CaseStore
store_dir, ids, n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
store = CaseStore(store_dir)
barrier = pathlib.Path(store_dir) / "barrier"
(barrier / ids[0]).touch()  # start together: both processes are imported and ready before the first update
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.001)
for k in range(n):
    store.update_cases({cid: (lambda e, k=k: e.setdefault("derived", {}).setdefault("probe", []).append(k))
                        for cid in ids})
"""


def test_two_processes_updating_different_cases_lose_nothing(tmp_path):
    """Two writers at once (each re-reads, changes and rewrites the whole manifest, many times): every update of
    both is in the final file (without the lock, one writer's rewrite drops the other's recent updates)."""
    _tiny_manifest(tmp_path / "s", n=4)
    (tmp_path / "s" / "barrier").mkdir()
    n = 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / "s"), ids, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ids in ("c0,c1", "c2,c3")
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    store = CaseStore(tmp_path / "s")
    for i in range(4):
        assert store.derived(i, "probe") == list(range(n)), store.ids[i]
    assert [c["tmtv_ml"] for c in store.cases] == [1.0, 2.0, 3.0, 4.0]


def test_prepare_keeps_derived_data_of_kept_cases_and_drops_it_for_redone_ones(dataset, tmp_path):
    data, paths = dataset
    cache = tmp_path / "c"
    prepare_dataset(data, cache, log=lambda m: None)
    store = CaseStore(cache)
    a, b = store.ids[0], store.ids[1]
    store.set_derived("stage_a", {a: {"weights": "w"}, b: {"weights": "w"}})
    store.set_teacher_losses("T", {a: 0.5, b: 0.25}, {"model": "unet"})
    (cache / "cases" / b / "ct.npy").unlink()  # forces a redo of case b
    s = prepare_dataset(data, cache, log=lambda m: None)
    assert s["prepared"] == [b] and len(s["skipped"]) == 3
    again = CaseStore(cache)
    assert again.derived(a, "stage_a") == {"weights": "w"} and again.teacher_losses() == {a: 0.5}
    assert again.derived(b, "stage_a") is None and again.teachers == {"T": {"model": "unet"}}


def test_a_file_system_without_locks_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from clips_jax import fileio
    from clips_jax.data import store as st

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    with pytest.raises(DataError, match="cannot lock the store's manifest.*local disk"):
        st.update_manifest(tmp_path / "c", lambda doc: doc.update(x=1), create=True)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_prepare_stops_at_a_manifest_it_cannot_write_instead_of_failing_every_case(dataset, tmp_path, monkeypatch):
    import errno

    from clips_jax import fileio

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    data, paths = dataset
    lines = []
    with pytest.raises(DataError, match="cannot lock the store's manifest"):
        prepare_dataset(data, tmp_path / "c", log=lines.append)
    assert sum(": ok," in m for m in lines) == 1 and not any("FAILED" in m for m in lines)  # stopped at once
