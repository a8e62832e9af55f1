"""Compare curricula in one command: `clips-compare` (`python -m clips_jax.experiments.compare_curricula`).

Examples:
    clips-compare                                    # the default comparison on built-in phantoms
    clips-compare --curricula none,cbs,self_paced_hard --seeds 5 --controls --workdir runs/study
    clips-compare --config default:tiny --steps 40 --seeds 2 --workdir /tmp/cmp    # a quick check
    clips-compare --data cache/autopet --hardness weights:weights/tmtv-net --workdir runs/autopet
    clips-compare --config curriculum_study --steps 0 --seeds 5 --controls --workdir /scratch/study \
        --archive results/study                      # finished runs' records survive a wiped /scratch
    clips-compare --config curriculum_study --steps 0 --seeds 5 --controls --workdir /scratch/study \
        --archive results/study --status             # where that study stands (progress.py); trains nothing

For every experiment of `--curricula` (named settings of `presets.py`; `--controls` adds a negative and a
positive control) and every seed 0..`--seeds`-1 it

0. fixes which test patients are "hard" before any run is compared (`hardness.py`, `--hardness`: on the
   built-in phantoms their latent difficulty; on real data a reference model or a manifest measure), kept in
   `WORKDIR/hardness.csv`;
1. trains `trainer.train_and_evaluate(cfg, WORKDIR/runs/<curriculum>/seed<k>)` with the base config
   (`--config`) plus `seed=k`, the curriculum preset and its options, and `data.store` (`--data`, or the
   built-in phantoms). A run is *finished* when its `summary.json` exists with `steps` equal to the config's;
   finished runs are skipped, unfinished ones call the trainer again (it resumes from its last checkpoint);
2. evaluates the run's best-validation checkpoint (the last one if it never validated) on the store's
   held-out "test" split (`clips_jax.evaluation`: tiled inference on the store grid with the model's own input
   channels, `clips_jax.metrics.case_metrics` per case), written to `<run>/test_metrics.csv` (skipped when it
   exists);
3. checks whether the run plateaued (`plateau.py`: the best validation Dice of its last 20 % of steps at most
   0.01 above the best before, with at least 5 validations), kept in `WORKDIR/plateau.csv`;
4. with `--archive DIR`, keeps the run's small records (summary, test metrics, reduced metric log; the
   transfer teacher's model) in DIR, and at the start copies into the workdir the archived runs it lacks, so a
   study survives the loss of its workdir (`archive.py`);
5. writes `WORKDIR/results.csv`, `WORKDIR/results.md`, `WORKDIR/learning_curves.png` and
   `WORKDIR/boxplots.png` (`results.py`): per curriculum the mean +- s.d. over seeds of Dice, NSD, |TMTV error|,
   lesion sensitivity and FP volume on all test cases and on the hard third, and, against the baseline, the
   difference in Dice and in |TMTV error| with its 95 % interval, p-value and Holm-adjusted p-value from a
   mixed model whose unit is the patient and which accounts for run-to-run variance (`statistics.py`,
   docs/statistics.md); the minimal detectable effect; whether the controls behaved as expected; which
   runs plateaued; and, when some did not, the Dice tests again without them (a sensitivity analysis).

The transfer-teacher (bootstrapping) curriculum ranks the training cases by the soft-Dice loss of the first
seed's baseline model (`none`, trained first, without curriculum): those scores are stored in the comparison's
case store itself, as derived data under the teacher's own id (`clips_jax.experiments.teacher.teacher_id`: the
baseline run's folder, checkpoint and settings; so several comparisons on one store do not clash, and the store's
default teacher is left as it is), listed in `WORKDIR/teacher_scores.csv`; the transfer-teacher runs read them
through `data.teacher = <that id>`.

All outputs are written atomically. The library entry point is `run_comparison`; the CLI is `main`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clips_jax.errors import ConfigError, DataError
from clips_jax.experiments import archive as archive_lib
from clips_jax.experiments import hardness as hardness_lib
from clips_jax.experiments import plateau, presets
from clips_jax.experiments.results import (
    RESULT_COLUMNS,  # noqa: F401 - re-exported (the comparison's result table)
    SUMMARY_METRICS,  # noqa: F401 - re-exported
    case_summary_values,  # noqa: F401
    mean_sd,  # noqa: F401 - re-exported
    plateaued_only_lines,
    results_markdown,
    seed_means,
    summarise,
    write_results_csv,
)
from clips_jax.fileio import write_text_atomic
from clips_jax.metrics.case_losses import soft_dice_of_probs  # noqa: F401 - re-exported for the comparison's users


def learning_curves_png(curves: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike) -> Path:
    """Train loss and validation Dice vs step per curriculum (mean over seeds), as a PNG (atomic).

    Args: curves: curriculum -> one `trainer.read_metrics(run)` row list per seed.
    The train loss is smoothed by a running mean over 10 steps; seeds are averaged at the steps they share, so a
    curriculum's curves end at its earliest run's last step when runs stopped at a plateau (`stop_at_plateau`): a
    mean over the runs still training after that would drift towards the runs that had not stopped.
    Curricula take the 10 default colours in order, then the same colours dashed (the study has 11).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clips_jax.fileio import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, runs) in enumerate(curves.items()):
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[(i // 10) % 3]}
        for kind, ax, key in (("train", ax1, "loss"), ("eval", ax2, "val_dice")):
            by_step: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if r.get("kind") == kind and r.get(key) is not None:
                        by_step.setdefault(int(r["step"]), []).append(float(r[key]))
            steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
            if not steps:
                continue
            y = np.array([np.mean(by_step[s]) for s in steps])
            if kind == "train" and y.size >= 10:
                y = np.convolve(y, np.ones(10) / 10, mode="valid")
                steps = steps[9:]
            ax.plot(steps, y, label=name, marker="o" if kind == "eval" else None, ms=3, **style)
    ax1.set(title="train loss (running mean of 10 steps, mean over seeds)", xlabel="step", ylabel="loss")
    ax2.set(title="validation Dice (mean over seeds)", xlabel="step", ylabel="Dice")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8, ncol=2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Runs: configs, finished check, test evaluation, teacher scores
# ---------------------------------------------------------------------------------------------------------


def run_config(base, name: str, seed: int, store_dir: str | os.PathLike, teacher: str = ""):
    """The training config of one (experiment, seed): a copy of `base` with `seed` (+ the experiment's
    `seed_offset`), the curriculum preset, its options (`presets.curriculum_options`), `data.store =
    store_dir` and, when given, `data.teacher = teacher` (the teacher id whose scores it reads). `base` is not
    modified."""
    import ml_collections

    exp = presets.get_experiment(name)
    cfg = ml_collections.ConfigDict(base.to_dict())  # a deep, unlocked copy
    cfg.seed = int(seed) + exp.seed_offset
    cfg.curriculum.name = exp.preset
    opts = presets.curriculum_options(
        name,
        int(cfg.steps),
        int(cfg.curriculum.steps_per_epoch),
        int(seed),
        stage_steps=int(cfg.curriculum.stage_steps),
    )
    cfg.curriculum.options = ml_collections.ConfigDict(opts)
    cfg.data.store = str(store_dir)
    if teacher:
        cfg.data.teacher = str(teacher)
    return cfg


def run_finished(run_dir: str | os.PathLike, steps: int) -> bool:
    """True when `run_dir/summary.json` exists and records `steps` steps."""
    path = Path(run_dir) / "summary.json"
    try:
        return int(json.loads(path.read_text()).get("steps", -1)) == int(steps)
    except (OSError, ValueError):
        return False


def check_run_schedule(run_dir: str | os.PathLike, cfg) -> None:
    """Refuse a finished run whose optimisation differs from what `cfg` would train it with: the learning-rate
    schedule and the weight average (`trainer.schedule_settings`: steps, lr, restarts, warm-up, `optim.ema_decay`)
    read from the run's config.json. Keys its config lacks are not compared, except `optim.ema_decay` (0: runs
    from before it existed hold no average). Counting such a run would mix two recipes under one name.
    Raises: ConfigError naming the run folder and what differs; nothing for a run without config.json."""
    from clips_jax import trainer

    path = Path(run_dir) / "config.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    saved = {k: v for k, v in trainer.schedule_settings(recorded).items() if v is not None}
    diff = trainer.settings_changed(saved, json.loads(json.dumps(trainer.schedule_settings(cfg))))
    if diff:
        raise ConfigError(
            f"{run_dir}: a finished run trained with another schedule or weight average ({diff}); use a new "
            "--workdir for these settings"
        )


def check_run_curriculum(run_dir: str | os.PathLike, cfg) -> None:
    """Refuse a finished run whose curriculum differs from the one `cfg` would train it with.

    The settings (name, options, steps_per_epoch, stage_steps: `trainer.curriculum_settings`) are read from the
    run's summary.json ("curriculum_settings"), else from its config.json, and compared key by key
    (`settings_conflicts`), then as the curriculum config they build with every family default filled in (an
    option set on one side only differs when it is not the default). A run with neither (archived
    before summaries recorded them) is checked by the smoothing sigma its metric log records at every step against
    what `cfg` gives (0 without smoothing; `_sigma_conflicts`), which tells CBS schedules apart but not other
    option changes of such old runs. A difference means the run was made
    by another version of a preset (`presets.curriculum_options`): counting it would mix two curricula under one
    name.
    Raises: ConfigError naming the run folder and what differs.
    """
    from clips_jax import trainer

    run_dir = Path(run_dir)
    recorded = None
    try:
        recorded = json.loads((run_dir / "summary.json").read_text()).get("curriculum_settings")
        if recorded is None and (run_dir / "config.json").is_file():
            recorded = trainer.curriculum_settings(json.loads((run_dir / "config.json").read_text())["curriculum"])
    except (OSError, ValueError, KeyError):
        recorded = None
    wanted = trainer.curriculum_settings(cfg.curriculum)
    if recorded is not None:
        diff = settings_conflicts(recorded, wanted)
        if not diff and _resolved(cfg, recorded) != _resolved(cfg, wanted):  # an option set on one side only
            diff = ["options"]
        old, new = [_dotted(recorded, k) for k in diff], [_dotted(wanted, k) for k in diff]
        what = f"{', '.join(diff)}: {old} instead of {new}"
    else:
        diff = _sigma_conflicts(run_dir, cfg)
        what = f"smoothing sigma {diff[0]}" if diff else ""
    if diff:
        raise ConfigError(
            f"{run_dir}: this finished run was trained with other curriculum settings ({what}); remove the run "
            "folder (and its copy in --archive) to train it again with the current settings, or use another --workdir"
        )


def _resolved(cfg, settings: Mapping):
    """The curriculum config that `settings` (`trainer.curriculum_settings`) gives with `cfg`'s other values:
    the family's config dataclass(es) with every default filled in, or the error text if it cannot be built."""
    import ml_collections

    from clips_jax import curricula

    c = ml_collections.ConfigDict(cfg.to_dict())
    for key in ("name", "steps_per_epoch", "stage_steps"):
        if key in settings:
            c.curriculum[key] = settings[key]
    c.curriculum.options = ml_collections.ConfigDict(dict(settings.get("options") or {}))
    try:
        return curricula.get_curriculum(c.curriculum.name, **curricula.options_from_config(c)).config
    except ConfigError as exc:
        return f"cannot be built now: {exc}"


def _dotted(d: Mapping, key: str):
    """The value at dotted `key` ("options.sigma_decay") of nested dicts `d`, None where a level is missing."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def _sigma_conflicts(run_dir: Path, cfg) -> list[str]:
    """The first logged training step whose recorded smoothing sigma differs from what `cfg`'s curriculum gives
    (as "at step S: logged L, expected E"; 0 for a curriculum without smoothing), or "(none logged)" for a
    smoothing curriculum whose log has none; [] when all agree. Logged step k ran at step k - 1."""
    from clips_jax import curricula, runs

    cur = curricula.get_curriculum(cfg.curriculum.name, **curricula.options_from_config(cfg))
    rows = [r for r in runs.read_metrics(run_dir, "train") if "sigma" in r]
    if not rows:
        return ["(none logged)"] if cur.smooths else []
    steps = np.array([int(r["step"]) for r in rows])
    logged = np.array([float(r["sigma"]) for r in rows])
    # the CBS schedule depends on the step alone (its sigma ignores the state); vectorised over all logged steps
    expected = np.asarray(cur.sigma(None, steps - 1), np.float64) if cur.smooths else np.zeros_like(logged)
    bad = np.flatnonzero(~np.isclose(logged, expected, rtol=1e-4, atol=1e-7))
    if bad.size == 0:
        return []
    k = int(bad[0])
    return [f"at step {steps[k]}: logged {logged[k]:.4g}, expected {expected[k]:.4g}"]


def load_trained_model(cfg, run_dir: str | os.PathLike):
    """The trained model of a run: parameters of the best-validation checkpoint (`checkpoints/best`), else of
    the latest `checkpoints/last` (`clips_jax.runs.load_run_model` with the run's config `cfg`).
    Raises ConfigError (a ClipsError) if the run has no checkpoint."""
    from clips_jax.runs import load_run_model

    return load_run_model(run_dir, "best", config=cfg)[0]


def predict_cases(model, store, indices, cfg):
    """Yield (case dict of `make_eval_cases`, lesion probability (z, y, x) float32) for store cases, by the
    same tiled inference as the trainer's validation: `clips_jax.evaluation.predict_cases` with the `cfg.eval`
    tiles (reaching the end of every axis) and the model's own extra input channels (the refiner's stage-A
    probability)."""
    from clips_jax import evaluation

    e = cfg.eval
    yield from evaluation.predict_cases(
        model, store, indices, tile_shape=tuple(e.tile_shape), step=tuple(e.tile_step), batch_size=int(e.batch_size)
    )


def evaluate_test(cfg, run_dir: str | os.PathLike, store) -> list[dict]:
    """`case_metrics` rows (with "case") of a run's trained model on the store's "test" split, also written to
    `run_dir/test_metrics.csv`; read back instead when that file exists. `clips_jax.evaluation.evaluate_cases`
    with the `cfg.eval` tiles and `clips_jax.evaluation.test_row`: mask = lesion probability > 0.5 (= argmax
    of two classes), on the store grid (its spacing)."""
    from clips_jax import evaluation
    from clips_jax.metrics import read_metrics_csv, write_metrics_csv

    path = Path(run_dir) / "test_metrics.csv"
    if path.is_file():
        return read_metrics_csv(path)
    model = load_trained_model(cfg, run_dir)
    e = cfg.eval
    rows = evaluation.evaluate_cases(
        model,
        store,
        store.split_indices("test"),
        tile_shape=tuple(e.tile_shape),
        step=tuple(e.tile_step),
        batch_size=int(e.batch_size),
        row_fn=evaluation.test_row,
    )
    write_metrics_csv(path, rows)
    return rows


def score_teacher(
    store,
    teacher_cfg,
    teacher_run: str | os.PathLike,
    scores_csv: str | os.PathLike,
    log: Callable[[str], None] = print,
) -> str:
    """Score the training cases of `store` with a trained teacher run, into the store itself; returns the
    teacher id the scores are stored under (for `data.teacher`).

    The teacher (the best-validation model of `teacher_run`) predicts every training case; its soft-Dice loss
    w.r.t. the ground truth is the case's difficulty (higher = harder; NaN for lesion-free cases). The scores go
    into the store as derived data of that teacher (`teacher.write_teacher_losses`, namespaced by the teacher
    id, not made the store's default teacher; `teacher.score_store`); cases it already scored are not scored
    again. `scores_csv` gets `case,teacher_loss` of the training cases. DataError if a case fails to score.
    """
    from clips_jax.experiments import teacher

    model, info = teacher.load_run_model(teacher_run, "best", config=teacher_cfg)
    e = teacher_cfg.eval
    tile, step = tuple(e.tile_shape), tuple(e.tile_step)
    record = teacher.make_record(
        Path(teacher_run).absolute().as_posix(), str(teacher_cfg.model.kind), "soft_dice", tile, step, **info
    )
    log(
        f"teacher {teacher_run}: scoring the training cases of {store.cache_dir} not yet scored by it "
        "(transfer-teacher curriculum)"
    )
    summary = teacher.score_store(
        store.cache_dir,
        model,
        record,
        split="train",
        tile_shape=tile,
        step=step,
        batch_size=int(e.batch_size),
        loss="soft_dice",
        default=False,
        log=lambda _: None,
    )
    if summary["failed"]:
        cid = summary["failed"][0]
        raise DataError(
            f"teacher scoring failed for {len(summary['failed'])} training case(s), first {cid}: "
            f"{summary['errors'][cid]}; the cases scored are kept, a rerun scores the rest"
        )
    tid = summary["teacher"]
    train_ids = {store.ids[int(i)] for i in store.split_indices("train")}
    losses = type(store)(store.cache_dir).teacher_losses(tid)  # re-read: score_store wrote through its own handle
    write_text_atomic(
        scores_csv,
        "case,teacher_loss\n"
        + "".join(
            f"{k},{'nan' if not math.isfinite(v) else f'{v:.6g}'}\n" for k, v in losses.items() if k in train_ids
        ),
    )
    return tid


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def _settings_key(cfg) -> str:
    d = cfg.to_dict()
    for k in ("seed", "quiet", "debug"):  # not part of the experiment's settings (debug: simulated interruptions)
        d.pop(k, None)
    d.get("data", {}).pop("store", None)
    d.get("data", {}).get("phantoms", {}).pop("cache", None)  # where the phantoms are cached, not what they are
    return json.dumps(d, sort_keys=True, default=str)


def settings_conflicts(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between two config dicts. Keys present in only one of them
    are not conflicts (a config option added to the code later keeps its default, which old runs had)."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_conflicts(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def experiment_names(curricula: Sequence[str], controls: bool = False) -> list[str]:
    """The experiments to run, in order: the baseline first (the transfer teacher and every test need it), the
    others as given, then the controls when `controls` (once each). ConfigError for unknown or no names."""
    names = list(dict.fromkeys(curricula))
    if not names:
        raise ConfigError("--curricula is empty: name at least one experiment")
    for n in names:
        presets.get_experiment(n)
    if controls:
        names += [c for c in presets.CONTROLS if c not in names]
        if presets.BASELINE not in names:
            names.insert(0, presets.BASELINE)  # controls are judged against the baseline
    if presets.BASELINE in names:
        names.remove(presets.BASELINE)
        names.insert(0, presets.BASELINE)
    return names


def run_order(names: Sequence[str], seeds: int) -> list[tuple[str, int]]:
    """The (experiment, seed) pairs of a comparison in the order it trains them: seed-major (every experiment's
    seed 0 first), so an interrupted comparison has every curriculum of its first seeds."""
    return [(n, k) for k in range(int(seeds)) for n in names]


def recorded_conflicts(path: Path, key: str) -> list[str]:
    """The config keys that differ between the settings recorded in `path` (a comparison's experiment.json or
    archive.json: its "settings_key") and `key` (`_settings_key` of the config at hand); [] when `path` does not
    exist. Reads only."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text()).get("settings_key", "{}")
    return settings_conflicts(json.loads(old), json.loads(key))


def open_experiment(base, workdir: Path, store, names: Sequence[str], seeds: int, hardness: str) -> None:
    """Create or re-open `workdir/experiment.json`, refusing one made with other settings or data (results of
    different settings must not be mixed)."""
    exp_file = workdir / "experiment.json"
    key = _settings_key(base)
    if exp_file.exists():
        old = json.loads(exp_file.read_text())
        conflicts = recorded_conflicts(exp_file, key)
        if conflicts or old.get("store") != str(store.cache_dir.absolute()):
            what = ", ".join(conflicts[:5]) if conflicts else f"data {old.get('store')}"
            raise ConfigError(
                f"{exp_file}: this workdir was made with other settings ({what}); use a new "
                "--workdir (results of different settings must not be mixed)"
            )
    write_text_atomic(
        exp_file,
        json.dumps(
            {
                "settings_key": key,
                "store": str(store.cache_dir.absolute()),
                "curricula": list(names),
                "seeds": int(seeds),
                "hardness": hardness,
                "base_config": json.loads(base.to_json_best_effort()),
            },
            indent=1,
        ),
    )


def split_fingerprint(ids: dict) -> str:
    """A short hash (16 hex characters of sha256) of the case ids per split, `{"train": [str], "val": [str],
    "test": [str]}`; the order of ids inside a split does not matter (they are sorted)."""
    import hashlib

    splits = {k: sorted(ids[k]) for k in ("train", "val", "test")}
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]


def store_fingerprint(store) -> str:
    """A short hash of a case store's case ids per split (train / val / test; `split_fingerprint`): two stores
    with the same folder name but other cases or splits differ."""
    return split_fingerprint({k: [store.ids[int(i)] for i in store.split_indices(k)] for k in ("train", "val", "test")})


def _open_archive(archive, base, store) -> Path:
    """Open (or create) the comparison's archive (`archive.open_archive`: refused when it holds other settings
    or another store)."""
    settings = {
        "settings_key": _settings_key(base),
        "store": store.cache_dir.name,
        "store_cases": store_fingerprint(store),
    }
    return archive_lib.open_archive(archive, settings, settings_conflicts)


def _restore_archive(arch: Path, workdir: Path, names, seeds, log) -> None:
    """Restore into `workdir` the archived runs it lacks (with the transfer teacher's run when a curriculum needs
    it, restored only with its model)."""
    teacher = teacher_runs(names)
    restored = archive_lib.restore(arch, workdir, run_order(names, seeds) + teacher, needs_checkpoint=teacher)
    if restored:
        log(f"archive {arch}: restored {len(restored)} finished run(s) into {workdir} ({', '.join(restored)})")


def _needs_teacher(names: Sequence[str]) -> bool:
    return any(presets.get_experiment(n).needs_teacher for n in names)


def teacher_runs(names: Sequence[str]) -> list[tuple[str, int]]:
    """[(baseline, 0)], the run whose model scores the transfer teacher's cases, when one of `names` needs it
    (its archived copy is restored only with that model); else []."""
    return [(presets.BASELINE, 0)] if _needs_teacher(names) else []


class _Runner:
    """Trains and evaluates the runs of one comparison (seed-major), remembering what it did.

    `archive`: None, or the archive folder where each finished run's records go (`archive.save_run`);
    `teacher_needed`: a transfer-teacher curriculum is compared (the baseline's first run keeps its model)."""

    def __init__(
        self,
        base,
        workdir: Path,
        store,
        log: Callable[[str], None],
        archive: Path | None = None,
        teacher_needed: bool = False,
    ):
        self.base, self.workdir, self.store, self.log, self.archive = base, workdir, store, log, archive
        self.teacher_needed = teacher_needed
        self.status: dict[str, dict[int, str]] = {}
        self.rows: dict[str, dict[int, list[dict]]] = {}
        self.curves: dict[str, list[list[dict]]] = {}
        self.plateau: dict[str, dict[int, dict]] = {}
        self.provenance: dict[str, dict[int, dict]] = {}  # summary.json "provenance" ({} for older runs)
        self.teacher: str | None = None

    def train(self, name: str, seed: int, store_dir, teacher: str = "") -> tuple[Any, Path, str]:
        """Train (or skip, when finished) one run; returns (config, run folder, "trained"|"skipped")."""
        from clips_jax import trainer

        cfg = run_config(self.base, name, seed, store_dir, teacher)
        run_dir = archive_lib.run_path(self.workdir, name, seed)
        if run_finished(run_dir, cfg.steps):
            check_run_curriculum(run_dir, cfg)
            check_run_schedule(run_dir, cfg)
            self.log(f"[{name} seed {seed}] finished earlier: skipped")
            return cfg, run_dir, "skipped"
        self.log(
            f"[{name} seed {seed}] training ({cfg.steps} steps, curriculum {cfg.curriculum.name}, seed "
            f"{cfg.seed}) in {run_dir}"
        )
        t = time.time()
        trainer.train_and_evaluate(cfg, run_dir)
        self.log(f"[{name} seed {seed}] trained in {time.time() - t:.0f} s")
        return cfg, run_dir, "trained"

    def teacher_for(self, name: str, first_seed: int) -> str:
        """The teacher id a run reads ("" = none): for the transfer teacher, the scores of the first seed's
        baseline model in the comparison's store (scored once, the baseline trained first if needed)."""
        if not presets.get_experiment(name).needs_teacher:
            return ""
        if self.teacher is None:
            tcfg, trun, _ = self.train(presets.BASELINE, first_seed, self.store.cache_dir.absolute())
            self.teacher = score_teacher(self.store, tcfg, trun, self.workdir / "teacher_scores.csv", self.log)
        return self.teacher

    def run(self, name: str, seed: int, first_seed: int) -> None:
        """Train one run, evaluate it on the test split and keep its rows and learning curves."""
        from clips_jax import trainer

        cfg, run_dir, status = self.train(
            name, seed, self.store.cache_dir.absolute(), self.teacher_for(name, first_seed)
        )
        rows = evaluate_test(cfg, run_dir, self.store)
        self.status.setdefault(name, {})[seed] = status
        self.rows.setdefault(name, {})[seed] = rows
        self.curves.setdefault(name, []).append(trainer.read_metrics(run_dir))
        plat = self.plateau.setdefault(name, {})[seed] = plateau.run_plateau(run_dir, int(cfg.steps))
        summary = json.loads((run_dir / "summary.json").read_text())
        self.provenance.setdefault(name, {})[seed] = summary.get("provenance", {})
        self.log(
            f"[{name} seed {seed}] test Dice {seed_means(rows)['dice']:.4f} over {len(rows)} cases; plateau: "
            + ("yes" if plat["plateaued"] else f"no ({plat['reason']})")
        )
        self.archive_run(name, seed, run_dir, teacher_run=name == presets.BASELINE and seed == first_seed)

    def archive_run(self, name: str, seed: int, run_dir: Path, teacher_run: bool) -> None:
        """Keep a finished run's records in the archive (if any) unless they are there: also runs finished
        before `--archive` was given, and the teacher's model when it is needed and not yet archived."""
        if self.archive is None:
            return
        dest = archive_lib.run_path(self.archive, name, seed)
        keep_model = teacher_run and self.teacher_needed
        if not (dest / "summary.json").is_file() or (keep_model and not archive_lib.has_checkpoint(dest)):
            archive_lib.save_run(run_dir, dest, checkpoint=keep_model)


def provenance_line(provenance: Mapping[str, Mapping[int, Mapping]]) -> str:
    """results.md's header line on where the runs were trained, from each run's summary.json `provenance`
    (`clips_jax.provenance.run_provenance`, the process that trained the run's last part): the runs per machine
    (CPU model and cores; the device kind and count on an accelerator), JAX version and code commit, most
    first, and how many predate the record. Runs of one seed were observed to differ between machines and
    commits (docs/experiments.md, *What the study could detect*), so a comparison whose arms ran on different
    ones should say so.

    Args: provenance: experiment -> seed -> provenance dict ({} when the run did not record one).
    """
    from collections import Counter

    def where(p: Mapping) -> str:
        if not p:
            return "not recorded (trained by code before summary.json recorded it)"
        commit = p.get("commit", "")
        code = f"commit {commit[:7]}{' (modified)' if p.get('dirty') else ''}" if commit else "no git commit"
        backend = p.get("backend", "?")
        if backend != "cpu":
            backend += f" {p.get('device_count', '?')} x {p.get('device_kind', '?')}"
        jax_version = p.get("versions", {}).get("jax", "?")
        return f"{p.get('cpu', '?')}, {p.get('cores', '?')} cores, {backend}, jax {jax_version}, {code}"

    counts = Counter(where(p) for by_seed in provenance.values() for p in by_seed.values())
    runs_where = "; ".join(f"{n} run{'s' * (n != 1)} {w}" for w, n in counts.most_common()) or "no runs"
    return f"- trained on (each run's last training part): {runs_where}"


def write_report(
    runner: _Runner, names: Sequence[str], seeds: int, hard: "hardness_lib.Hardness", wall: float
) -> tuple[list[dict], list[str]]:
    """Compute the comparison (`results.summarise`) and write results.csv/md and the two figures."""
    from clips_jax.metrics import plots

    store, base, workdir = runner.store, runner.base, runner.workdir
    case_ids = [store.ids[int(i)] for i in store.split_indices("test")]
    rows, notes, design = summarise(runner.rows, case_ids, hard.array(case_ids))
    if hard.values is None:
        notes.append(
            "the hard cases were chosen by the baseline's first run (no independent --hardness); give "
            "--hardness=run:DIR, weights:DIR or manifest:KEY for a hard subset fixed before the runs"
        )
    write_results_csv(workdir / "results.csv", rows)
    write_text_atomic(workdir / "plateau.csv", plateau.plateau_csv(runner.plateau))
    plots.boxplots({n: [r for k in sorted(v) for r in v[k]] for n, v in runner.rows.items()}, workdir / "boxplots.png")
    learning_curves_png(runner.curves, workdir / "learning_curves.png")
    count = lambda what: sum(s == what for r in runner.status.values() for s in r.values())  # noqa: E731
    header = [
        f"- base config: steps {base.steps}, batch {base.data.batch_size}, patch {tuple(base.data.patch_shape)}, "
        f"model channels {tuple(base.model.channels)}",
        f"- data: {store.cache_dir} ({len(store.split_indices('train'))} train, "
        f"{len(store.split_indices('val'))} val, {len(case_ids)} test cases)",
        f"- seeds: {list(range(int(seeds)))}; evaluated checkpoint: best validation Dice (else last)",
        "- curricula: " + ", ".join(f"{n} ({presets.EXPERIMENTS[n].family})" for n in names),
        f"- hardness: {hard.spec}",
        f"- this invocation: {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall ({count('trained')} runs "
        f"trained, {count('skipped')} skipped)",
        provenance_line(runner.provenance),
    ]
    plateaued = {n: {k: plateau.verdict(p) for k, p in v.items()} for n, v in runner.plateau.items()}
    sections = [
        *plateau.plateau_lines(runner.plateau),
        *plateaued_only_lines(runner.rows, plateaued, case_ids, hard.array(case_ids)),
    ]
    write_text_atomic(workdir / "results.md", results_markdown(rows, notes, header, design, hard.description, sections))
    return rows, notes


def run_comparison(
    base_config,
    workdir: str | os.PathLike,
    curricula: Sequence[str] = presets.DEFAULT_CURRICULA,
    seeds: int = 3,
    data: str = "",
    resume: bool = True,
    *,
    controls: bool = False,
    hardness: str = "auto",
    archive: str | os.PathLike = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Train, evaluate and compare; the whole of `python -m clips_jax.experiments.compare_curricula`.

    Args:
      base_config: the training ConfigDict (steps, sizes, ...); not modified.
      workdir: output folder (runs/, results.*, plots, experiment.json, hardness.*).
      curricula: experiment names of `presets.EXPERIMENTS`; the baseline is run first when listed.
      seeds: number of seeds (0..seeds-1, >= 1).
      data: a case-store folder; "" = the built-in phantoms of `base_config.data.phantoms`.
      resume: True continues an existing workdir (finished runs skipped, others resumed); False refuses a
        workdir that already holds an experiment (nothing is deleted).
      controls: also run the negative and positive controls (`presets.CONTROLS`, and the baseline).
      hardness: source of the test cases' hardness (`hardness.resolve`: auto, baseline, phantom[:DIR],
        run:DIR, weights:DIR, manifest:KEY, csv:PATH).
      archive: "" or a folder that keeps the finished runs' small records and the outputs (`archive.py`);
        archived runs the workdir lacks are restored into it first (and then skipped as finished).
      log: progress printer.
    Returns: {"rows": results rows, "notes": [...], "runs": {curriculum: {seed: "trained"|"skipped"}},
      "wall_s": seconds, "hardness": the resolved source}.
    Raises: ConfigError for bad arguments, a refused or inconsistent workdir, or a store without test cases.
    """
    from clips_jax import trainer
    from clips_jax.data.store import CaseStore

    t0 = time.time()
    names = experiment_names(curricula, controls)
    if int(seeds) < 1:
        raise ConfigError(f"--seeds={seeds}: need at least one seed")
    hardness_lib.parse_spec(hardness)  # a bad spec fails before anything is created
    workdir = Path(workdir)
    if (workdir / "experiment.json").exists() and not resume:
        raise ConfigError(
            f"{workdir} already holds an experiment and --noresume was given; choose a new --workdir "
            "(or drop --noresume to continue it)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    store = CaseStore(data) if data else trainer.ensure_store(base_config, log)
    if len(store.split_indices("test")) == 0:
        raise ConfigError(f"case store {store.cache_dir}: no 'test' cases; prepare it with a test split")
    arch = _open_archive(archive, base_config, store) if archive else None
    open_experiment(base_config, workdir, store, names, seeds, hardness)
    if arch is not None:
        _restore_archive(arch, workdir, names, seeds, log)
    hard = hardness_lib.resolve(
        hardness, store, workdir, log=log, phantom_raw=None if data else trainer.phantom_dirs(base_config)[0]
    )
    runner = _Runner(base_config, workdir, store, log, arch, teacher_needed=_needs_teacher(names))
    for name, seed in run_order(names, seeds):
        runner.run(name, seed, first_seed=0)
    rows, notes = write_report(runner, names, seeds, hard, time.time() - t0)
    if arch is not None:
        archive_lib.save_outputs(workdir, arch)
    wall = time.time() - t0
    log(f"results: {workdir / 'results.md'} ({wall:.0f} s)")
    return {"rows": rows, "notes": notes, "runs": runner.status, "wall_s": wall, "hardness": hard.spec}


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def config_keys_in_argv(argv: Sequence[str]) -> set[str]:
    """Dotted config keys set on the command line: `--config.a.b=1`, `--config.a.b 1`, `--noconfig.a.b`
    (a boolean) -> {"a.b"}. (Keys set through `--flagfile` are not seen.)"""
    keys = set()
    for arg in argv:
        name = arg.lstrip("-")
        if arg.startswith("-") and name.startswith(("config.", "noconfig.")):
            keys.add(name.split(".", 1)[1].split("=", 1)[0])
    return keys


def apply_run_defaults(cfg, steps: int, overrides: bool = False, keep: set[str] | frozenset = frozenset()) -> None:
    """Set the experiment's run settings in place (config unlocked), except the dotted keys in `keep` (those the
    user set on the command line, which always win).

    Args:
      steps: > 0: `steps` training steps, validation and checkpoints `presets.EVALS_PER_RUN` times per run;
        0 keeps the config's steps and periods.
      overrides: also apply `presets.RUN_OVERRIDES`.
    """

    def put(key, value):
        if key in keep:
            return
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value

    if overrides:
        for key, value in presets.RUN_OVERRIDES.items():
            put(key, value)
    if steps > 0:
        put("steps", int(steps))
        every = max(1, math.ceil(int(cfg.steps) / presets.EVALS_PER_RUN))
        put("eval.every_steps", every)
        put("checkpoint.every_steps", every)


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags
    from ml_collections import config_flags

    from clips_jax.configs import default_path

    config_flags.DEFINE_config_file(
        "config",
        default_path(),
        "Base training config: a packaged name (default, default:tiny, ...) or a file path[:variant].",
        lock_config=False,
        flag_values=fv,
    )
    flags.DEFINE_list(
        "curricula",
        list(presets.DEFAULT_CURRICULA),
        f"Experiments to compare (presets.py): {', '.join(presets.EXPERIMENTS)}.",
        flag_values=fv,
    )
    flags.DEFINE_integer("seeds", 3, "Seeds per curriculum (0..seeds-1).", flag_values=fv)
    flags.DEFINE_string("workdir", "runs/compare_curricula", "Output folder.", flag_values=fv)
    flags.DEFINE_string("data", "", "Case store from `clips-prepare`; empty = built-in phantoms.", flag_values=fv)
    flags.DEFINE_bool(
        "resume",
        True,
        "Continue an existing workdir (finished runs skipped); --noresume refuses an existing experiment workdir.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "experiment_defaults",
        True,
        "Apply presets.RUN_OVERRIDES (settings of the default "
        "comparison) over --config, except keys given as --config.KEY; --noexperiment_defaults uses "
        "the config as given.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "controls",
        False,
        "Also run a negative control (the baseline again with independent seeds) "
        "and a positive control (never samples the hardest third of the training cases), and report "
        "whether each behaved as expected.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "hardness",
        "auto",
        "Source of the test cases' hardness, fixed before the compared runs: "
        "auto (phantom on built-in phantoms, else baseline), phantom[:DIR], run:DIR (a trained run "
        "of another study), weights:DIR (converted TMTV-Net weights), reliability:DIR (1 - the reliability "
        "score of a reference model or ensemble, docs/reliability.md), manifest:KEY, csv:PATH, or "
        "baseline (the baseline's first run picks them and is left out of the hard-case test).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "archive",
        "",
        "Folder that keeps each finished run's small records and the results (archive.py), so that a study "
        "survives the loss of its workdir; archived runs the workdir lacks are restored and skipped.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "status",
        False,
        "Only report where the comparison given by the other flags stands (progress.py): each run finished, "
        "started or not started, whether the finished ones plateaued, the training time left. No test "
        "metric is shown; nothing is trained or written.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "steps",
        presets.DEFAULT_STEPS,
        "Training steps per run (experiment default, sized for ~30 min of the whole default "
        "comparison on a 2-core CPU); 0 = the config's own steps/eval/checkpoint settings.",
        flag_values=fv,
    )


def run_from_flags(fv, argv: Sequence[str]) -> int:
    """Run the comparison (`run_comparison`), or with --status only report on it (`progress.py`); `argv` tells
    which --config.KEY were given. Returns 0."""
    from absl import logging

    from clips_jax.train import load_config

    logging.set_verbosity(logging.WARNING)
    cfg = load_config(fv)
    with cfg.unlocked():
        apply_run_defaults(
            cfg, int(fv["steps"].value), bool(fv["experiment_defaults"].value), keep=config_keys_in_argv(argv)
        )
        cfg.quiet = True
    if fv["status"].value:
        from clips_jax.experiments import progress

        progress.check_settings(cfg, fv["workdir"].value, fv["archive"].value)
        records = progress.run_states(
            fv["workdir"].value,
            fv["curricula"].value,
            fv["seeds"].value,
            int(cfg.steps),
            controls=fv["controls"].value,
            archive=fv["archive"].value,
        )
        print("\n".join(progress.status_lines(records, int(cfg.steps))))
        return 0
    run_comparison(
        cfg,
        fv["workdir"].value,
        curricula=fv["curricula"].value,
        seeds=fv["seeds"].value,
        data=fv["data"].value,
        resume=fv["resume"].value,
        controls=fv["controls"].value,
        hardness=fv["hardness"].value,
        archive=fv["archive"].value,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`clips-compare`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""
    from clips_jax import cli
    from clips_jax.provenance import code_commit
    from clips_jax.train import resolve_config_args

    code_commit()  # the commit of the code just imported, cached for every run's summary (run_provenance)
    argv = resolve_config_args(list(sys.argv if argv is None else argv))
    return cli.run_tool(argv, define_flags, lambda fv: run_from_flags(fv, argv), __doc__)


if __name__ == "__main__":
    sys.exit(main())
