"""The preprocessed case store (nnU-Net style cache) and the per-case difficulty measures of the curricula.

A dataset is preprocessed once by `python -m clips_jax.data.prepare` (see `clips_jax/data/prepare.py`) into

    CACHE/manifest.json              one entry per finished case (rewritten after every case, see "Writing")
    CACHE/.manifest.lock             empty lock file of the manifest's writers (see "Writing")
    CACHE/cases/<id>/ct.npy          (z, y, x) CT in HU on the resampled grid (float32 or float16)
    CACHE/cases/<id>/suv.npy         (z, y, x) SUVbw on the resampled grid (same dtype)
    CACHE/cases/<id>/seg.npy         (z, y, x) uint8 0/1 lesion mask (all zeros when the study has no SEG)
    CACHE/cases/<id>/fg.npy          (K, 3) int32 (z, y, x) indices of the lesion voxels (foreground oversampling)
    CACHE/cases/<id>/stage_a.npy     optional (z, y, x) float16/float32 stage-A lesion probability on the stored
                                     grid, written by `python -m clips_jax.stage_a` (the refiner's 6th
                                     input channel; see `clips_jax/cascade.py`)

The stored grid is the TMTV-Net 6 mm grid by default, or the native PET grid (`prepare --spacing native`, for
training the refiner at native resolution). Optional per-case arrays such as `stage_a` are "extra arrays":
`CaseStore.case_arrays(i, extra=("stage_a",))` reads them, `CaseStore.missing_extra` lists the cases lacking one.

Arrays are plain `.npy`, so training reads a random crop through `np.load(path, mmap_mode="r")` without
decompressing whole volumes. `CaseStore` is the read side used by the grain pipeline and the curricula: it
pickles cheaply (a path and the manifest) and opens memory maps on demand.

Manifest entry per case (JSON; NaN is written as `null` and read back as NaN):
  `id`, `patient`, `source` (study folder relative to the input root), `split` ("train"/"val"/"test"/"unused"),
  `has_seg`, `input_notes` (how the study was read, `study.input_notes`; from this version on), `geometry`
  (resampled grid) and `native_geometry` (`Geometry.to_json()`), `shape`, and the
  difficulty measures computed on the NATIVE grid by `difficulty_measures`:
  `tmtv_ml`, `n_lesions`, `smallest_lesion_ml`, `suv_max`, `tbr`, `dmax_mm`, `body_ml`: the prepared case,
  written by `prepare` only; and optionally `derived`, data computed later from the case (its own namespace):
    `derived.stage_a`             provenance of `stage_a.npy` (weights, model, spacing, tiles; `clips_jax.stage_a`)
    `derived.teacher.<teacher>`   the case's loss under a transfer teacher (`clips_jax.experiments.teacher`;
                                  null = NaN, e.g. a lesion-free case), one entry per teacher id
Top-level keys: `version` (2), `spacing_mm` (list of 3, or null for a native-grid store), `grid` ("resampled" or
"native"), `dtype`, `seed`, `split_source`; optionally `derived.teachers` (teacher id -> provenance record of
that teacher: source, model, checkpoint, loss kind, tiles, dtype, date) and `derived.default_teacher` (the
teacher whose losses readers get when they name none: the one scored last by the teacher command).
Re-preparing a case replaces its entry and its folder, so its derived data (the stage-A map and record, teacher
losses) is dropped with it, as it should be: it was computed from the old arrays.

Reading: `CaseStore(CACHE)` (the manifest as it was when opened; cheap to reopen). Derived data through one
accessor each: `CaseStore.derived(case, "stage_a")`, and `CaseStore.case_rows(teacher=None)`, the per-case rows
the curricula build their case table from (`clips_jax.curricula.case_table_from_manifest`): each entry with the
column `teacher_loss` of the chosen teacher (default: `derived.default_teacher`), where that teacher scored it.

Writing: `CaseStore.update(change)` (or the module function `update_manifest`) is the one writer of
manifest.json. It takes an exclusive `fcntl.flock` on `CACHE/.manifest.lock`, reads the manifest from disk,
applies `change` to it, writes it atomically (a temporary file renamed over it; permissions from the umask),
releases the lock and refreshes the store's in-memory copy. `prepare`, `stage_a` and the teacher scoring all
write through it, one case at a time, so they may run on the same store at the same time (each change is
applied to the current file, nothing of another writer is lost). `set_derived` and `set_teacher_losses` are
the derived-data writers built on it. The lock is advisory and local: a network file system without working
`flock` does not serialise writers on different machines.

Older stores: a version-1 manifest (written before derived data had its namespace: top-level `stage_a`,
`teacher_loss` and `teacher` keys in case entries, and a top-level `teacher` record) opens as it is and is
migrated on read (`migrate_manifest`): `stage_a` -> `derived.stage_a`; the `teacher_loss` column, exactly as
it was, -> the teacher `LEGACY_TEACHER` ("v1"), which becomes the default teacher (its record: the old
top-level `teacher` record); the per-case `teacher` records are dropped (so the teacher command re-scores once,
under the teacher's own id). The file itself is rewritten in the new format at its next update.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi
from scipy.spatial.distance import pdist

from clips_jax.data.geometry import Geometry
from clips_jax.errors import ConfigError, DataError
from clips_jax.fileio import atomic_dir, exclusive_lock, json_safe, write_text_atomic
from clips_jax.metrics.lesions import label_lesions

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""2: derived data (stage-A records, teacher losses) under `derived` (1: top-level keys; migrated on read)."""
LOCK = ".manifest.lock"
DERIVED = "derived"
LEGACY_TEACHER = "v1"
"""Teacher id of the `teacher_loss` column of a version-1 manifest (see "Older stores" above)."""

