"""The training configs shipped with the package (ml_collections `get_config(variant)` files).

`default.py` (the built-in synthetic-phantom job; variants `tiny`, ...), `tmtv_finetune.py` (fine-tuning
the converted TMTV-Net on a real case store) and `curriculum_study.py` (the curriculum study on a phantom cohort
with an explicit split, docs/experiments.md). They are ordinary files inside the installed package, so every
command finds its defaults from any folder; `--config` takes a path (`path.py[:variant]`) or a packaged name
(`default`, `default:tiny`, `tmtv_finetune`): `config_path` resolves both.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
"""The folder of the packaged config files."""


def names() -> list[str]:
    """Names of the packaged configs (file stems), e.g. ["default", "tmtv_finetune"]."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(spec: str) -> str:
    """`--config` value -> a path ml_collections can load, keeping any `:variant` suffix.

    A packaged name (`default`, `default:tiny`, `tmtv_finetune`) becomes the file inside the package; anything
    else (a path, `path.py:variant`) is returned unchanged.
    """
    name, sep, variant = str(spec).partition(":")
    if name in names():
        return str(CONFIG_DIR / f"{name}.py") + sep + variant
    return str(spec)


def default_path() -> str:
    """Path of the packaged default config (the built-in phantom job)."""
    return str(CONFIG_DIR / "default.py")
