"""Trainer tests: data-parallel equivalence, 2-process jax.distributed, kill-and-resume equality, the
non-finite guard, curricula end to end with exact resume, and the default config at a tiny size.

All runs use `clips_jax/configs/default.py:tiny` (phantoms of 48x22x22 voxels at 6 mm, a 4-8 channel U-Net, few steps).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clips_jax import trainer
from clips_jax.model import UNet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from clips_jax.configs import default as default_config  # noqa: E402


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """Phantoms generated and prepared once for the whole module."""
    cache = tmp_path_factory.mktemp("phantoms")
    cfg = tiny_config(cache)
    trainer.ensure_store(cfg, lambda s: None)
    return cache


def tiny_config(cache, **overrides):
    cfg = default_config.get_config("tiny")
    cfg.data.phantoms.cache = str(cache)
    cfg.quiet = True
    cfg.num_devices = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def losses_by_step(workdir):
    return {r["step"]: r["loss"] for r in trainer.read_metrics(workdir, "train")}


def test_one_step_on_4_devices_equals_1_device():
    cfg = default_config.get_config("tiny")
    model = UNet(5, 2, channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3, rngs=nnx.Rngs(0))
    # Plain SGD: Adam's first step is lr * sign(g), which turns float noise in gradients that are
    # mathematically zero (conv biases right before InstanceNorm) into lr-sized differences.
    tx = optax.sgd(0.1)
    graphdef, state0 = trainer.init_train_state(model, nnx.Param, tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((4, 32, 16, 16, 5), dtype=np.float32),
        "label": (rng.random((4, 32, 16, 16)) > 0.8).astype(np.int32),
        "labeled": np.array([True, True, False, True]),
    }
    step = trainer.make_train_step(graphdef, cfg, tx, use_sigma=False, with_gain=False)
    results = []
    for n in (1, 4):
        mesh = trainer.make_mesh(n)
        repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        fn = jax.jit(step, out_shardings=(repl, repl))
        state = jax.device_put(jax.tree.map(jnp.array, state0), repl)
        b = {k: jax.device_put(v, dsh) for k, v in batch.items()}
        new, metrics = fn(state, b, jnp.float32(0.0))
        assert len(new["params"]["init_block"]["conv"]["kernel"].sharding.device_set) == n
        results.append((jax.device_get(new["params"]), float(metrics["loss"])))
    (p1, l1), (p4, l4) = results
    np.testing.assert_allclose(l1, l4, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And the step really moved the parameters.
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(state0["params"]))]
    assert max(moved) > 1e-5


def test_resume_with_another_transfer_teacher_is_refused(phantom_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(phantom_cache, cache)
    cfg = tiny_config(cache, **{"debug.stop_after_steps": 3})
    store = trainer.ensure_store(cfg, lambda s: None)
    losses = {cid: 0.1 * k for k, cid in enumerate(store.ids)}
    store.set_teacher_losses("teacher_a", losses, {"model": "a"})
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(cfg, run)
    store.set_teacher_losses("teacher_b", {k: -v for k, v in losses.items()}, {"model": "b"})  # new default
    with pytest.raises(trainer.ConfigError, match="data.teacher: 'teacher_a' -> 'teacher_b'"):
        trainer.train_and_evaluate(tiny_config(cache), run)
    summary = trainer.train_and_evaluate(tiny_config(cache, **{"data.teacher": "teacher_a"}), run)
    assert summary["start_step"] == 2


def test_kill_and_resume_gives_identical_losses(phantom_cache, tmp_path):
    full = tmp_path / "full"
    trainer.train_and_evaluate(tiny_config(phantom_cache), full)
    broken = tmp_path / "broken"
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{"debug.stop_after_steps": 3}), broken)
    assert max(losses_by_step(broken)) == 3  # step 3 ran, but the last checkpoint is at step 2
    # resuming with another data stream (here: hard-negative sampling switched on) is refused, nothing written
    with pytest.raises(trainer.ConfigError, match="data.p_hot_negative"):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{"data.p_hot_negative": 0.5}), broken)
    summary = trainer.train_and_evaluate(tiny_config(phantom_cache), broken)
    assert summary["start_step"] == 2 and summary["steps_this_run"] == 4
    a, b = losses_by_step(full), losses_by_step(broken)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6, atol=0)
    ev_a = trainer.read_metrics(full, "eval")[-1]["val_dice"]
    ev_b = trainer.read_metrics(broken, "eval")[-1]["val_dice"]
    assert ev_a == pytest.approx(ev_b, abs=1e-6)


@pytest.mark.parametrize("pipeline", ["device", "host"])
def test_stop_at_plateau_ends_the_run_there_and_it_stays_stopped(phantom_cache, tmp_path, pipeline):
    # learning rate 0: the validation Dice is the same at every step, a plateau as soon as the rule can say so.
    # Validations every 2 steps from step 10 with 2 of them in the last 20 %: at step 10 only step 10 is in
    # (8, 10]; at step 12, (9.6, 12] holds steps 10 and 12, so the run stops at 12 of its 40
    stop = {
        "steps": 40,
        "optim.lr": 0.0,
        "eval.every_steps": 2,
        "checkpoint.every_steps": 5,  # step 12 is no checkpoint step: the stop writes one
        "eval.at_start": False,
        "data.pipeline": pipeline,
        "stop_at_plateau.enabled": True,
        "stop_at_plateau.after_steps": 10,
        "stop_at_plateau.min_last_evals": 2,
    }
    run = tmp_path / "run"
    summary = trainer.train_and_evaluate(tiny_config(phantom_cache, **stop), run)
    assert summary["stopped_at_plateau"] == 12 and summary["steps_this_run"] == 12 and summary["steps"] == 40
    assert max(losses_by_step(run)) == 12 and trainer.read_metrics(run, "eval")[-1]["step"] == 12
    last_mgr, _ = trainer.runs.checkpoint_managers(run, 3)
    assert last_mgr.latest_step() == 12
    from clips_jax.experiments import plateau

    rec = plateau.run_plateau(run)
    assert rec["plateaued"] and rec["n_last"] == 2 and rec["boundary_step"] == pytest.approx(9.6)
    if pipeline == "host":
        return
    # the same command again trains nothing and keeps the summary
    again = trainer.train_and_evaluate(tiny_config(phantom_cache, **stop), run)
    assert again == summary and max(losses_by_step(run)) == 12
    # interrupted after the stop's checkpoint, before its summary: the resumed run stops at once, and its
    # summary keeps the validations from metrics.jsonl
    (run / "summary.json").unlink()
    resumed = trainer.train_and_evaluate(tiny_config(phantom_cache, **stop), run)
    assert resumed["stopped_at_plateau"] == 12 and resumed["steps_this_run"] == 0 and max(losses_by_step(run)) == 12
    assert resumed["final"] == summary["final"] and resumed["best"] == summary["best"]
    # interrupted before the stop (last checkpoint at step 10): the curve is rebuilt from metrics.jsonl, so the
    # resumed run stops at 12 as the uninterrupted one did (with only its own validations it would need 5 more
    # and stop at 20)
    broken = tmp_path / "broken"
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{**stop, "debug.stop_after_steps": 11}), broken)
    assert max(losses_by_step(broken)) == 11
    again = trainer.train_and_evaluate(tiny_config(phantom_cache, **stop), broken)
    assert again["start_step"] == 10 and again["stopped_at_plateau"] == 12 and max(losses_by_step(broken)) == 12
    assert again["best"] == summary["best"]
    # another stop rule cannot continue this run
    with pytest.raises(trainer.ConfigError, match="stop_at_plateau.min_last_evals"):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{**stop, "stop_at_plateau.min_last_evals": 3}), run)
    # and settings that could never stop a run are refused: no validations, or none from after_steps on
    for bad in ({"eval.every_steps": 0}, {"stop_at_plateau.after_steps": 40}):
        with pytest.raises(trainer.ConfigError, match="could never stop"):
            trainer.train_and_evaluate(tiny_config(phantom_cache, **{**stop, **bad}), tmp_path / "x")


def test_validation_and_checkpoint_periods_do_not_change_training(phantom_cache, tmp_path):
    # what lets a run stopped at a plateau stand for the first part of a fixed-length run of its seed
    # (curriculum_study:stop against :long9000): validating (a weight average) and checkpointing more or less
    # often leaves the batches and updates alone
    base = {"steps": 8, "optim.ema_decay": 0.9, "eval.at_start": False}
    a = trainer.train_and_evaluate(
        tiny_config(phantom_cache, **base, **{"eval.every_steps": 2, "checkpoint.every_steps": 2}), tmp_path / "a"
    )
    b = trainer.train_and_evaluate(
        tiny_config(phantom_cache, **base, **{"eval.every_steps": 4, "checkpoint.every_steps": 3}), tmp_path / "b"
    )
    ra, rb = trainer.read_metrics(tmp_path / "a", "train"), trainer.read_metrics(tmp_path / "b", "train")
    assert [r["cases"] for r in ra] == [r["cases"] for r in rb] and len(ra) == 8
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    ea = {r["step"]: r["val_dice"] for r in trainer.read_metrics(tmp_path / "a", "eval")}
    eb = {r["step"]: r["val_dice"] for r in trainer.read_metrics(tmp_path / "b", "eval")}
    assert sorted(ea) == [2, 4, 6, 8] and sorted(eb) == [4, 8] and all(ea[s] == eb[s] for s in eb)
    assert a["final"] == b["final"]


def test_nonfinite_guard_skips_updates_and_stops(phantom_cache, tmp_path):
    # One poisoned step: skipped, counted, training goes on with finite losses.
    s = trainer.train_and_evaluate(tiny_config(phantom_cache, **{"debug.poison_steps": (3,)}), tmp_path / "one")
    assert s["skipped_updates"] == 1
    rows = trainer.read_metrics(tmp_path / "one", "train")
    assert [r["finite"] for r in rows] == [True, True, True, False, True, True]
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 4)
    # K poisoned steps in a row: clear error, the last good checkpoint (step 2) intact and finite.
    cfg = tiny_config(phantom_cache, **{"debug.poison_steps": (2, 3, 4, 5), "max_nonfinite": 3})
    with pytest.raises(trainer.TrainingDiverged, match="non-finite for 3 steps"):
        trainer.train_and_evaluate(cfg, tmp_path / "many")
    ckpts = sorted(int(p.name) for p in (tmp_path / "many" / "checkpoints" / "last").iterdir() if p.name.isdigit())
    assert ckpts == [2]
    # Resuming restores finite parameters from that checkpoint.
    s2 = trainer.train_and_evaluate(tiny_config(phantom_cache), tmp_path / "many")
    assert s2["start_step"] == 2 and np.isfinite(s2["final"]["val_dice"])


@pytest.mark.parametrize(
    "curriculum,pipeline",
    [
        ("self_paced_hard", "device"),
        ("exp3s", "device"),
        ("cbs", "device"),
        ("predefined_composite_root", "device"),
        ("exp3s", "host"),
        ("self_paced_hard", "host"),
    ],
)
def test_curriculum_runs_and_resumes_exactly(phantom_cache, tmp_path, curriculum, pipeline):
    over = {
        "curriculum.name": curriculum,
        "steps": 4,
        "eval.every_steps": 0,
        "eval.at_start": False,
        "data.pipeline": pipeline,
    }
    full = tmp_path / "full"
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over), full)
    part = tmp_path / "part"
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **over, **{"debug.stop_after_steps": 3}), part)
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over), part)
    a, b = losses_by_step(full), losses_by_step(part)
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-6)
    rows = trainer.read_metrics(full, "curriculum")
    assert rows and all(abs(sum(r["decile_mass"]) + r["undefined_mass"] - 1) < 1e-4 for r in rows)
    assert all(abs(sum(r["weights"]) - 1) < 1e-4 for r in rows)
    train_rows = trainer.read_metrics(full, "train")
    if curriculum == "cbs":
        assert train_rows[0]["sigma"] == pytest.approx(1.0)
    if curriculum == "exp3s":
        assert all("gain" in r for r in train_rows)
    if curriculum in ("exp3s", "self_paced_hard"):  # they read the supervised loss of lesion-centred crops
        assert all(len(r["case_supervised"]) == len(r["lesion_centred"]) == 2 for r in train_rows)


def _restored_curriculum_state(run_dir):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((run_dir / "checkpoints" / "last").absolute())
    return mgr.restore(mgr.latest_step(), args=ocp.args.Composite(curriculum=ocp.args.StandardRestore())).curriculum


def test_exp3s_with_smoothing_learns_once_per_stage(phantom_cache, tmp_path):
    # 7 steps in stages of 2: stages end at steps 2, 4 and 6 -> three bandit rounds, each with the stage's mean
    # prediction gain (the composed curriculum keeps the bandit's needs: the old loop never measured the gain).
    import ml_collections

    over = {
        "curriculum.name": "exp3s",
        "curriculum.options": ml_collections.ConfigDict({"smoothing": True}),
        "steps": 7,
        "eval.every_steps": 0,
        "eval.at_start": False,
        "checkpoint.every_steps": 7,
    }
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over), tmp_path / "run")
    state = _restored_curriculum_state(tmp_path / "run")
    train_rows = trainer.read_metrics(tmp_path / "run", "train")
    assert train_rows[0]["sigma"] > 0 and all("gain" in r for r in train_rows)
    finite_gains = [r["gain"] for r in train_rows if r["gain"] is not None]
    assert finite_gains, "no lesion-centred crop in 7 steps: the bandit got no reward"
    assert int(state["t"]) <= 3 and int(state["count"]) == int(state["t"])
    assert int(state["t"]) >= 1 and np.isfinite(np.asarray(state["reservoir"])[0])
    # The 7th step is in an unfinished stage: its gain waits in the accumulator.
    assert float(np.asarray(state["bucket_hits"]).sum()) > 0


def test_loss_reading_curricula_need_lesion_centred_crops(phantom_cache, tmp_path):
    cfg = tiny_config(phantom_cache, **{"curriculum.name": "self_paced_hard", "data.p_foreground": 0.0})
    with pytest.raises(trainer.ConfigError, match="p_foreground"):
        trainer.train_and_evaluate(cfg, tmp_path / "r")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_train(args, env_extra, cwd):
    env = dict(os.environ, **env_extra)
    env.pop("XLA_FLAGS", None)
    env.update({k: v for k, v in env_extra.items()})
    return subprocess.Popen(
        [sys.executable, "-m", "clips_jax.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_process_distributed_matches_single_process(phantom_cache, tmp_path):
    common = [
        "--config",
        f"{REPO}/clips_jax/configs/default.py:tiny",
        f"--config.data.phantoms.cache={phantom_cache}",
        "--config.steps=4",
        "--config.eval.every_steps=0",
        "--config.eval.at_start=False",
        "--config.quiet=True",
    ]
    single = _run_train(
        common + [f"--workdir={tmp_path / 'single'}", "--config.num_devices=2"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"},
        REPO,
    )
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out
    port = _free_port()
    procs = [
        _run_train(
            common + [f"--workdir={tmp_path / 'multi'}"],
            {
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                "JAX_PLATFORMS": "cpu",
                "CLIPS_COORDINATOR": f"127.0.0.1:{port}",
                "CLIPS_NUM_PROCESSES": "2",
                "CLIPS_PROCESS_ID": str(i),
            },
            REPO,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    a, b = losses_by_step(tmp_path / "single"), losses_by_step(tmp_path / "multi")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-5)
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2


def test_default_config_end_to_end_cli(phantom_cache, tmp_path):
    """`python -m clips_jax.train` as a user runs it (tiny variant), including the untrained baseline."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clips_jax.train",
            "--config",
            f"{REPO}/clips_jax/configs/default.py:tiny",
            f"--config.data.phantoms.cache={phantom_cache}",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "val Dice" in r.stdout and "done:" in r.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 6 and "initial" in s and "final" in s
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["channels"] == [4, 4, 8, 8]
    # the summary records the curriculum settings a comparison checks a finished run against
    assert s["curriculum_settings"] == cfg["curriculum"] and s["curriculum_settings"]["steps_per_epoch"] == 2
    # and where it was trained: the machine, the stack's versions and, from this git checkout, the commit
    prov = s["provenance"]
    assert prov["cores"] >= 1 and prov["backend"] == "cpu" and prov["versions"]["jax"] == jax.__version__
    assert prov["cpu"] and isinstance(prov["cpu"], str)
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a source checkout (CI clones one); an installed wheel has no commit to record
        assert prov["commit"] == head.stdout.strip() and isinstance(prov["dirty"], bool)
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()


