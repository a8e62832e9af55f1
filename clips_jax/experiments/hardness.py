"""Which test patients are "hard": a per-case hardness fixed before, and independently of, the compared runs.

Why: the question of a curriculum comparison is whether a curriculum helps on the patients the network
segments badly. Choosing those patients with the same runs that are then compared selects on the runs' own
noise, and the selected baseline is then low by chance (regression to the mean: Barnett, van der Pols &
Dobson 2005, Int J Epidemiol 34:215-220): every curriculum looks better on "hard" cases even when it is the
baseline again. A hardness that does not come from the compared runs avoids it (docs/statistics.md).

Sources (`--hardness` of `python -m clips_jax.experiments.compare_curricula`), larger = harder:

  phantom[:DIR]   the latent `difficulty` u in [0, 1] that each synthetic phantom was generated with (its
                  `truth.json`, `clips_jax.data.phantoms`); DIR = the raw phantom folder (default: the built-in
                  phantoms of the config). The known truth: the best choice on phantoms.
  run:DIR         1 - Dice of a trained run (`python -m clips_jax.train` workdir, best checkpoint) on each test
                  case, computed here before the comparison starts (a run of another study, not a compared one).
  weights:DIR     1 - Dice of converted TMTV-Net weights (`python -m convert_weights`; the ensemble, else a
                  unet) on each test case, tiles 128 x 96 x 96, step 64 x 48 x 48 (the original stage A).
  manifest:KEY    a case-store manifest measure oriented so that larger = harder (`clips_jax.curricula.core.
                  HARDER_WHEN`, e.g. manifest:tmtv_ml: a small TMTV is hard), or manifest:composite (mean
                  oriented rank percentile over the lesion measures, computed over the test lesion cases).
  reliability:DIR 1 - the reliability score (`clips_jax.metrics.reliability`: member agreement and voxel
                  uncertainty, no ground truth needed) of a reference model on each test case: DIR a weights
                  directory (its ensemble with its members, else its unet; tiles and temperature from its
                  reliability.json when present, else the original stage-A tiles 128 x 96 x 96), or several
                  run dirs separated by commas (their best checkpoints as a mean ensemble, the first run's
                  eval tiles), e.g. the ensemble of `clips-reliability` (docs/reliability.md).
  csv:PATH        a file with columns case,hardness (e.g. a score computed elsewhere).
  baseline        no independent source: the baseline's first run picks the hard cases and is left out of
                  the hard-case test (`clips_jax.experiments.statistics.compare`).
  auto            phantom on the built-in phantoms, baseline otherwise (with a note in results.md).

The values are written once to `WORKDIR/hardness.csv` (case,hardness) with their source in
`WORKDIR/hardness.json`, and reused when the comparison resumes; a different source for the same workdir is
refused. Lesion-free cases get NaN (they have no Dice and are in no hard subset).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from clips_jax.errors import ConfigError, DataError
from clips_jax.fileio import write_text_atomic

KINDS = ("auto", "baseline", "phantom", "run", "weights", "reliability", "manifest", "csv")


class Hardness(NamedTuple):
    """The hardness of a comparison's test cases.

    Attributes:
      values: case id -> float hardness (larger = harder; NaN = undefined), or None when the baseline's first
        run chooses the hard cases ("baseline").
      spec: the resolved source, e.g. "phantom:/data/phantoms_small_s0" (recorded in hardness.json).
      description: one line for results.md saying how the hard cases were chosen.
    """

    values: dict[str, float] | None
    spec: str
    description: str

    def array(self, case_ids: Sequence[str]) -> np.ndarray | None:
        """float64 (n_cases,) hardness in the order of `case_ids` (NaN where unknown), or None for "baseline"."""
        if self.values is None:
            return None
        return np.array([self.values.get(c, float("nan")) for c in case_ids], np.float64)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `--hardness` into (kind, argument); ConfigError for an unknown kind or a missing argument."""
    kind, _, arg = str(spec).partition(":")
    if kind not in KINDS:
        raise ConfigError(
            f"--hardness={spec!r}: unknown source; use one of auto, baseline, phantom[:DIR], "
            "run:DIR, weights:DIR, reliability:DIR[,DIR...], manifest:KEY, csv:PATH"
        )
    if kind in ("run", "weights", "reliability", "manifest", "csv") and not arg:
        raise ConfigError(f"--hardness={spec!r}: {kind} needs an argument ({kind}:...)")
    if kind in ("auto", "baseline") and arg:
        raise ConfigError(f"--hardness={spec!r}: {kind} takes no argument")
    return kind, arg


