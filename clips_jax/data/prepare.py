"""Preprocess a PET/CT dataset once into a case store (the read side is `clips_jax.data.store.CaseStore`).

Examples:
    clips-prepare --input /data/autopet --output cache/autopet                 # 6 mm training store
    clips-prepare --input /data/autopet --output cache/autopet_native --spacing native   # refiner store
    python -m clips_jax.data.prepare --input DATA --output CACHE --split split.json --seed 0 --dtype float16

For every study found under DATA (`study.find_studies`: autoPET NIfTI folders or DICOM):
`load_study` -> difficulty measures on the NATIVE grid (`store.difficulty_measures`) -> `resample_case`
to the training grid (TMTV-Net: 6 mm) -> `store.write_case_arrays` (atomic per case) -> the manifest
`CACHE/manifest.json` is updated after each finished case (`store.update_manifest`, the store's one locked
writer, so `stage_a` or the teacher scoring may run on the same store meanwhile). Re-running skips finished
cases (arrays present and listed in the manifest; their entries, derived data included, are kept); a re-prepared
case gets a new entry without derived data (its stage-A map is deleted with its old folder, as it should be); a
study that fails is reported on one line and skipped, the others carry on; the command ends with a one-screen
summary and exits with status 1 if any case failed.

Native grid: `--spacing native` (or 0) keeps every case on its own PET grid (no resampling; the manifest's
`geometry` equals `native_geometry`, top-level `spacing_mm` is null and `grid` is "native"). That is the store
the refiner (stage B) trains on, after `python -m clips_jax.stage_a` has added the stage-A probabilities.
A store is built for one grid: re-running into an existing store with another spacing is a ConfigError (use a
new output folder).

Case ids and patients: a study folder at `DATA/A/B` gets the id `A__B` (`study.study_id`: its path relative to
DATA, each component made file-name safe, joined with "__"; the id `clips-predict` gives its outputs); its patient
is the first component `A` (autoPET: `PETCT_xxx/<date>` -> patient `PETCT_xxx`; phantoms: one folder per case ->
patient = case).

Splits (recomputed on every run over all studies found, so stable for a fixed dataset):
* default: patients sorted, permuted with `np.random.default_rng(seed)`, then cut at round(0.7 P) and
  round(0.85 P) into train / val / test; all studies of a patient share the split.
* `--split JSON` `{"train": [...], "val": [...], "test": [...]}` listing case ids or patient ids; studies
  listed nowhere get the split "unused" (a warning line says how many).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from clips_jax import batch, cli
from clips_jax.data import store as st
from clips_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def study_id(root: str | Path, study: str | Path) -> tuple[str, str]:
    """(case id, patient id) of a study folder (see the module docstring): the case id is `study.study_id`, the
    id `clips-predict` and `clips-evaluate` give the same study; the patient id is its first component."""
    from clips_jax.data import study as study_mod

    return study_mod.study_id(root, study), study_mod.id_parts(root, study)[0]


def assign_splits(
    patients: Mapping[str, str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_json: Mapping | None = None,
) -> dict:
    """Split name per case id, by patient.

    Args:
      patients: case id -> patient id.
      seed: permutation seed of the default split.
      fractions: (train, val, test) fractions of the patients (default 0.7 / 0.15 / 0.15).
      split_json: optional explicit `{"train": [ids], "val": [...], "test": [...]}` (case or patient ids).
    Returns:
      case id -> "train" | "val" | "test" | "unused" ("unused" only with `split_json`).
    Raises:
      ConfigError if `split_json` has unknown keys or puts one id in two splits, or fractions are invalid.
    """
    if split_json is not None:
        bad = set(split_json) - set(SPLITS)
        if bad:
            raise ConfigError(f"split file: unknown keys {sorted(bad)}; use only {list(SPLITS)}")
        where: dict[str, str] = {}
        for name in SPLITS:
            for x in split_json.get(name, []):
                if where.get(str(x), name) != name:
                    raise ConfigError(f"split file: {x!r} is listed in both {where[str(x)]!r} and {name!r}")
                where[str(x)] = name
        return {c: where.get(c, where.get(p, "unused")) for c, p in patients.items()}
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or f.sum() <= 0:
        raise ConfigError(f"split fractions {fractions!r}: need three non-negative numbers")
    f = f / f.sum()
    pats = sorted(set(patients.values()))
    order = [pats[i] for i in np.random.default_rng(seed).permutation(len(pats))]
    b1 = int(round(f[0] * len(pats)))
    b2 = int(round((f[0] + f[1]) * len(pats)))
    psplit = {p: ("train" if k < b1 else "val" if k < b2 else "test") for k, p in enumerate(order)}
    return {c: psplit[p] for c, p in patients.items()}


NATIVE = "native"
"""`spacing_mm` value (also None or 0) meaning: keep each case on its native PET grid."""


def is_native(spacing_mm) -> bool:
    """True if `spacing_mm` asks for the native grid: None, "native" (any case) or the number 0."""
    if spacing_mm is None:
        return True
    if isinstance(spacing_mm, str):
        return spacing_mm.strip().lower() in (NATIVE, "0", "0.0")
    arr = np.asarray(spacing_mm, dtype=np.float64)
    return arr.size == 1 and float(arr.reshape(-1)[0]) == 0.0


def parse_spacing(text: str):
    """CLI spacing: "native"/"0" -> "native"; "6" -> 6.0; "3,4,4" -> [3.0, 4.0, 4.0] (z, y, x) mm.

    Raises ConfigError for anything else (non-numbers, not 1 or 3 values, non-positive values).
    """
    if is_native(text):
        return NATIVE
    try:
        sp = [float(v) for v in str(text).split(",")]
    except ValueError:
        sp = []
    if len(sp) not in (1, 3) or not all(np.isfinite(v) and v > 0 for v in sp):
        raise ConfigError(f"--spacing {text!r}: use 'native' (or 0), one positive number of mm, or z,y,x")
    return sp[0] if len(sp) == 1 else sp


def prepare_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    spacing_mm=6.0,
    seed: int = 0,
    split_json: Mapping | None = None,
    dtype=np.float32,
    allow_partial_ct: bool = False,
    skip_damaged: bool = False,
    find_fn: Callable | None = None,
    load_fn: Callable | None = None,
    resample_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build or update the case store `output_dir` from the studies under `input_dir` (see module docstring).

    Steps: find the studies (listing the folders that are not studies) -> ids and splits -> check an existing
    store's grid -> one `batch.for_each_case` over the studies (load, measure, resample, write, manifest) ->
    summary. Nothing is created before the first case is written: a usage error, or a run in which every
    study fails, leaves no new folder behind.

    Args:
      input_dir: dataset root. output_dir: cache folder (created with the first case).
      spacing_mm: training grid spacing (one number or (z, y, x)), mm; "native", None or 0 keep each case on
        its native PET grid (no resampling, `resample_fn` unused).
      seed / split_json: see `assign_splits`.
      dtype: storage dtype of ct/suv (np.float32 or np.float16).
      allow_partial_ct: DICOM studies whose CT covers less than 90 % of the PET's axial extent are prepared
        with a warning (uncovered slices get air) instead of failing (`clips_jax.data.dicom.read_dicom_study`).
      skip_damaged: DICOM files that cannot be read are left out with a warning naming each instead of failing
        the study (`clips_jax.data.dicom.read_dicom_study`).
      find_fn, load_fn, resample_fn: overrides of `study.find_studies`, `study.load_study` and
        `resample.resample_case` (tests; other dataset layouts).
      log: one-line progress/failure sink.
    Returns:
      summary dict: `prepared`, `skipped`, `failed` (lists of case ids), `errors` (id -> message), `total`,
      `not_studies` (folder -> why it is not a study).
    Raises:
      ConfigError / DataError before anything is written: no study, two studies with one case id, a bad split
      file, a store prepared with another spacing or one this version cannot read.
    """
    reading = {"allow_partial_ct": allow_partial_ct, "skip_damaged": skip_damaged}
    find_fn, load_fn, resample_fn = _default_steps(find_fn, load_fn, resample_fn, reading)
    out = Path(output_dir)
    studies = [Path(p) for p in find_fn(input_dir)]
    not_studies = _report_skipped_folders(input_dir, studies, log) if find_fn is _find_studies else {}
    ids = _case_ids(input_dir, studies)
    splits = _splits(dict(ids.values()), seed, split_json, log)
    native_grid = is_native(spacing_mm)
    spacing_list = None if native_grid else list(np.broadcast_to(np.asarray(spacing_mm, float), (3,)))
    old = _existing_cases(out, spacing_list)
    writer = _ManifestWriter(out, splits, header=_manifest_header(spacing_list, dtype, seed, split_json))
    path_of = {cid: path for path, (cid, _) in ids.items()}

    def prepare_one(cid: str):
        path = path_of[cid]
        if cid in old and st.case_complete(out, cid):
            writer.keep(cid, old[cid])
            return batch.skipped()
        case = load_fn(path)
        native = case.geometry
        meas = st.difficulty_measures(case.seg, case.suv, case.ct, native.spacing_mm)
        rs = case if native_grid else resample_fn(case, spacing_mm)
        st.write_case_arrays(out, cid, rs.ct, rs.suv, rs.seg, dtype=dtype)
        source = Path(os.path.abspath(path)).relative_to(os.path.abspath(input_dir)).as_posix()
        entry = _case_entry(cid, ids[path][1], source, case.seg is not None, rs.geometry, native, meas)
        fresh[cid] = {**entry, "input_notes": _input_notes(case.meta)}
        return batch.done(f"ok, {rs.geometry.shape} voxels, {_lesion_text(meas)} ({time.time() - t0:.0f} s)")

    def write_entry(cid: str, _outcome) -> None:  # outside the per-case handling: a manifest that cannot be
        if cid in fresh:  # written (e.g. no file locks) stops the run instead of failing every case alike
            writer.add(cid, fresh.pop(cid))

    t0, fresh = time.time(), {}
    outcomes = batch.for_each_case(path_of, prepare_one, log=log, after_each=write_entry)
    writer.flush()
    counts = {s: sum(1 for c in writer.done if splits[c] == s) for s in (*SPLITS, "unused")}
    where = f"store {out}" if writer.done else "nothing written"
    where += "" if out.exists() else f" ({out} not created)"
    outcomes.log_summary(
        log,
        f"summary: {outcomes.total} studies, {len(outcomes.done)} prepared, {len(outcomes.skipped)} "
        f"already done, {len(outcomes.failed)} failed; splits {counts}; {where}",
    )
    return {**outcomes.as_summary("prepared"), "not_studies": not_studies}