def _tiny_ensemble_weights(path):
    from clips_jax.model import Ensemble, save_weights

    ens = Ensemble(unet_kwargs=dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3), rngs=nnx.Rngs(3))
    return save_weights(path, {"ensemble": ens}), ens


def test_stacking_conv_training_changes_only_the_stacking_conv(phantom_cache, tmp_path):
    weights, ens = _tiny_ensemble_weights(tmp_path / "w")
    cfg = tiny_config(
        phantom_cache,
        **{
            "model.kind": "stacking",
            "model.init_weights": str(weights),
            "steps": 2,
            "eval.every_steps": 0,
            "eval.at_start": False,
            "checkpoint.every_steps": 2,
        },
    )
    trainer.train_and_evaluate(cfg, tmp_path / "run")
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((tmp_path / "run" / "checkpoints" / "last").absolute())
    restored = mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params, rest = restored.state["params"], restored.state["rest"]
    assert list(params) == ["stacking"]  # only the stacking conv is trainable
    before = nnx.to_pure_dict(nnx.state(ens, nnx.Param))
    # (orbax stores each nnx Variable as {"value": array})
    assert not np.allclose(params["stacking"]["kernel"]["value"], before["stacking"]["kernel"])
    np.testing.assert_array_equal(
        rest["members"]["init_block"]["conv"]["kernel"]["value"], before["members"]["init_block"]["conv"]["kernel"]
    )