# ---------------------------------------------------------------------------------------------------------
# The sources
# ---------------------------------------------------------------------------------------------------------


def phantom_difficulty(store, indices: Sequence[int], raw_dir: str | Path) -> dict[str, float]:
    """Latent phantom difficulty u of store cases, read from `raw_dir/<manifest source>/truth.json`.

    Returns {case id: u (float in [0, 1]), NaN for a lesion-free case}. Raises DataError naming the file when a
    truth.json is missing or has no "difficulty" (not a phantom made by `clips_jax.data.phantoms`).
    """
    out = {}
    has_lesion = store.has_lesion
    for i in indices:
        row = store.cases[int(i)]
        path = Path(raw_dir) / str(row.get("source", row["id"])) / "truth.json"
        try:
            u = float(json.loads(path.read_text())["difficulty"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"{path}: no phantom difficulty ({type(e).__name__}: {e}); --hardness=phantom needs "
                "the raw phantom folder the store was prepared from (phantom:DIR)"
            ) from None
        out[str(row["id"])] = u if has_lesion[int(i)] else float("nan")
    return out


def manifest_hardness(store, indices: Sequence[int], key: str) -> dict[str, float]:
    """A manifest measure of store cases, oriented so that larger = harder (`HARDER_WHEN`); "composite" is the
    mean oriented rank percentile over the lesion measures of these cases. NaN for lesion-free cases."""
    from clips_jax.curricula.core import HARDER_WHEN, case_table_from_manifest, oriented_difficulty

    if key not in HARDER_WHEN or key == "teacher_loss":
        raise ConfigError(
            f"--hardness=manifest:{key}: use one of {sorted(k for k in HARDER_WHEN if k != 'teacher_loss')}"
        )
    ids = [store.ids[int(i)] for i in indices]
    table = case_table_from_manifest(store.case_rows(), ids)
    values = oriented_difficulty(table, key)
    return {c: float(v) if table.has_lesion[j] else float("nan") for j, (c, v) in enumerate(zip(ids, values))}


def model_hardness(
    model,
    store,
    indices: Sequence[int],
    tile_shape: Sequence[int],
    step: Sequence[int],
    batch_size: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """1 - Dice of a reference model on store cases (tiled inference of `clips_jax.evaluation`); NaN for
    lesion-free cases. Args: model: an NNX module; tile_shape, step: (z, y, x) voxels of the store grid."""
    from clips_jax import evaluation

    rows = evaluation.evaluate_cases(
        model,
        store,
        indices,
        tile_shape=tuple(tile_shape),
        step=tuple(step),
        batch_size=int(batch_size),
        row_fn=evaluation.validation_row,
        log=log,
    )
    return {r["case"]: 1.0 - float(r["dice"]) for r in rows}


def _run_model_hardness(run_dir: str, store, indices, log) -> dict[str, float]:
    from clips_jax.runs import load_run_model

    model, info = load_run_model(run_dir, "best")
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    log(
        f"hardness: scoring {len(indices)} test cases with run {run_dir} ({info['checkpoint']} checkpoint, step "
        f"{info['checkpoint_step']})"
    )
    return model_hardness(
        model,
        store,
        indices,
        cfg["eval"]["tile_shape"],
        cfg["eval"]["tile_step"],
        int(cfg["eval"]["batch_size"]),
        log=lambda _: None,
    )


def _weights_model_hardness(weights: str, store, indices, log) -> dict[str, float]:
    from clips_jax.experiments.teacher import DEFAULT_STEP, DEFAULT_TILE
    from clips_jax.model import load_model, read_weights_meta

    names = read_weights_meta(weights)["models"]
    kind = "ensemble" if "ensemble" in names else "unet"
    if kind not in names:
        raise ConfigError(f"--hardness=weights:{weights}: no 'ensemble' or 'unet' model in it ({sorted(names)})")
    log(f"hardness: scoring {len(indices)} test cases with the {kind} of {weights}")
    return model_hardness(load_model(weights, kind), store, indices, DEFAULT_TILE, DEFAULT_STEP, log=lambda _: None)


def _reliability_reference(spec: str):
    """(model, tile, step, batch size, temperature) of `reliability:` `spec`: a weights directory or run dirs."""
    from clips_jax.experiments.teacher import DEFAULT_STEP, DEFAULT_TILE

    paths = [p for p in spec.split(",") if p]
    if len(paths) == 1 and (Path(paths[0]) / "clips_weights.json").is_file():
        from clips_jax.model import load_model, read_weights_meta
        from clips_jax.reliability_report import read_settings

        names = read_weights_meta(paths[0])["models"]
        kind = "ensemble" if "ensemble" in names else "unet"
        if kind not in names:
            raise ConfigError(f"--hardness=reliability:{spec}: no 'ensemble' or 'unet' model ({sorted(names)})")
        st = read_settings(paths[0])
        tile, step = st.get("tile_shape", DEFAULT_TILE), st.get("tile_step", DEFAULT_STEP)
        return load_model(paths[0], kind), tile, step, 1, float(st.get("temperature", 1.0))
    from clips_jax.model import Ensemble
    from clips_jax.runs import load_run_model, read_config

    models = [load_run_model(p, "best")[0] for p in paths]
    e = read_config(paths[0]).eval
    model = models[0] if len(models) == 1 else Ensemble.from_members(models)
    return model, e.tile_shape, e.tile_step, int(e.batch_size), 1.0


def reliability_hardness(spec: str, store, indices: Sequence[int], log: Callable[[str], None]) -> dict[str, float]:
    """1 - reliability score of the reference model(s) of `spec` on store cases (no ground truth used); NaN
    for lesion-free cases, as the other sources."""
    from clips_jax.data.pipeline import make_eval_cases
    from clips_jax.experiments.reliability import predict_case, reference_pair
    from clips_jax.metrics import calibration, reliability

    model, tile, step, batch_size, temperature = _reliability_reference(spec)
    pair, n_members = reference_pair(model)
    log(f"hardness: reliability of {len(indices)} test cases with {spec} ({n_members or 'no'} members)")
    out, has_lesion = {}, store.has_lesion
    for case in make_eval_cases(store, np.asarray(indices, np.int64)):
        p = predict_case(case["image"], pair, n_members, tile, step, batch_size)
        prob = calibration.apply_temperature(p["prob"], temperature)
        spacing = case["geometry"].spacing_mm
        s = reliability.assess(prob, p["prob"] > 0.5, spacing, p.get("members"), candidate_prob=p["prob"])["score"]
        out[case["id"]] = 1.0 - s if has_lesion[case["case_index"]] else float("nan")
    return out


def read_hardness_csv(path: str | Path) -> dict[str, float]:
    """{case: hardness} from a CSV with columns case,hardness ("nan" or empty = undefined)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read the hardness file ({e})") from None
    if not rows or not {"case", "hardness"} <= set(rows[0]):
        raise DataError(f"{path}: need a header with columns case,hardness")
    out = {}
    for r in rows:
        try:
            out[r["case"]] = float(r["hardness"]) if r["hardness"].strip() else float("nan")
        except ValueError:
            raise DataError(f"{path}: case {r['case']!r} has hardness {r['hardness']!r}, not a number") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# Resolve once per comparison workdir
# ---------------------------------------------------------------------------------------------------------


def _compute(kind: str, arg: str, store, indices, phantom_raw: Path | None, log) -> tuple[dict | None, str, str]:
    """(values, resolved spec, description) of a parsed source."""
    spec = _resolved_spec(kind, arg, phantom_raw)
    if kind == "baseline":
        return (
            None,
            spec,
            (
                "the baseline's first run (seed 0) picks the hard cases (lowest Dice) and is left out "
                "of the hard-case test"
            ),
        )
    if kind == "phantom":
        if spec is None:
            raise ConfigError("--hardness=phantom: give the raw phantom folder of this store (phantom:DIR)")
        return (
            phantom_difficulty(store, indices, spec.partition(":")[2]),
            spec,
            "the phantoms' latent difficulty (truth.json), known before any run",
        )
    if kind == "manifest":
        return (
            manifest_hardness(store, indices, arg),
            spec,
            f"the case-store measure {arg!r} (larger = harder after orientation)",
        )
    path = spec.partition(":")[2]
    if kind == "csv":
        return read_hardness_csv(path), spec, f"the hardness file {path}"
    if kind == "reliability":
        return (
            reliability_hardness(path, store, indices, log),
            spec,
            f"1 - the reliability score of the reference model {path} on each test case (member agreement and "
            "voxel uncertainty, no ground truth; docs/reliability.md), computed before the comparison",
        )
    score = _run_model_hardness if kind == "run" else _weights_model_hardness
    return (
        score(path, store, indices, log),
        spec,
        f"1 - Dice of the reference {'run' if kind == 'run' else 'weights'} {path} on each test case, computed "
        "before the comparison",
    )


def resolve(
    spec: str, store, workdir: str | Path, *, phantom_raw: Path | None = None, log: Callable[[str], None] = print
) -> Hardness:
    """The hardness of the store's "test" cases for the comparison in `workdir`, computed once and kept there.

    Args:
      spec: `--hardness` (see the module docstring); "auto" = "phantom" when `phantom_raw` is given (built-in
        phantoms), else "baseline".
      store: the comparison's `CaseStore`. workdir: the comparison folder (hardness.csv / hardness.json).
      phantom_raw: the raw folder of the built-in phantoms, if the store was made from them.
    Returns: `Hardness`. Raises: ConfigError for a bad spec or when the workdir's hardness came from another
      source; DataError for unreadable sources.
    """
    kind, arg = parse_spec(spec)
    if kind == "auto":
        kind = "phantom" if phantom_raw is not None else "baseline"
    workdir = Path(workdir)
    meta_path, csv_path = workdir / "hardness.json", workdir / "hardness.csv"
    indices = [int(i) for i in store.split_indices("test")]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        wanted = _resolved_spec(kind, arg, phantom_raw)
        if wanted is not None and wanted != meta["spec"]:
            raise ConfigError(
                f"{workdir}: its hard cases were fixed by {meta['spec']!r}, not {wanted!r}; use a new "
                "--workdir (or the same --hardness) so that results are not mixed"
            )
        values = None if meta["spec"] == "baseline" else read_hardness_csv(csv_path)
        return Hardness(values, meta["spec"], meta["description"])
    values, resolved, description = _compute(kind, arg, store, indices, phantom_raw, log)
    if values is not None:
        buf = io.StringIO()
        buf.write("case,hardness\n")
        for c in (store.ids[i] for i in indices):
            v = values.get(c, float("nan"))
            buf.write(f"{c},{'nan' if not math.isfinite(v) else repr(float(v))}\n")
        write_text_atomic(csv_path, buf.getvalue())
    write_text_atomic(
        meta_path,
        json.dumps(
            {"spec": resolved, "description": description, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1
        ),
    )
    return Hardness(values, resolved, description)


def _resolved_spec(kind: str, arg: str, phantom_raw: Path | None) -> str | None:
    """The spec string `_compute` would record, without computing (None when it depends on files)."""
    if kind == "baseline":
        return "baseline"
    if kind == "phantom":
        raw = Path(arg) if arg else phantom_raw
        return None if raw is None else f"phantom:{Path(raw).absolute()}"
    if kind == "manifest":
        return f"manifest:{arg}"
    if kind == "reliability":
        return "reliability:" + ",".join(str(Path(p).absolute()) for p in arg.split(",") if p)
    return f"{kind}:{Path(arg).absolute()}"
