"""`python -m clips_jax.train --config configs/default.py [--config.key=value ...] --workdir DIR`

Thin absl entry point (the logic is `clips_jax.trainer.train_and_evaluate`). With no flags it runs the
embedded default: synthetic PET/CT phantoms (generated on first use), a narrow U-Net, a few minutes on a CPU.
Re-running the same command resumes from the last checkpoint in the workdir.

Examples:
  python -m clips_jax.train                                             # default job, workdir runs/default
  python -m clips_jax.train --config configs/default.py:tiny --workdir /tmp/run   # seconds, for a smoke test
  python -m clips_jax.train --config configs/default.py --config.curriculum.name=self_paced_hard
  python -m clips_jax.train --config configs/tmtv_finetune.py --config.data.store=cache/autopet
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Output folder: checkpoints, metrics.jsonl, config.json, summary.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from clips_jax import trainer  # after flag parsing: importing jax must not happen before distributed init
    from clips_jax.errors import ClipsError

    trainer.maybe_initialize_distributed()
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ClipsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