BODY_HU = -500.0
"""Body mask threshold: voxels with CT > -500 HU are body (`body_ml` and the background of `tbr`; our choice)."""

MEASURES = ("tmtv_ml", "n_lesions", "smallest_lesion_ml", "suv_max", "tbr", "dmax_mm", "body_ml")
"""Difficulty fields of a manifest entry (see `difficulty_measures`)."""

ARRAY_NAMES = ("ct", "suv", "seg")
EXTRA_HINTS = {"stage_a": "run `python -m clips_jax.stage_a --store {store} --weights WEIGHTS_DIR` first"}
"""How to produce each known optional per-case array (used in the error for a missing one)."""


def dmax_centroids_mm(mask: np.ndarray, spacing_mm) -> float:
    """Lesion dissemination Dmax in mm: the largest distance between the centroids of two lesions.

    The definition of Cottereau et al. 2020 (J Nucl Med), NOT the original TMTV-Net code's (which mixes
    units for single lesions) nor the all-voxel-pairs variant.

    Args:
      mask: (z, y, x) lesion mask (any dtype, > 0 is lesion).
      spacing_mm: voxel size (z, y, x) in mm (or one number). Centroids are voxel-index centroids times the
        spacing, so distances are exact for any orthonormal direction matrix (rotations do not change them).
    Returns:
      max Euclidean distance (mm) between centroids of the 18-connected components;
      0.0 for exactly one component; NaN for an empty mask.
    """
    lab, n = label_lesions(np.asarray(mask) > 0)
    if n == 0:
        return float("nan")
    if n == 1:
        return 0.0
    cent = np.asarray(ndi.center_of_mass(np.ones(lab.shape, np.float32), lab, np.arange(1, n + 1)))
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    return float(pdist(cent * sp[None, :]).max())