def test_refiner_trains_on_native_store_with_stage_a_channel(tmp_path):
    from clips_jax.cascade import compute_stage_a
    from clips_jax.data.store import CaseStore
    from clips_jax.model import load_model

    cache = tmp_path / "cache"
    cfg = tiny_config(
        cache,
        **{
            "model.kind": "refiner",
            "data.spacing_mm": 0.0,
            "model.refiner_features": 4,
            "model.refiner_blocks": 1,
            "steps": 2,
            "data.patch_shape": (16, 16, 16),
            "eval.tile_shape": (32, 32, 32),
            "eval.tile_step": (16, 16, 16),
            "eval.every_steps": 2,
            "eval.at_start": False,
        },
    )
    store = trainer.ensure_store(cfg, lambda s: None)
    assert store.geometry(0).same_grid(store.native_geometry(0))
    with pytest.raises(Exception, match="stage_a"):
        trainer.train_and_evaluate(cfg, tmp_path / "no_stage_a")
    weights, _ = _tiny_ensemble_weights(tmp_path / "w")
    summary = compute_stage_a(
        CaseStore(store.cache_dir),
        load_model(weights, "ensemble"),
        tile_shape=(16, 16, 16),
        step=(8, 8, 8),
        log=lambda s: None,
    )
    assert not summary["failed"]
    s = trainer.train_and_evaluate(cfg, tmp_path / "run")
    assert s["steps"] == 2 and "val_dice" in s["final"]
    rows = trainer.read_metrics(tmp_path / "run", "train")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_run_folder_format_is_recorded_and_checked(tmp_path):
    from clips_jax import runs

    new = runs.open_for_training(tmp_path / "new")
    assert runs.run_format(new) == runs.RUN_FORMAT and json.loads((new / "run.json").read_text())["format"] == 2
    assert runs.open_for_training(new) == new  # the same format: accepted (resume)
    old = tmp_path / "old"
    (old / "checkpoints" / "last").mkdir(parents=True)  # a folder of the first format: checkpoints, no run.json
    assert runs.run_format(old) == 1
    with pytest.raises(trainer.ConfigError, match="format 1.*new --workdir"):
        runs.open_for_training(old)
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "run.json").write_text('{"format": 99}')
    with pytest.raises(trainer.ConfigError, match="newer than this clips-jax"):
        runs.open_for_training(tmp_path / "future")


