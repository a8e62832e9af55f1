"""Phantom cohorts with an explicit split: the data of a curriculum study on the built-in phantoms.

Why: a curriculum comparison needs many lesion-bearing test patients (dozens, not 4), a validation split for
choosing each run's checkpoint, and a training split whose difficulty reaches far enough into the hard
cases that "does a curriculum help on the hard patients" has something to answer. The seeded 70/15/15 split
of `clips_jax.data.prepare` gives none of these guarantees on a few dozen phantoms; this module fixes the
split instead, from each phantom's known ground truth (`truth.json` of `clips_jax.data.phantoms`: its
latent `difficulty` u in [0, 1] and its `n_lesions`).

`study_split(truths, test_lesion_cases=40, test_free_cases=8, val_cases=12)`:

* the lesion-bearing cases are sorted by u (ties: case id) and dealt, in that order, to test / val / train in
  proportion to their sizes (each case goes to the split furthest below its share so far), so every split
  covers the whole difficulty range evenly: the training split keeps its hard tail (about a third of its
  lesion cases have u >= 2/3: the smallest, faintest lesions, next to the heart, kidneys or bladder) and the
  test split has hard patients to test on;
* lesion-free cases: the first `test_free_cases` (by case id) go to test (their |TMTV error| is their false
  positive volume), the others to train; validation holds lesion cases only (checkpoints are chosen by Dice);
* no random numbers: the same phantoms give the same split, whatever the machine or the order of generation.

`phantom_split(phantoms_config, raw_dir)` turns `config.data.phantoms.split` into the split JSON that
`clips_jax.data.prepare.prepare_dataset(split_json=...)` takes ("" = none: prepare's seeded split; "study" =
`study_split` with the counts of the config; a path = that JSON file), and `split_tag` names the store folder
after it so that stores of different splits never mix (`clips_jax.trainer.phantom_dirs`). `split_summary`
describes a split (counts, difficulty quantiles, hard tail) for the docs and the tests.

Example (the split of phantoms already generated under `raw`, and what it holds):
    split = study_split(read_truths(raw), test_lesion_cases=40, test_free_cases=8, val_cases=12)
    split_summary(split, read_truths(raw))   # per split: cases, lesion / lesion-free / hard, quartiles of u
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clips_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")

#: Latent difficulty from which a case counts as hard in `split_summary` (the top third of u in [0, 1]).
HARD_DIFFICULTY = 2.0 / 3.0

#: The study split's counts when the config does not set them (`phantom_split`).
STUDY_DEFAULTS = {"test_lesion_cases": 40, "test_free_cases": 8, "val_cases": 12}


def study_split(
    truths: Mapping[str, Mapping],
    *,
    test_lesion_cases: int = STUDY_DEFAULTS["test_lesion_cases"],
    test_free_cases: int = STUDY_DEFAULTS["test_free_cases"],
    val_cases: int = STUDY_DEFAULTS["val_cases"],
) -> dict[str, list[str]]:
    """The difficulty-stratified study split of a phantom cohort (module docstring).

    Args:
      truths: case id -> its phantom truth (at least "difficulty" and "n_lesions"; `truth.json`).
      test_lesion_cases: lesion-bearing test cases (>= 1).
      test_free_cases: lesion-free test cases (>= 0).
      val_cases: validation cases, all lesion-bearing (>= 1).
    Returns:
      {"train": ids, "val": ids, "test": ids}, each sorted; every case in exactly one split.
    Raises:
      ConfigError when the cohort has too few lesion-bearing (at least test + val + 3 for training) or
      lesion-free cases for the counts; DataError when a truth lacks "difficulty" or "n_lesions".
    """
    n_test, n_free, n_val = int(test_lesion_cases), int(test_free_cases), int(val_cases)
    if n_test < 1 or n_val < 1 or n_free < 0:
        raise ConfigError(
            f"study split: test_lesion_cases={n_test}, val_cases={n_val} must be >= 1 and test_free_cases={n_free} >= 0"
        )
    lesion, free = [], []
    for cid in sorted(truths):
        t = truths[cid]
        try:
            u, n_les = float(t["difficulty"]), int(t["n_lesions"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"case {cid}: its phantom truth has no usable difficulty / n_lesions ({e!r})") from None
        (lesion if n_les > 0 else free).append((u, cid))
    n_train = len(lesion) - n_test - n_val
    if n_train < 3 or len(free) < n_free:
        raise ConfigError(
            f"study split: the cohort has {len(lesion)} lesion-bearing and {len(free)} lesion-free cases; "
            f"{n_test} + {n_val} lesion cases for test + validation, at least 3 for training and {n_free} "
            "lesion-free test cases are needed: generate more phantoms (data.phantoms.cases)"
        )
    quota = {"test": n_test, "val": n_val, "train": n_train}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    lesion.sort()
    total = len(lesion)
    for k, (_, cid) in enumerate(lesion):
        # the split furthest below its proportional share of the first k + 1 cases (ties: test, val, train);
        # the deficits sum to 1, so the chosen one is > 0 and no split ever exceeds its quota
        best = max(("test", "val", "train"), key=lambda s: quota[s] * (k + 1) / total - len(out[s]))
        out[best].append(cid)
    out["test"] += [cid for _, cid in free[:n_free]]
    out["train"] += [cid for _, cid in free[n_free:]]
    return {s: sorted(v) for s, v in out.items()}


def read_truths(raw_dir: str | Path, case_ids: Sequence[str] | None = None) -> dict[str, dict]:
    """{case id: truth} of the phantoms under `raw_dir` (`<case_id>/truth.json`; all of them, or `case_ids`).
    DataError naming the file when one is missing or unreadable."""
    raw = Path(raw_dir)
    ids = sorted(p.parent.name for p in raw.glob("*/truth.json")) if case_ids is None else list(case_ids)
    out = {}
    for cid in ids:
        path = raw / cid / "truth.json"
        try:
            out[cid] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the phantom truth ({e})") from None
    return out


def split_summary(split: Mapping[str, Sequence[str]], truths: Mapping[str, Mapping]) -> dict:
    """Per split: cases, lesion-bearing cases, lesion-free cases, hard lesion cases (u >= HARD_DIFFICULTY), the
    quartiles of u over its lesion cases, and the median TMTV (ml) of its easy and hard lesion cases."""
    out = {}
    for s in SPLITS:
        ids = list(split.get(s, []))
        les = [c for c in ids if int(truths[c]["n_lesions"]) > 0]
        u = np.array([float(truths[c]["difficulty"]) for c in les])
        hard = [c for c in les if float(truths[c]["difficulty"]) >= HARD_DIFFICULTY]
        easy = [c for c in les if float(truths[c]["difficulty"]) < HARD_DIFFICULTY]
        med = lambda cs: float(np.median([float(truths[c]["tmtv_ml"]) for c in cs])) if cs else float("nan")  # noqa: E731
        out[s] = {
            "cases": len(ids),
            "lesion": len(les),
            "lesion_free": len(ids) - len(les),
            "hard_lesion": len(hard),
            "difficulty_quartiles": [round(float(q), 3) for q in np.quantile(u, [0.25, 0.5, 0.75])] if les else [],
            "median_tmtv_ml_easy": med(easy),
            "median_tmtv_ml_hard": med(hard),
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# The `data.phantoms.split` setting
# ---------------------------------------------------------------------------------------------------------


def study_counts(phantoms_config) -> dict[str, int]:
    """The study split's counts of a `config.data.phantoms` (its keys of STUDY_DEFAULTS, else the defaults)."""
    get = phantoms_config.get if hasattr(phantoms_config, "get") else lambda k, d=None: d
    return {k: int(get(k, v)) for k, v in STUDY_DEFAULTS.items()}