def _find_studies(root):
    """`study.find_studies` (imported lazily: the study loaders pull in pydicom)."""
    from clips_jax.data.study import find_studies

    return find_studies(root)


def _input_notes(meta) -> list[str]:
    """`study.input_notes` (imported lazily: the study loaders pull in pydicom)."""
    from clips_jax.data.study import input_notes

    return input_notes(meta)


def _default_steps(find_fn, load_fn, resample_fn, reading: Mapping[str, bool]):
    """The (find, load, resample) functions: the given overrides, else the study finder, the study loader
    (with the `reading` options of `study.load_study`) and `resample.resample_case`."""
    if load_fn is None:
        from clips_jax.data.study import load_study

        load_fn = functools.partial(load_study, **reading)
    if resample_fn is None:
        from clips_jax.data.resample import resample_case as resample_fn
    return find_fn or _find_studies, load_fn, resample_fn


def _report_skipped_folders(root, studies: list[Path], log) -> dict[str, str]:
    """Log "skipped folder <folder>: <why>" for each sub-folder of `root` that is not a study; folder -> why."""
    from clips_jax.data.study import skipped_folders

    found = {str(folder): why for folder, why in skipped_folders(root, studies)}
    for folder, why in found.items():
        log(f"skipped folder {folder}: {why}")
    return found