def test_device_path_global_batch_is_the_same_on_4_devices(phantom_cache, tmp_path):
    # Each element's key folds in its global index: 4 devices train on the same global batches as 1 device.
    over = {
        "steps": 3,
        "eval.every_steps": 0,
        "eval.at_start": False,
        "data.batch_size": 4,
        "data.pipeline": "device",
        "checkpoint.every_steps": 3,
    }
    one = trainer.train_and_evaluate(tiny_config(phantom_cache, **over), tmp_path / "one")
    four = trainer.train_and_evaluate(tiny_config(phantom_cache, **over, num_devices=4), tmp_path / "four")
    assert one["pipeline"] == four["pipeline"] == "device" and four["devices"] == 4
    a, b = trainer.read_metrics(tmp_path / "one", "train"), trainer.read_metrics(tmp_path / "four", "train")
    assert [r["cases"] for r in a] == [r["cases"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-4)


def test_pipeline_choice_and_resume_across_paths_refused(phantom_cache, tmp_path):
    cfg = tiny_config(phantom_cache)
    store = trainer.ensure_store(cfg, lambda _: None)
    idx = store.split_indices("train")
    assert trainer.choose_pipeline(cfg, store, idx) == "device"  # 6 mm phantoms fit the budget
    cfg.data.device_store_gb = 1e-6
    assert trainer.choose_pipeline(cfg, store, idx) == "host"  # over budget: the grain pipeline
    cfg.data.pipeline = "gpu"
    with pytest.raises(trainer.ConfigError, match="data.pipeline"):
        trainer.choose_pipeline(cfg, store, idx)
    over = {"steps": 4, "eval.every_steps": 0, "eval.at_start": False, "data.pipeline": "host"}
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **over, **{"debug.stop_after_steps": 2}), tmp_path / "r")
    with pytest.raises(trainer.ConfigError, match="data.pipeline"):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{**over, "data.pipeline": "device"}), tmp_path / "r")


