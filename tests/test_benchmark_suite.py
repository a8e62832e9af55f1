"""`benchmarks/suite.py --small`: every figure of the GPU benchmark suite runs on the CPU and lands in the JSON.

Runs the suite in a subprocess exactly as CI would (`--small --skip-torch`, ~1.5 min on 2 cores), then checks
the exit status and that the JSON holds every figure: each entry either ok with finite headline numbers, or
skipped with its reason; none failed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "suite.py"

FIGURES = ["train_step_no_data", "train_step_device_data", "tile_forward", "predict", "torch_reference"]
ENTRIES = {
    "train_step_no_data/float32",
    "train_step_no_data/bfloat16",
    "train_step_device_data/float32",
    "train_step_device_data/bfloat16",
    "train_step_device_data/sample_batch_only",
    "train_step_device_data/composed_float32",
    "tile_forward/ensemble_float32",
    "tile_forward/ensemble_bfloat16",
    "tile_forward/refiner_float32",
    "tile_forward/refiner_bfloat16",
    "predict/float32",
    "predict/bfloat16",
    "predict/float32_batch4",
    "torch_reference/fp32",
    "torch_reference/amp",
    "torch_reference/compile",
}


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"non-finite number {name} in the JSON")

    return json.loads(text, parse_constant=no_constant)


def _is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_suite_small_writes_every_figure(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ)
    # conftest fakes 4 CPU devices for the data-parallel tests; the suite measures one device.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(SUITE), "--small", "--skip-torch", "--out", str(out), "--cache", str(tmp_path / "cache")]
    # The timeout only guards against a hang (no speed is asserted): about 150 s alone on 2 CPU cores, it ran past
    # 600 s on a machine shared with two training processes, so the guard is 1800 s.
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-8000:]}"
    assert "wall" in r.stdout and str(out) in r.stdout  # the human summary

    doc = _strict_json(out.read_text())
    assert doc["mode"] == "small" and doc["schema"] == 1
    assert doc["figures"] == FIGURES
    assert doc["machine"]["cpu"] and doc["machine"]["cores"] >= 1 and doc["machine"]["backend"] == "cpu"
    assert doc["versions"]["jax"] and doc["wall_s"] > 0
    assert set(doc["entries"]) == ENTRIES, sorted(set(doc["entries"]) ^ ENTRIES)
    assert len(doc["summary"]) == len(ENTRIES)

    for name, e in doc["entries"].items():
        assert e["figure"] == name.split("/")[0] and e["figure"] in FIGURES
        for key in ("command", "machine", "date", "versions"):
            assert e[key], (name, key)
        assert e["status"] in ("ok", "skipped"), f"{name}: {e.get('error')}\n{e.get('traceback', '')}"
        if e["status"] == "skipped":
            assert e["skip_reason"], name
            continue
        assert e["headline"], name
        for key in e["headline"]:
            v = e["numbers"][key]
            assert _is_finite_number(v), (name, key, v)
            if key.endswith("_ms_median") or key.endswith("_s") or key.startswith("ratio"):
                assert v > 0, (name, key, v)

    entries = doc["entries"]
    for figure in FIGURES[:-1]:  # every JAX figure has at least one measured entry
        assert any(e["status"] == "ok" for e in entries.values() if e["figure"] == figure), figure
    assert all(entries[f"torch_reference/{m}"]["skip_reason"] == "--skip-torch" for m in ("fp32", "amp", "compile"))
    assert entries["predict/float32"]["status"] == "ok"
    assert all(entries[f"predict/{v}"]["skip_reason"].startswith("--small") for v in ("bfloat16", "float32_batch4"))
    dev = entries["train_step_device_data/float32"]["numbers"]
    assert dev["method"].startswith("trainer chunk") and "chunk_error" not in dev  # the real chunk, not the fallback
    assert dev["chunk_steps"] == 2 and _is_finite_number(dev["ratio_with_to_without_data"])
    assert entries["train_step_no_data/float32"]["numbers"]["finite"] is True
    pred = entries["predict/float32"]["numbers"]
    assert len(pred["runs"]) == 2 and pred["shape"] == [96, 64, 64]
    assert math.isclose(pred["total_s"], pred["runs"][-1]["total_s"])
    assert entries["tile_forward/ensemble_float32"]["numbers"]["input_shape"] == [1, 32, 32, 32, 5]
    assert entries["tile_forward/refiner_bfloat16"]["numbers"]["output_finite"] is True
