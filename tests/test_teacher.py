"""Tests of `clips_jax.experiments.teacher`: the transfer-teacher scoring command.

World: the tiny built-in phantom store of `clips_jax/configs/default.py:tiny` (6 cases of 48x22x22 voxels at 6 mm; 4
training cases, one of them lesion-free) made by `trainer.ensure_store`, and a tiny random U-Net saved with
`save_weights`. Independent references: the stored arrays read with `np.load`, `make_channels`,
`tiled_inference` and the loss formulas written out in NumPy here.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from clips_jax.configs import default as default_config  # noqa: E402
from clips_jax.curricula import case_table_from_manifest, get_curriculum
from clips_jax.data.channels import make_channels
from clips_jax.data.store import CaseStore
from clips_jax.errors import ConfigError, DataError
from clips_jax.experiments import teacher as T
from clips_jax.inference import nnx_predictor, tiled_inference
from clips_jax.model import UNet, load_model, save_weights

TILE, STEP = (48, 32, 32), (16, 16, 16)  # one tile per 48x22x22 case (fast); tiling is tested elsewhere
TILE_ARGS = ["--tile", "48,32,32", "--step", "16,16,16"]
UNET = dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3)
QUIET = dict(log=lambda m: None)


def _tiny_config(cache):
    cfg = default_config.get_config("tiny")
    cfg.data.phantoms.cache = str(cache)
    cfg.num_devices = 1
    cfg.quiet = True
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clips_jax import trainer

    root = tmp_path_factory.mktemp("teacher")
    store = trainer.ensure_store(_tiny_config(root / "cache"), lambda m: None)
    save_weights(root / "w", {"unet": UNet(5, 2, **UNET, rngs=nnx.Rngs(7))})
    return {"root": root, "store_dir": store.cache_dir, "weights": root / "w", "model": load_model(root / "w", "unet")}


@pytest.fixture
def store_dir(world, tmp_path):
    """A private copy of the phantom store (the tests rewrite its manifest)."""
    return Path(shutil.copytree(world["store_dir"], tmp_path / "store"))


def _independent_prob(store_dir, cid, model):
    d = Path(store_dir) / "cases" / cid
    x = make_channels(np.load(d / "ct.npy"), np.load(d / "suv.npy"))
    pred, params = nnx_predictor(model)
    return tiled_inference(x, pred, params=params, tile_shape=TILE, step=STEP)[..., 1].astype(np.float64)


def _lesion_train_ids(store):
    return [store.ids[i] for i in store.split_indices("train") if store.has_lesion[i]]


# ---- losses ---------------------------------------------------------------------------------------------


def test_case_losses_closed_form():
    p = np.array([0.5, 1.0, 0.0, 0.25])
    t = np.array([1, 1, 0, 0])
    # soft Dice: sum(pt) = 1.5, sum(p) = 1.75, sum(t) = 2
    assert T.case_loss(p, t, "soft_dice") == pytest.approx(1 - 3.0 / 3.75)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    dice = 1 - (2 * (pc * t).sum() + 1e-3) / (pc.sum() + t.sum() + 1e-5 + 1e-3)
    ce = -np.mean(t * np.log(pc) + (1 - t) * np.log(1 - pc))
    assert T.case_loss(p.reshape(1, 2, 2), t.reshape(1, 2, 2), "combined") == pytest.approx(dice + 2 * ce, rel=1e-5)
    assert math.isnan(T.case_loss(p, np.zeros(4), "soft_dice"))
    assert math.isnan(T.case_loss(p, None, "combined"))
    with pytest.raises(DataError, match="non-finite"):
        T.case_loss(np.array([np.nan, 0, 0, 0]), t)
    with pytest.raises(ConfigError):
        T.case_loss(p, t, "mse")


# ---- scoring --------------------------------------------------------------------------------------------


def test_scores_equal_an_independent_computation(world):
    store = CaseStore(world["store_dir"])
    train = store.split_indices("train")
    scores = T.score_cases(store, world["model"], indices=train, tile_shape=TILE, step=STEP, **QUIET)
    assert list(scores) == [store.ids[i] for i in train]
    lesion = _lesion_train_ids(store)
    assert 0 < len(lesion) < len(scores)
    for cid in set(scores) - set(lesion):
        assert math.isnan(scores[cid])  # lesion-free: no score
    cid = lesion[0]
    p = _independent_prob(world["store_dir"], cid, world["model"])
    t = np.load(Path(world["store_dir"]) / "cases" / cid / "seg.npy") > 0
    expected = 1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum())
    assert scores[cid] == pytest.approx(expected, rel=1e-6)
    assert all(0.0 <= scores[c] <= 1.0 for c in lesion)
    # the combined loss of the same case
    comb = T.score_cases(
        store, world["model"], indices=[store.index(cid)], tile_shape=TILE, step=STEP, loss="combined", **QUIET
    )
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    dice = 1 - (2 * (pc * t).sum() + 1e-3) / (pc.sum() + t.sum() + 1e-5 + 1e-3)
    ce = -np.mean(np.where(t, np.log(pc), np.log(1 - pc)))
    assert comb[cid] == pytest.approx(dice + 2 * ce, rel=1e-4)


def test_cli_writes_the_manifest_keeps_the_rest_and_skips_on_rerun(world, store_dir):
    before = json.loads((store_dir / "manifest.json").read_text())
    args = ["teacher", "--store", str(store_dir), "--weights", str(world["weights"]), "--model", "unet", *TILE_ARGS]
    assert T.main(args) == 0
    after = json.loads((store_dir / "manifest.json").read_text())
    # every other field intact: the scores are derived data, in their own namespace
    assert {k: v for k, v in after.items() if k != "derived"} == {**before, "cases": after["cases"]}
    for old, new in zip(before["cases"], after["cases"]):
        assert {k: v for k, v in new.items() if k != "derived"} == old
    # the scores: train cases only, under the teacher's id, equal to the independent computation
    store = CaseStore(store_dir)
    tid = store.default_teacher
    rec = after["derived"]["teachers"][tid]
    assert tid == T.teacher_id(rec) == T.teacher_id({**rec, "date": "other"}) and tid.startswith("unet-")
    assert rec["source"] == Path(world["weights"]).resolve().as_posix() and rec["model"] == "unet"
    assert rec["loss"] == "soft_dice" and rec["tile_shape"] == list(TILE) and rec["date"]
    rows = {r["id"]: r for r in store.case_rows()}
    for c in after["cases"]:
        if c["split"] != "train":
            assert "derived" not in c and "teacher_loss" not in rows[c["id"]]
            continue
        assert list(c["derived"]["teacher"]) == [tid]
        if c["id"] not in _lesion_train_ids(store):
            assert c["derived"]["teacher"][tid] is None and math.isnan(rows[c["id"]]["teacher_loss"])  # NaN -> null
            continue
        p = _independent_prob(store_dir, c["id"], world["model"])
        t = np.load(store_dir / "cases" / c["id"] / "seg.npy") > 0
        expected = 1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum())
        assert c["derived"]["teacher"][tid] == pytest.approx(expected, rel=1e-6)
        assert rows[c["id"]]["teacher_loss"] == c["derived"]["teacher"][tid]
    # re-run: every case skipped, the file is not rewritten
    text = (store_dir / "manifest.json").read_text()
    logs = []
    fv_summary = T.score_store(
        store_dir, world["model"], {**rec, "date": "later"}, tile_shape=TILE, step=STEP, log=logs.append
    )
    assert fv_summary["scored"] == [] and len(fv_summary["skipped"]) == len(store.split_indices("train"))
    assert T.main(args) == 0
    assert (store_dir / "manifest.json").read_text() == text
    # another loss is another teacher: re-scored (the first teacher's scores stay); --overwrite re-scores the same
    assert T.main(args + ["--loss", "combined"]) == 0
    comb = CaseStore(store_dir)
    train_ids = {store.ids[i] for i in store.split_indices("train")}
    assert comb.default_teacher != tid and comb.teachers[comb.default_teacher]["loss"] == "combined"
    assert set(comb.teacher_losses()) == set(comb.teacher_losses(tid)) == train_ids
    s = T.score_store(
        store_dir,
        world["model"],
        comb.teachers[comb.default_teacher],
        tile_shape=TILE,
        step=STEP,
        loss="combined",
        overwrite=True,
        **QUIET,
    )
    assert len(s["scored"]) == len(store.split_indices("train"))


def test_transfer_teacher_curriculum_follows_the_scores(world, store_dir):
    store = CaseStore(store_dir)
    lesion = _lesion_train_ids(store)
    # hand-chosen scores (hardest first in id order) so the expected ranking is known without the model
    hand = {cid: 0.9 - 0.2 * k for k, cid in enumerate(lesion)}
    T.write_teacher_losses(store_dir, hand, None)
    store = CaseStore(store_dir)
    train_ids = [store.ids[i] for i in store.split_indices("train")]
    table = case_table_from_manifest(store.case_rows(), train_ids)
    np.testing.assert_allclose(
        table.difficulty["teacher_loss"][[train_ids.index(c) for c in lesion]], [hand[c] for c in lesion]
    )
    cur = get_curriculum("transfer_teacher", steps_per_epoch=2, k_min=1)
    state = cur.init(table)
    ranks = np.asarray(state["ranks"])
    expected = {cid: r for r, cid in enumerate(sorted(lesion, key=hand.get))}  # easiest (lowest loss) first
    assert {cid: int(ranks[train_ids.index(cid)]) for cid in lesion} == expected
    # step 0: among the lesion cases only the easiest one is sampled
    w = np.asarray(cur.weights(state, 0))
    easiest = min(lesion, key=hand.get)
    assert {c for c in lesion if w[train_ids.index(c)] > 0} == {easiest}
    # and from the CLI's own scores
    assert (
        T.main(
            [
                "teacher",
                "--store",
                str(store_dir),
                "--weights",
                str(world["weights"]),
                "--model",
                "unet",
                "--overwrite",
                *TILE_ARGS,
            ]
        )
        == 0
    )
    store = CaseStore(store_dir)
    table = case_table_from_manifest(store.case_rows(), train_ids)
    ranks = np.asarray(get_curriculum("transfer_teacher", steps_per_epoch=2).init(table)["ranks"])
    losses = {c: v for c, v in store.teacher_losses().items() if c in lesion}
    assert [c for c in sorted(lesion, key=lambda c: ranks[train_ids.index(c)])] == sorted(lesion, key=losses.get)


def test_failing_case_is_reported_and_skipped(world, store_dir, capsys):
    store = CaseStore(store_dir)
    bad = _lesion_train_ids(store)[0]
    (store_dir / "cases" / bad / "suv.npy").unlink()
    assert (
        T.main(
            ["teacher", "--store", str(store_dir), "--weights", str(world["weights"]), "--model", "unet", *TILE_ARGS]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"{bad}: FAILED, skipped" in out
    losses = CaseStore(store_dir).teacher_losses()
    assert bad not in losses
    assert all(c in losses for c in _lesion_train_ids(store) if c != bad)


def test_out_manifest_is_gone_and_bad_scores_write_nothing(world, store_dir, capsys):
    """--out_manifest (a scored copy of the manifest) was removed: scores of a split by one teacher live in the
    store under that teacher's id and leave everything else alone."""
    text = (store_dir / "manifest.json").read_text()
    args = ["teacher", "--store", str(store_dir), "--weights", str(world["weights"]), "--model", "unet", *TILE_ARGS]
    assert T.main(args + ["--out_manifest", str(store_dir / "scored.json"), "--split", "val"]) == 2
    assert "--out_manifest was removed" in capsys.readouterr().err
    assert (store_dir / "manifest.json").read_text() == text
    cases = CaseStore(store_dir).cases
    with pytest.raises(DataError, match="nope"):
        T.write_teacher_losses(store_dir, {"nope": 0.5}, None)
    with pytest.raises(DataError, match="negative"):
        T.write_teacher_losses(store_dir, {cases[0]["id"]: -1.0}, None)
    assert (store_dir / "manifest.json").read_text() == text
    assert T.main(args + ["--split", "val"]) == 0
    store = CaseStore(store_dir)
    assert sorted(store.teacher_losses()) == sorted(c["id"] for c in cases if c["split"] == "val")
    assert [{k: v for k, v in c.items() if k != "derived"} for c in store.cases] == cases