def _case_ids(root, studies: list[Path]) -> dict[Path, tuple[str, str]]:
    """study folder -> (case id, patient id) (`study_id`); DataError when two studies get one case id."""
    ids = {p: study_id(root, p) for p in studies}
    seen: dict[str, Path] = {}
    for p, (cid, _) in ids.items():
        if cid in seen:
            raise DataError(
                f"{root}: the studies {seen[cid]} and {p} map to the same case id {cid!r}; rename one folder"
            )
        seen[cid] = p
    return ids


def _splits(patients: Mapping[str, str], seed: int, split_json: Mapping | None, log) -> dict[str, str]:
    """`assign_splits`, warning about studies in no split and split-file ids that match no study."""
    splits = assign_splits(patients, seed, split_json=split_json)
    if split_json is not None:
        n_unused = sum(1 for s in splits.values() if s == "unused")
        listed = {str(x) for v in split_json.values() for x in v}
        missing = listed - set(patients) - set(patients.values())
        if n_unused:
            log(f"warning: {n_unused} studies are in no split of the split file (split 'unused')")
        if missing:
            log(f"warning: {len(missing)} ids of the split file were not found, e.g. {sorted(missing)[:3]}")
    return splits


def _existing_cases(out: Path, spacing_list) -> dict[str, dict]:
    """Case id -> manifest entry of an existing store at `out` ({} for a new one).

    An existing manifest must be readable (a newer format or a damaged file is an error saying what to do:
    never redo, and so overwrite, the cases of a store this version cannot read) and prepared for the same
    grid (ConfigError naming both spacings otherwise).
    """
    if not (out / st.MANIFEST).is_file():
        return {}
    store = st.CaseStore(out)
    old = {c["id"]: c for c in store.cases}
    if old and "spacing_mm" in store.manifest:
        was = store.manifest["spacing_mm"]
        if (was is None) != (spacing_list is None) or (was is not None and not np.allclose(was, spacing_list)):
            raise ConfigError(
                f"{out}: this store was prepared with spacing {was or NATIVE} mm, not "
                f"{spacing_list or NATIVE}; use another --output folder"
            )
    return old