def difficulty_measures(seg: np.ndarray | None, suv: np.ndarray, ct: np.ndarray, spacing_mm) -> dict:
    """Per-case difficulty measures (docs/curricula.md, "Case table and difficulty measures"), computed on the
    native grid.

    Args:
      seg: (z, y, x) lesion mask (> 0 is lesion) or None for an unlabeled study.
      suv: (z, y, x) SUVbw; ct: (z, y, x) CT in HU; all on the same grid.
      spacing_mm: voxel size (z, y, x) in mm.
    Returns:
      dict with
        `tmtv_ml`            lesion voxels x voxel volume (ml);
        `n_lesions`          number of 18-connected components (int);
        `smallest_lesion_ml` volume of the smallest component (ml);
        `suv_max`            max SUV inside the mask;
        `tbr`                suv_max / mean SUV of (body minus lesions), body = CT > -500 HU;
        `dmax_mm`            `dmax_centroids_mm(seg, spacing_mm)`;
        `body_ml`            body volume (ml), defined for every case.
      Lesion-free mask: tmtv 0, n 0, the others NaN. `seg is None`: every lesion measure NaN (n_lesions NaN
      too). tbr is NaN if the background region is empty.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    vox_ml = float(np.prod(sp)) / 1000.0
    body = np.asarray(ct) > BODY_HU
    out: dict[str, Any] = {k: float("nan") for k in MEASURES}
    out["body_ml"] = float(np.count_nonzero(body)) * vox_ml
    if seg is None:
        return out
    fg = np.asarray(seg) > 0
    lab, n = label_lesions(fg)
    out["tmtv_ml"] = float(np.count_nonzero(fg)) * vox_ml
    out["n_lesions"] = n
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    out["smallest_lesion_ml"] = float(sizes.min()) * vox_ml
    suv = np.asarray(suv, dtype=np.float32)
    out["suv_max"] = float(suv[fg].max())
    bg = body & ~fg
    out["tbr"] = float(out["suv_max"] / suv[bg].mean(dtype=np.float64)) if bg.any() else float("nan")
    out["dmax_mm"] = dmax_centroids_mm(fg, sp)
    return out


# ---------------------------------------------------------------------------------------------------------
# The manifest: reading (with migration) and the one writer
# ---------------------------------------------------------------------------------------------------------


def migrate_manifest(doc: Mapping[str, Any]) -> dict:
    """A version-1 manifest document in the current format (module docstring, "Older stores"); a current one is
    returned as a copy. Raises DataError for a version newer than this code reads."""
    doc = copy.deepcopy(dict(doc))
    version = doc.get("version", 1)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise DataError(
            f"case-store format {version!r}, newer than this clips-jax reads ({MANIFEST_VERSION}); "
            "upgrade clips-jax or prepare the store again with this version"
        )
    if version < 2:
        top_record = doc.pop("teacher", None)
        scored = False
        for c in doc.get("cases", []):
            derived: dict = c.setdefault(DERIVED, {})
            if "stage_a" in c:
                derived["stage_a"] = c.pop("stage_a")
            c.pop("teacher", None)
            if "teacher_loss" in c:
                derived.setdefault("teacher", {})[LEGACY_TEACHER] = c.pop("teacher_loss")
                scored = True
            if not derived:
                del c[DERIVED]
        if scored or isinstance(top_record, Mapping):
            top = doc.setdefault(DERIVED, {})
            top.setdefault("teachers", {})[LEGACY_TEACHER] = dict(top_record) if isinstance(top_record, Mapping) else {}
            top["default_teacher"] = LEGACY_TEACHER
    doc["version"] = MANIFEST_VERSION
    return doc


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest document of a store, in the current format (migrated on read).

    Raises DataError naming the file (and what to do) if it is missing, unreadable or of a newer format."""
    path = Path(cache_dir) / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise DataError(
            f"{path}: no manifest; run `python -m clips_jax.data.prepare --input DATA --output {Path(cache_dir)}` first"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it and run prepare again") from e
    try:
        return migrate_manifest(doc)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


@contextlib.contextmanager
def manifest_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of a store's manifest (`fcntl.flock` on `CACHE/.manifest.lock`, created if
    missing) for the duration of the block. DataError if the lock file cannot be opened (e.g. read-only store)
    or the file system has no locks."""
    path = Path(cache_dir) / LOCK

    def error(stage: str, e: OSError) -> DataError:
        if stage == "open":
            return DataError(
                f"{path}: cannot open the manifest's lock file ({e}); the store must be writable to update it"
            )
        return DataError(
            f"{path}: cannot lock the store's manifest ({e}); this file system does not support file "
            "locks: put the case store on a local disk (or one with lock support) and run again"
        )

    with exclusive_lock(path, error):
        yield


def update_manifest(cache_dir: str | Path, change: Callable[[dict], Any], *, create: bool = False) -> dict:
    """The one writer of `cache_dir/manifest.json`: read, change and write it under the manifest lock.

    Args:
      change: called with the current manifest document (read from disk under the lock, migrated to the current
        format); it changes it in place, or returns a new document (any non-None return value replaces it).
        An exception leaves the file untouched (and propagates).
      create: a missing or unreadable manifest starts as `{"version", "cases": []}` (the prepare command)
        instead of raising DataError.
    Returns: the document written, as a reader will parse it (NaN written and returned as None).
    """
    path = Path(cache_dir) / MANIFEST
    if create:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with manifest_lock(cache_dir):
        try:
            doc = read_manifest(cache_dir)
        except DataError:
            if not create or path.is_file():  # only a missing manifest starts a new store
                raise
            doc = {"version": MANIFEST_VERSION, "cases": []}
        new = change(doc)
        doc = doc if new is None else dict(new)
        doc["version"] = MANIFEST_VERSION
        text = json.dumps(json_safe(doc), indent=1, allow_nan=False)
        write_text_atomic(path, text)
    return json.loads(text)


def write_case_arrays(
    cache_dir: str | Path, case_id: str, ct: np.ndarray, suv: np.ndarray, seg: np.ndarray | None, dtype=np.float32
) -> Path:
    """Store one resampled case as `cache_dir/cases/<case_id>/{ct,suv,seg,fg}.npy`, atomically (whole folder).

    Args:
      ct, suv: (z, y, x) HU / SUV, stored as `dtype` (float32 or float16).
      seg: (z, y, x) 0/1 mask or None (then an all-zero uint8 mask is stored).
    An existing folder of that case is replaced only once the new one is complete.
    """
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise DataError(f"case store dtype {dtype}: use float32 or float16")
    seg_u8 = np.zeros(np.shape(ct), np.uint8) if seg is None else (np.asarray(seg) > 0).astype(np.uint8)
    target = Path(cache_dir) / "cases" / case_id
    with atomic_dir(target, overwrite=True) as tmp:
        np.save(tmp / "ct.npy", np.ascontiguousarray(ct, dtype=dtype))
        np.save(tmp / "suv.npy", np.ascontiguousarray(suv, dtype=dtype))
        np.save(tmp / "seg.npy", seg_u8)
        np.save(tmp / "fg.npy", np.argwhere(seg_u8 > 0).astype(np.int32))
    return target


def case_complete(cache_dir: str | Path, case_id: str) -> bool:
    """True if all array files of `case_id` exist in the store."""
    d = Path(cache_dir) / "cases" / case_id
    return all((d / f"{n}.npy").is_file() for n in (*ARRAY_NAMES, "fg"))


def _derived_setter(name: str, key: str | None, value: Any) -> Callable[[dict], None]:
    """A case-entry change that sets `derived.<name>` (key None) or `derived.<name>.<key>` to `value`."""

    def set_value(entry: dict) -> None:
        d = entry.setdefault(DERIVED, {})
        if key is None:
            d[name] = value
        else:
            d.setdefault(name, {})[key] = value

    return set_value


class CaseStore:
    """Read side of a prepared cache: manifest, memory-mapped arrays, splits and difficulty vectors.

    Cheap to pickle (holds the folder path and the parsed manifest), so it can be handed to grain workers.
    Case `i` is the i-th manifest entry (sorted by id by `prepare`); every per-case vector is in that order.

    Raises DataError (naming the folder) if the manifest is missing or unreadable.
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self._load(read_manifest(self.cache_dir))

    def _load(self, doc: dict) -> None:
        self.manifest: dict = doc
        self.cases: list[dict] = list(self.manifest.get("cases", []))
        self.ids: list[str] = [c["id"] for c in self.cases]
        self._index = {cid: i for i, cid in enumerate(self.ids)}

    # -- writing (module docstring, "Writing") -------------------------------------------------------------
    def update(self, change: Callable[[dict], Any]) -> None:
        """Change the manifest on disk (`update_manifest`: under the lock, applied to the current file) and
        refresh this store's in-memory copy from the document written."""
        self._load(update_manifest(self.cache_dir, change))

    def update_cases(
        self, changes: Mapping[str, Callable[[dict], Any]], *, store_change: Callable[[dict], Any] | None = None
    ) -> None:
        """Apply `changes[case_id](entry)` (in place) to the current manifest entry of each listed case, and
        `store_change(doc)` to the document's top level if given, in one locked update. DataError naming the
        first id that is not in the manifest (nothing is written then)."""

        def change(doc: dict) -> None:
            by_id = {c.get("id"): c for c in doc.get("cases", [])}
            unknown = [k for k in changes if k not in by_id]
            if unknown:
                raise DataError(
                    f"case {unknown[0]!r} (and {len(unknown) - 1} more) is not in the store "
                    f"{self.cache_dir}; was it re-prepared without it?"
                )
            for cid, fn in changes.items():
                fn(by_id[cid])
            if store_change is not None:
                store_change(doc)

        self.update(change)

    def set_derived(self, name: str, values: Mapping[str, Any], *, key: str | None = None) -> None:
        """Set `derived.<name>` (or `derived.<name>.<key>`) of the listed cases: `values` {case id: value}.
        One locked update (`update_cases`)."""
        self.update_cases({cid: _derived_setter(name, key, v) for cid, v in values.items()})

    def set_teacher_losses(
        self, teacher: str, losses: Mapping[str, float], record: Mapping[str, Any] | None, *, default: bool = True
    ) -> None:
        """Store per-case losses of one transfer teacher (`derived.teacher.<teacher>`; NaN -> null), its record
        (top-level `derived.teachers.<teacher>`, when given) and, with `default`, make it the default teacher.
        One locked update; DataError for a case id not in the manifest."""

        def record_teacher(doc: dict) -> None:
            top = doc.setdefault(DERIVED, {})
            if record is not None or teacher not in top.get("teachers", {}):
                top.setdefault("teachers", {})[teacher] = dict(record or {})
            if default:
                top["default_teacher"] = teacher

        setters = {cid: _derived_setter("teacher", teacher, v) for cid, v in losses.items()}
        self.update_cases(setters, store_change=record_teacher)

    # -- derived data (module docstring) ---------------------------------------------------------------------
    def derived(self, case: int | str, name: str, default: Any = None) -> Any:
        """`derived.<name>` of one case (e.g. "stage_a": the record of its stage-A map), or `default`."""
        return self.cases[self.index(case)].get(DERIVED, {}).get(name, default)

    @property
    def teachers(self) -> dict[str, dict]:
        """Teacher id -> provenance record of every teacher that scored cases of this store."""
        return dict(self.manifest.get(DERIVED, {}).get("teachers", {}))

    @property
    def default_teacher(self) -> str | None:
        """The teacher readers get when they name none (the one the teacher command scored last), or None."""
        return self.manifest.get(DERIVED, {}).get("default_teacher")

    def teacher_losses(self, teacher: str | None = None) -> dict[str, float]:
        """{case id: loss (NaN for null)} of the cases one teacher scored (None = `default_teacher`; no
        teacher at all: {}). ConfigError for a teacher id the store does not know."""
        tid = self.default_teacher if not teacher else str(teacher)
        if tid is None:
            return {}
        if tid not in self.teachers:
            raise ConfigError(
                f"store {self.cache_dir}: no teacher {tid!r} (known: {sorted(self.teachers)}); score "
                "the cases first: python -m clips_jax.experiments.teacher --store ..."
            )
        out = {}
        for c in self.cases:
            scores = c.get(DERIVED, {}).get("teacher", {})
            if tid in scores:
                out[c["id"]] = float("nan") if scores[tid] is None else float(scores[tid])
        return out

    def case_rows(self, teacher: str | None = None) -> list[dict]:
        """The manifest entries with the derived column `teacher_loss` of `teacher` (None = the default
        teacher) where it scored the case: the rows of `clips_jax.curricula.case_table_from_manifest`."""
        losses = self.teacher_losses(teacher)
        return [{**c, "teacher_loss": losses[c["id"]]} if c["id"] in losses else dict(c) for c in self.cases]

    # -- reading ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"CaseStore({str(self.cache_dir)!r}, n={len(self)})"

    def index(self, case: int | str) -> int:
        """Index of a case given its index or id (DataError if unknown)."""
        if isinstance(case, str):
            if case not in self._index:
                raise DataError(f"case {case!r} is not in the store {self.cache_dir}")
            return self._index[case]
        i = int(case)
        if not 0 <= i < len(self):
            raise DataError(f"case index {i} out of range for the store {self.cache_dir} ({len(self)} cases)")
        return i

    def case_dir(self, case: int | str) -> Path:
        """Folder of one case's arrays (`cases/<id>/`); `case` is an index or a case id (DataError if unknown)."""
        return self.cache_dir / "cases" / self.ids[self.index(case)]

    def case_arrays(self, case: int | str, mmap: bool = True, extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """`{"ct", "suv", "seg"}` (z, y, x) arrays of one case: read-only memory maps (or in-memory copies).

        ct/suv have the stored dtype (float32 or float16), seg is uint8 (all zeros if `has_seg` is false).

        Args:
          extra: names of optional per-case arrays to add (e.g. `("stage_a",)` -> `cases/<id>/stage_a.npy`),
            returned under their names with their stored dtype; default none (only ct, suv, seg).
        Raises:
          ConfigError naming the case and how to produce it if an `extra` array is missing; DataError if an
          array is unreadable or an extra array's shape differs from the case's grid.
        """
        d = self.case_dir(case)
        mode = "r" if mmap else None
        for n in extra:
            if not (d / f"{n}.npy").is_file():
                raise ConfigError(self._missing_message(n, [self.ids[self.index(case)]]))
        try:
            out = {n: np.load(d / f"{n}.npy", mmap_mode=mode) for n in (*ARRAY_NAMES, *extra)}
        except (OSError, ValueError) as e:
            raise DataError(f"{d}: cannot read the cached arrays ({e}); run prepare again") from e
        for n in extra:
            if out[n].shape != out["ct"].shape:
                raise DataError(
                    f"{d / (n + '.npy')}: shape {out[n].shape} differs from the case grid "
                    f"{out['ct'].shape}; delete it and compute it again"
                )
        return out

    def has_array(self, case: int | str, name: str) -> bool:
        """True if the case folder holds `<name>.npy` (e.g. "stage_a")."""
        return (self.case_dir(case) / f"{name}.npy").is_file()

    def missing_extra(self, names: Sequence[str], indices=None) -> list[str]:
        """Ids of the cases (all, or store `indices`) lacking any of the optional arrays `names`."""
        idx = range(len(self)) if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]
        return [self.ids[i] for i in idx if not all(self.has_array(i, n) for n in names)]

    def require_extra(self, names: Sequence[str], indices=None) -> None:
        """Raise ConfigError (naming the first cases and the command to run) if a case lacks one of `names`."""
        for n in names:
            missing = self.missing_extra((n,), indices)
            if missing:
                raise ConfigError(self._missing_message(n, missing))

    def _missing_message(self, name: str, ids: Sequence[str]) -> str:
        hint = EXTRA_HINTS.get(name, "compute it for every case first").format(store=self.cache_dir)
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        return f"store {self.cache_dir}: case {', '.join(ids[:3])}{more} has no {name}.npy; {hint}"

    def foreground(self, case: int | str) -> np.ndarray:
        """(K, 3) int32 (z, y, x) indices of the lesion voxels on the stored grid (K = 0 if none)."""
        return np.load(self.case_dir(case) / "fg.npy")

    def geometry(self, case: int | str) -> Geometry:
        """The stored (resampled) grid of a case."""
        return Geometry.from_json(self.cases[self.index(case)]["geometry"])

    def native_geometry(self, case: int | str) -> Geometry:
        """The case's original PET grid."""
        return Geometry.from_json(self.cases[self.index(case)]["native_geometry"])

    def split_indices(self, name: str) -> np.ndarray:
        """int64 indices of the cases whose split is `name` ("train", "val", "test", "unused"), ascending."""
        return np.array([i for i, c in enumerate(self.cases) if c.get("split") == name], dtype=np.int64)

    def difficulty(self, name: str) -> np.ndarray:
        """(N,) float64 vector of one manifest measure (e.g. "tmtv_ml", "dmax_mm"); NaN where undefined."""
        if self.cases and name not in self.cases[0]:
            raise DataError(f"{self.cache_dir}: no measure {name!r} in the manifest; known: {list(MEASURES)}")
        return np.array([np.nan if c.get(name) is None else float(c[name]) for c in self.cases], np.float64)

    @property
    def has_seg(self) -> np.ndarray:
        """(N,) bool: the case has a ground-truth mask."""
        return np.array([bool(c.get("has_seg")) for c in self.cases], dtype=bool)

    @property
    def has_lesion(self) -> np.ndarray:
        """(N,) bool: the case has a ground-truth mask with at least one lesion voxel."""
        return np.array([bool(c.get("has_seg")) and (c.get("tmtv_ml") or 0) > 0 for c in self.cases], bool)