def test_device_path_scan_chunks_equal_single_steps(phantom_cache, tmp_path):
    # K steps per compiled call (lax.scan, the accelerator default) give the same run as one step per call.
    over = {
        "steps": 3,
        "eval.every_steps": 0,
        "eval.at_start": False,
        "data.pipeline": "device",
        "checkpoint.every_steps": 3,
        "log_every": 3,
        "curriculum.name": "exp3s",
    }
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over, steps_per_call=1), tmp_path / "k1")
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over, steps_per_call=3), tmp_path / "k3")
    a, b = trainer.read_metrics(tmp_path / "k1", "train"), trainer.read_metrics(tmp_path / "k3", "train")
    assert [r["cases"] for r in a] == [r["cases"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-4)


def _tiny_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((2, 32, 16, 16, 5), dtype=np.float32),
        "label": (rng.random((2, 32, 16, 16)) > 0.8).astype(np.int32),
        "labeled": np.array([True, True]),
    }


def test_weight_average_is_the_debiased_ema_of_the_updated_weights():
    cfg = default_config.get_config("tiny")
    decay = 0.6
    cfg.optim.ema_decay = decay
    model = UNet(5, 2, channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.5)
    graphdef, state = trainer.init_train_state(model, nnx.Param, tx, decay)
    # Before any update the average is the weights themselves.
    for a, b in zip(jax.tree.leaves(trainer.eval_params(state, decay)), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    step = jax.jit(trainer.make_train_step(graphdef, cfg, tx, use_sigma=False, with_gain=False))
    history = []
    for i in range(3):
        state, _ = step(state, _tiny_batch(i), jnp.float32(0.0))
        history.append(jax.device_get(state["params"]))
    # A non-finite step changes neither the weights nor their average.
    poisoned = dict(_tiny_batch(9), image=np.full((2, 32, 16, 16, 5), np.nan, np.float32))
    state, metrics = step(state, poisoned, jnp.float32(0.0))
    assert not bool(metrics["finite"]) and int(state["ema"].count) == 3
    # sum_i (1 - d) d^(n - i) p_i / (1 - d^n) over the n = 3 updated weights, computed here in float64.
    n = len(history)
    expected = jax.tree.map(
        lambda *ps: sum((1 - decay) * decay ** (n - 1 - i) * np.asarray(p, np.float64) for i, p in enumerate(ps))
        / (1 - decay**n),
        *history,
    )
    got = jax.device_get(trainer.eval_params(state, decay))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ... and it is not simply the last weights.
    diff = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(history[-1]))]
    assert max(diff) > 1e-4
    cfg.optim.ema_decay = 1.0  # an average that never moves
    with pytest.raises(trainer.ConfigError, match="ema_decay"):
        trainer.ema_decay_of(cfg)