def _manifest_header(spacing_list, dtype, seed: int, split_json) -> dict:
    """The store-level manifest fields this run sets (grid, dtype, split provenance)."""
    return {
        "spacing_mm": spacing_list,
        "grid": NATIVE if spacing_list is None else "resampled",
        "dtype": np.dtype(dtype).name,
        "seed": int(seed),
        "split_source": "json" if split_json is not None else "seed",
    }


def _case_entry(cid: str, patient: str, source: str, has_seg: bool, grid, native, meas: Mapping) -> dict:
    """The manifest entry of a freshly prepared case (`clips_jax.data.store` module docstring)."""
    return {
        "id": cid,
        "patient": patient,
        "source": source,
        "has_seg": has_seg,
        "shape": list(grid.shape),
        "geometry": grid.to_json(),
        "native_geometry": native.to_json(),
        **meas,
    }


def _lesion_text(meas: Mapping) -> str:
    """ "3 lesions, TMTV 12.5 ml" for a labelled case; "no lesion mask (unlabelled study)" without a mask."""
    if meas.get("n_lesions") is None or not np.isfinite(meas["n_lesions"]):
        return "no lesion mask (unlabelled study)"
    return f"{int(meas['n_lesions'])} lesions, TMTV {meas['tmtv_ml']:.1f} ml"


class _ManifestWriter:
    """Keeps the manifest of the store `out` equal to the cases finished so far (`done`), through the store's
    one locked writer (`store.update_manifest`) after each fresh case; writes nothing until a case is done."""

    def __init__(self, out: Path, splits: Mapping[str, str], header: Mapping):
        self.out, self.splits, self.header = out, splits, dict(header)
        self.done: dict[str, dict] = {}
        self.fresh: dict[str, dict] = {}  # entries of cases prepared by this run and not yet written

    def keep(self, cid: str, entry: dict) -> None:
        """A finished case of an earlier run stays as it is on disk (its derived data included)."""
        self.done[cid] = entry

    def add(self, cid: str, entry: dict) -> None:
        """A case prepared now: recorded, and the manifest rewritten."""
        self.done[cid] = self.fresh[cid] = entry
        self.flush()

    def flush(self) -> None:
        """Rewrite the manifest: exactly the cases of `done`, each with its current split (nothing while no case
        is done and there is no store yet: a run in which every study fails leaves nothing behind)."""
        if not self.done and not (self.out / st.MANIFEST).is_file():
            return

        def change(doc: dict) -> None:
            # A case not re-prepared keeps its current entry on disk (with what other writers added meanwhile,
            # e.g. derived data); a fresh one gets its new entry.
            current = {c.get("id"): c for c in doc.get("cases", [])}
            doc.update(self.header)
            doc["cases"] = [
                {**(self.fresh[c] if c in self.fresh else current.get(c, self.done[c])), "split": self.splits[c]}
                for c in sorted(self.done)
            ]

        st.update_manifest(self.out, change, create=True)
        self.fresh.clear()


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_string("input", None, "Dataset root (autoPET NIfTI folders or DICOM studies).", flag_values=fv)
    flags.DEFINE_string("output", None, "Case-store folder to create or update.", flag_values=fv)
    flags.DEFINE_string(
        "spacing",
        "6",
        "Training grid spacing in mm: one number or z,y,x; 'native' (or 0) "
        "keeps each case on its PET grid (refiner training).",
        flag_values=fv,
    )
    flags.DEFINE_string("split", None, "Optional JSON file {train: [ids], val: [...], test: [...]}.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the patient-level train/val/test split.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of ct and suv.", flag_values=fv)
    cli.define_study_flags(fv)
    flags.mark_flags_as_required(["input", "output"], flag_values=fv)


def run_from_flags(fv) -> int:
    """Prepare the store; returns 1 if any case failed, else 0 (errors: `cli.run_tool`)."""
    split = None
    if fv["split"].value:
        try:
            split = json.loads(Path(fv["split"].value).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(
                f"--split={fv['split'].value}: cannot read the split file ({e}); expected JSON "
                '{"train": [ids], "val": [...], "test": [...]}'
            ) from e
    summary = prepare_dataset(
        fv["input"].value,
        fv["output"].value,
        spacing_mm=parse_spacing(fv["spacing"].value),
        seed=fv["seed"].value,
        split_json=split,
        dtype=np.dtype(fv["dtype"].value),
        **cli.study_options(fv),
    )
    return 1 if summary["failed"] else 0


def main(argv=None) -> int:
    """`clips-prepare`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""

    return cli.run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