def test_run_teacher_best_and_last_checkpoints(world, store_dir, tmp_path):
    """--run: a run folder with the trainer's own checkpoint managers (no training: a known model is saved)."""
    from clips_jax import runs, trainer

    run = tmp_path / "run"
    run.mkdir()
    cfg = _tiny_config(tmp_path / "unused")
    cfg.data.store = str(store_dir)
    cfg.eval.tile_shape, cfg.eval.tile_step = TILE, STEP
    (run / "config.json").write_text(cfg.to_json_best_effort())
    best_model, last_model = UNet(5, 2, **UNET, rngs=nnx.Rngs(11)), UNet(5, 2, **UNET, rngs=nnx.Rngs(12))
    last_mgr, best_mgr = runs.checkpoint_managers(run, cfg.checkpoint.keep)
    _, params, rest = nnx.split(best_model, nnx.Param, ...)
    runs.save_best(best_mgr, 4, {"params": params, "rest": rest}, 0.5)
    _, state = trainer.init_train_state(last_model, nnx.Param, trainer.make_optimizer(cfg))
    runs.save_last(last_mgr, 6, state, {"_empty": np.zeros((), np.int32)}, {"step": 6})
    for m in (best_mgr, last_mgr):
        m.wait_until_finished()
        m.close()

    store = CaseStore(store_dir)
    cid = _lesion_train_ids(store)[0]
    t = np.load(store_dir / "cases" / cid / "seg.npy") > 0
    for which, model, step in (("best", best_model, 4), ("last", last_model, 6)):
        loaded, info = T.load_run_model(run, which)
        assert info == {"checkpoint": which, "checkpoint_step": step, "weights": "trained"}
        assert T.main(["teacher", "--store", str(store_dir), "--run", str(run), "--which", which]) == 0
        scored = CaseStore(store_dir)
        rec = scored.teachers[scored.default_teacher]
        assert rec["checkpoint"] == which and rec["tile_shape"] == list(cfg.eval.tile_shape)
        p = _independent_prob(store_dir, cid, model)  # the run's eval tiles: TILE/STEP
        assert scored.teacher_losses()[cid] == pytest.approx(1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum()), rel=1e-6)
    with pytest.raises(ConfigError, match="config.json"):
        T.load_run_model(tmp_path, "best")


def test_usage_errors_and_help(world, store_dir, capsys):
    base = ["teacher", "--store", str(store_dir)]
    assert T.main(base) == 2
    assert T.main(base + ["--weights", str(world["weights"]), "--run", str(store_dir)]) == 2
    assert T.main(base + ["--weights", str(world["weights"])]) == 2  # no "ensemble" in these weights
    assert "no model 'ensemble'" in capsys.readouterr().err
    assert T.main(base + ["--weights", str(world["weights"]), "--model", "unet", "--tile", "3,x"]) == 2
    assert T.main(base + ["--weights", str(world["weights"]), "--model", "unet", "--split", "nope"]) == 2
    assert T.main(base + ["--weights", str(world["weights"]), "--loss", "mse"]) == 2
    assert '"derived"' not in (store_dir / "manifest.json").read_text()
    r = subprocess.run(
        [sys.executable, "-m", "clips_jax.experiments.teacher", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert r.returncode == 0
    for flag in ("--store", "--weights", "--run", "--which", "--loss", "--out_manifest", "--overwrite"):
        assert flag in r.stdout