def _leaves_close(a, b) -> bool:
    return all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("pipeline", ["device", "host"])
def test_weight_average_run_validates_keeps_best_and_resumes_the_average(phantom_cache, tmp_path, pipeline):
    from clips_jax import runs
    from clips_jax.experiments import compare_curricula

    over = {"optim.ema_decay": 0.5, "data.pipeline": pipeline}
    plain = tmp_path / "plain"
    trainer.train_and_evaluate(tiny_config(phantom_cache, **{"data.pipeline": pipeline}), plain)
    full = tmp_path / "full"
    trainer.train_and_evaluate(tiny_config(phantom_cache, **over), full)
    # The average does not change training: the same losses step by step.
    a, b = losses_by_step(plain), losses_by_step(full)
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-6, atol=0)
    cfg = tiny_config(phantom_cache, **over)
    avg, info = runs.load_run_model(full, "last", config=cfg)
    raw, raw_info = runs.load_run_model(full, "last", config=cfg, raw=True)
    best, best_info = runs.load_run_model(full, "best", config=cfg)
    assert (info["weights"], raw_info["weights"], best_info["weights"]) == ("average", "trained", "average")
    assert best_info["checkpoint_step"] == info["checkpoint_step"] == 6  # the only validation, the last step
    # The best checkpoint holds the average validated, not the last weights; the plain run's last weights are
    # this run's trained ones.
    assert _leaves_close(nnx.state(best, nnx.Param), nnx.state(avg, nnx.Param))
    assert not _leaves_close(nnx.state(avg, nnx.Param), nnx.state(raw, nnx.Param))
    plain_last, plain_info = runs.load_run_model(plain, "last")
    assert plain_info["weights"] == "trained"
    assert _leaves_close(nnx.state(plain_last, nnx.Param), nnx.state(raw, nnx.Param))
    # The logged validation is the average's.
    store = trainer.ensure_store(cfg, lambda _: None)
    ev = trainer.evaluate_cases(avg, store, store.split_indices("val"), cfg)
    logged = trainer.read_metrics(full, "eval")[-1]
    assert logged["val_tmtv_abs_err_ml"] == pytest.approx(ev["val_tmtv_abs_err_ml"], rel=1e-5, abs=1e-6)
    # Killed at step 3 and resumed (from step 2): the same average; resuming without it, or it without one, refused.
    broken = tmp_path / "broken"
    with pytest.raises(SystemExit):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **over, **{"debug.stop_after_steps": 3}), broken)
    with pytest.raises(trainer.ConfigError, match=r"optim.ema_decay: 0.5 -> 0.0"):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **{"data.pipeline": pipeline}), broken)
    with pytest.raises(trainer.ConfigError, match=r"optim.ema_decay: 0.0 -> 0.5"):
        trainer.train_and_evaluate(tiny_config(phantom_cache, **over), plain)
    with pytest.raises(trainer.ConfigError, match=r"steps: 6 -> 8"):  # another learning-rate schedule
        trainer.train_and_evaluate(tiny_config(phantom_cache, **over, steps=8), broken)
    # A model loaded with a config that does not match its checkpoint's average is refused.
    with pytest.raises(trainer.ConfigError, match="the run's own config"):
        runs.load_run_model(plain, "last", config=cfg)
    # A finished run is not counted for a comparison asking for another average or schedule.
    compare_curricula.check_run_schedule(full, cfg)
    with pytest.raises(trainer.ConfigError, match="optim.ema_decay: 0.5 -> 0.0"):
        compare_curricula.check_run_schedule(full, tiny_config(phantom_cache))
    with pytest.raises(trainer.ConfigError, match=r"optim.lr: 0.01 -> 0.02"):
        compare_curricula.check_run_schedule(full, tiny_config(phantom_cache, **over, **{"optim.lr": 0.02}))
    assert trainer.train_and_evaluate(tiny_config(phantom_cache, **over), broken)["start_step"] == 2
    resumed, _ = runs.load_run_model(broken, "last", config=cfg)
    assert _leaves_close(nnx.state(resumed, nnx.Param), nnx.state(avg, nnx.Param))
    with pytest.raises(trainer.ConfigError, match="raw"):
        runs.load_run_model(full, "best", config=cfg, raw=True)


