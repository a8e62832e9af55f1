"""The maintenance scripts of scripts/ on small fabricated inputs (they read records; nothing is trained)."""

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_curricula_in_study_reads_archived_stage_rows(tmp_path, capsys):
    cis = _load("curricula_in_study")
    run = tmp_path / "runs" / "exp3s" / "seed0"
    run.mkdir(parents=True)
    rows = [{"kind": "train", "step": 1, "loss": 1.0}]
    for stage in range(8):  # bucket 4 (hardest) in the first half, bucket 0 in the second
        mass = [0.0] * 10
        mass[9 if stage < 4 else 0] = 0.7
        rows.append(
            {"kind": "curriculum", "step": 10 * stage, "stage": stage, "decile_mass": mass, "n_eff": 20.0 + stage}
            | {"n_support": 30 + stage, "sigma": 0.0}
        )
    rows.append({**rows[-1], "n_support": 99})  # a resumed run logs its last stage again: the later row counts
    with gzip.open(run / "metrics.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cis.main(["prog", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exp3s (seed 0, 8 stages)" in out
    assert "0% step     0  support  30" in out and "100% step    70  support  99" in out
    assert "10% step    10  support  31" in out  # the first stage at or after 10 % of the last stage's step
    assert "hard30 0.70" in out and "easy30 0.70" in out
    assert "[[0, 0, 0, 0, 2], [0, 0, 0, 0, 2], [2, 0, 0, 0, 0], [2, 0, 0, 0, 0]]" in out
    assert cis.main(["prog", str(tmp_path / "nothing")]) == 1