def split_tag(phantoms_config) -> str:
    """Suffix of the phantom store folder for `config.data.phantoms.split`: "" (prepare's seeded split),
    "_study<test lesion>+<test free>v<val>" or "_split<first 8 hex of the split file's SHA-256>"."""
    spec = str(phantoms_config.get("split", "") or "")
    if not spec:
        return ""
    if spec == "study":
        n = study_counts(phantoms_config)
        return f"_study{n['test_lesion_cases']}+{n['test_free_cases']}v{n['val_cases']}"
    return "_split" + hashlib.sha256(_read_split_file(spec).encode()).hexdigest()[:8]


def _read_split_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"data.phantoms.split={path!r}: not 'study' and not a readable split file ({e}); use '', 'study' or "
            'a JSON file {"train": [ids], "val": [...], "test": [...]}'
        ) from None


def phantom_split(phantoms_config, raw_dir: str | Path, case_ids: Sequence[str]) -> dict[str, list[str]] | None:
    """The split JSON for preparing the built-in phantoms `case_ids` of `raw_dir`: None for
    `data.phantoms.split = ""` (prepare's seeded split), `study_split` of their truths (counts from the config,
    `study_counts`) for "study", the file's content for a path. ConfigError for an unreadable file or a cohort
    too small for the study counts."""
    spec = str(phantoms_config.get("split", "") or "")
    if not spec:
        return None
    if spec == "study":
        return study_split(read_truths(raw_dir, case_ids), **study_counts(phantoms_config))
    try:
        split = json.loads(_read_split_file(spec))
    except ValueError as e:
        raise ConfigError(f"data.phantoms.split={spec!r}: not valid JSON ({e})") from None
    if not isinstance(split, dict):
        raise ConfigError(f'data.phantoms.split={spec!r}: expected {{"train": [ids], "val": [...], "test": [...]}}')
    return split