def test_checkpoint_ema_decay_reads_every_meta_version():
    from clips_jax import runs

    assert runs.checkpoint_ema_decay({"schedule": {"optim.ema_decay": 0.9, "steps": 6}}) == 0.9
    assert runs.checkpoint_ema_decay({"ema_decay": 0.998}) == 0.998  # the first version of the average
    assert runs.checkpoint_ema_decay({"stream": {}}) == 0.0  # from before the average: none


_BUILDER = r"""
import pathlib, sys, time
from clips_jax import trainer
from clips_jax.configs import default
cache, wait_for, spacing = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = default.get_config("tiny")
cfg.data.phantoms.cache, cfg.data.spacing_mm = cache, spacing
if wait_for:  # start once the other process has written its first phantom, mid-way through its build
    deadline = time.monotonic() + 240
    while not pathlib.Path(wait_for).is_file():
        if time.monotonic() > deadline:
            sys.exit("the other process wrote no phantom in 240 s")
        time.sleep(0.01)
print(len(trainer.ensure_store(cfg, print)))
"""


def test_processes_sharing_a_phantom_cache_build_it_one_at_a_time(tmp_path):
    """Two more processes start while the first is generating the phantoms: one for the same store (a comparison
    run as two processes), one for a store on another grid (it shares the raw phantoms). Both wait for the
    first's build; the first finds the store complete and builds nothing, the second prepares its own store
    from those phantoms. (Without the cache lock they generated the same cases at the same time and stopped at
    the first case another had just written.)"""
    first = tmp_path / "phantoms_small_s0" / "phantom_s0_0000" / "truth.json"
    run = [sys.executable, "-c", _BUILDER, str(tmp_path)]
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    kw["env"] = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [("", "6"), (str(first), "6"), (str(first), "0")]  # tiny's 6 mm grid, then the native grid
    procs = [subprocess.Popen([*run, *a], **kw) for a in args]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    cases = str(default_config.get_config("tiny").data.phantoms.cases)
    assert [out.split()[-1] for out, _ in outs] == [cases] * 3
    (first_log, _), (same_store, _), (other_grid, _) = outs
    assert "generating" in first_log and same_store.strip() == cases  # the same store: nothing built again
    assert "ok," in other_grid  # its own store, prepared from the phantoms the first wrote


def test_a_phantom_cache_without_file_locks_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from clips_jax import fileio

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    with pytest.raises(trainer.ConfigError, match="file system without file locks.*data.phantoms.cache"):
        trainer.ensure_store(tiny_config(tmp_path / "cache"), lambda m: None)
    assert not (tmp_path / "cache" / "phantoms_small_s0").exists()  # nothing generated
