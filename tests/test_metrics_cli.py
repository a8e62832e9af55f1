"""End-to-end `python -m clips_jax.evaluate` on tiny NIfTI cases written by the test."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clips_jax.data.geometry import Geometry
from clips_jax.data.nifti import save_nifti
from clips_jax.errors import ConfigError, DataError
from clips_jax.evaluate import find_cases, main, parse_pred_args
from clips_jax.metrics import COLUMNS, case_metrics, read_metrics_csv

SP = (3.0, 2.0, 2.5)
SHAPE = (12, 16, 14)
GEOM = Geometry.from_spacing(SHAPE, SP, (-10.0, 5.0, 100.0))


def _blob(lo, hi, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return m


@pytest.fixture
def dataset(tmp_path):
    truth, pa, pb, suvd = (tmp_path / n for n in ("truth", "predA", "predB", "suv"))
    rng = np.random.default_rng(0)
    cases = {}
    for i, case in enumerate(["c1", "c2", "c3", "c4", "c5"]):
        t = _blob((2, 3, 3), (6 + i % 3, 9, 8)) | _blob((8, 10, 9), (10, 13, 12))
        cases[case] = t
        suv = (rng.random(SHAPE) * 3 + 6 * t).astype(np.float32)
        layout = {
            "c1": truth / "c1.nii.gz",
            "c2": truth / "c2_SEG.nii.gz",
            "c3": truth / "c3" / "SEG.nii.gz",
            "c4": truth / "c4_SEG.nii.gz",
            "c5": truth / "c5.nii.gz",
        }[case]
        save_nifti(layout, t, GEOM)
        save_nifti(suvd / ("c3/SUV.nii.gz" if case == "c3" else f"{case}_SUV.nii.gz"), suv, GEOM)
    # experiment A: shifted masks; c4 on another grid; c5 missing; c9 has no truth
    for case in ("c1", "c2", "c3"):
        save_nifti(pa / f"{case}.nii.gz", np.roll(cases[case], 1, axis=2), GEOM)
        save_nifti(pb / f"{case}_SEG.nii.gz", cases[case], GEOM)
    save_nifti(pa / "c4.nii.gz", np.zeros((12, 16, 15), np.uint8), Geometry.from_spacing((12, 16, 15), (3.0, 2.0, 2.0)))
    save_nifti(pa / "c9.nii.gz", cases["c1"], GEOM)
    save_nifti(pb / "c4_SEG.nii.gz", cases["c4"], GEOM)
    save_nifti(pb / "c5_SEG.nii.gz", np.zeros(SHAPE, np.uint8), GEOM)
    return {"truth": truth, "A": pa, "B": pb, "suv": suvd, "cases": cases, "root": tmp_path}


def test_find_cases_layouts(dataset):
    found = find_cases(dataset["truth"])
    assert list(found) == ["c1", "c2", "c3", "c4", "c5"]
    assert found["c3"].name == "SEG.nii.gz"
    assert list(find_cases(dataset["suv"], "suv")) == ["c1", "c2", "c3", "c4", "c5"]
    with pytest.raises(DataError, match="no NIfTI"):
        find_cases(_empty(dataset["root"]))
    with pytest.raises(DataError, match="not found"):
        find_cases(dataset["root"] / "nope")


def test_find_cases_ids_are_predicts_and_two_names_for_one_id_are_refused(tmp_path):
    """A case's id is the one clips-predict writes (`a b/SEG` -> "a_b", `P/d/SEG` -> "P__d"), so a plain
    prediction `a b.nii.gz` still meets its truth folder; two names that give one id are an error, not a merge."""
    save_nifti(tmp_path / "truth" / "a b" / "SEG.nii.gz", np.zeros(SHAPE, np.uint8), GEOM)
    save_nifti(tmp_path / "truth" / "P" / "d" / "SEG.nii.gz", np.zeros(SHAPE, np.uint8), GEOM)
    save_nifti(tmp_path / "pred" / "a b.nii.gz", np.zeros(SHAPE, np.uint8), GEOM)
    assert list(find_cases(tmp_path / "truth")) == ["P__d", "a_b"] and list(find_cases(tmp_path / "pred")) == ["a_b"]
    save_nifti(tmp_path / "truth" / "a_b" / "SEG.nii.gz", np.zeros(SHAPE, np.uint8), GEOM)
    with pytest.raises(DataError, match="'a b' and 'a_b' both give the case id 'a_b'"):
        find_cases(tmp_path / "truth")


def _empty(root):
    d = root / "empty"
    d.mkdir()
    return d


def test_parse_pred_args():
    assert parse_pred_args(["a=x/y", "z/w"]) == {"a": Path("x/y"), "w": Path("z/w")}
    with pytest.raises(ConfigError, match="twice"):
        parse_pred_args(["a=x", "a=y"])


def test_cli_two_experiments(dataset, capsys):
    out = dataset["root"] / "out"
    rc = main(
        [
            "clips-evaluate",
            "--pred",
            f"A={dataset['A']}",
            "--pred",
            f"B={dataset['B']}",
            "--truth",
            str(dataset["truth"]),
            "--suv",
            str(dataset["suv"]),
            "--out",
            str(out),
            "--tolerance_mm",
            "3",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    # mismatched grid: a clear line naming the case and both shapes/spacings
    line = next(ln for ln in err.splitlines() if "case c4" in ln and "grid" in ln)
    assert "(12, 16, 15)" in line and "(12, 16, 14)" in line and "2.5" in line and "skipped" in line
    assert "case c9" in err and "no ground truth" in err
    assert "case c5: no prediction in A" in err

    with open(out / "A" / "metrics.csv", newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == COLUMNS
    rows_a = read_metrics_csv(out / "A" / "metrics.csv")
    rows_b = read_metrics_csv(out / "B" / "metrics.csv")
    assert [r["case"] for r in rows_a] == ["c1", "c2", "c3"]
    assert [r["case"] for r in rows_b] == ["c1", "c2", "c3", "c4", "c5"]
    # values equal the library's on the same arrays (after the CSV's 6 significant digits)
    t = dataset["cases"]["c2"].astype(bool)
    from clips_jax.data.nifti import load_nifti

    suv, _ = load_nifti(dataset["suv"] / "c2_SUV.nii.gz")
    ref = case_metrics(np.roll(t, 1, axis=2), t, SP, suv, tolerance_mm=3.0)
    for k in COLUMNS[1:]:
        assert rows_a[1][k] == pytest.approx(ref[k], rel=1e-5, nan_ok=True), k
    assert all(r["dice"] == 1.0 for r in rows_b[:4])
    assert rows_b[4]["dice"] == 0.0 and rows_b[4]["nsd"] == 0.0  # c5: empty prediction
    assert math.isnan(rows_b[4]["hd_mm"]) and rows_b[4]["fnv_ml"] == pytest.approx(rows_b[4]["tmtv_true_ml"])
    # text reports, plots, summary
    rep = (out / "A" / "reports" / "c2.txt").read_text()
    assert rep.startswith("Patient: c2") and "NSD at 3 mm" in rep and "Approach 2" in rep
    for png in (out / "boxplots.png", out / "A" / "bland_altman.png", out / "B" / "mips" / "c3.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    summary = (out / "summary.md").read_text()
    assert "## A" in summary and "## B" in summary and "case c4" in summary and "| dice |" in summary
    # nothing half-written left behind
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_cli_single_experiment_module_entry(dataset):
    out = dataset["root"] / "single"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clips_jax.evaluate",
            "--pred",
            str(dataset["B"]),
            "--truth",
            str(dataset["truth"]),
            "--out",
            str(out),
            "--nomips",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = read_metrics_csv(out / "metrics.csv")
    assert len(rows) == 5 and all(math.isnan(r["suv_max"]) for r in rows)  # no --suv
    s = (out / "summary.md").read_text()
    assert "5 cases: 5 with lesions, 0 lesion-free." in s
    assert not (out / "mips").exists()


def test_cli_nothing_to_score(tmp_path, dataset):
    rc = main(
        ["clips-evaluate", "--pred", str(dataset["A"]), "--truth", str(_empty(tmp_path)), "--out", str(tmp_path / "o")]
    )
    assert rc == 1  # an input error (an empty folder), not a usage error
