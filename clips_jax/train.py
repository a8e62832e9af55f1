"""Train a model: `clips-train [--config NAME|PATH[:variant]] [--config.key=value ...] [--workdir DIR]`.

The command-line face of `clips_jax.trainer.train_and_evaluate`. With no flags it runs the packaged default
(`clips_jax/configs/default.py`): synthetic PET/CT phantoms generated on first use, a narrow U-Net, a few
minutes on a CPU. Re-running the same command resumes from the last checkpoint in the workdir. `--config`
takes a packaged config name (`default`, `default:tiny`, `tmtv_finetune`, `tmtv_finetune:refiner`) or a
config file of your own (`path/to/my_config.py[:variant]`); any config value can be overridden with
`--config.<key>=<value>`.

Examples:
  clips-train                                                   # the default job, workdir runs/default
  clips-train --config default:tiny --workdir /tmp/run          # seconds: a smoke test
  clips-train --config.curriculum.name=self_paced_hard --workdir runs/spl
  clips-train --config tmtv_finetune --config.data.store=cache/autopet --workdir runs/finetune
  python -m clips_jax.train --config default:tiny               # the same command without the installed script

Exit status (README, "Command-line convention"): 0 done, 1 bad input data, 2 bad flags or settings.
"""

from __future__ import annotations

from typing import Sequence

from clips_jax import cli
from clips_jax.configs import config_path, default_path


def define_flags(fv) -> None:
    """`--config` (ml_collections config file, overridable per key) and `--workdir`."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        default_path(),
        "Training config: a packaged name (default, default:tiny, tmtv_finetune[:variant], curriculum_study[:variant]) "
        "or a file path[:variant].",
        lock_config=True,
        flag_values=fv,
    )
    flags.DEFINE_string(
        "workdir",
        "runs/default",
        "Output folder: checkpoints, metrics.jsonl, config.json, summary.json.",
        flag_values=fv,
    )


def run_from_flags(fv) -> int:
    """Train (or resume) the run in `--workdir`; returns 0 (errors are raised and reported by `cli.run_tool`)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from clips_jax import trainer  # after flag parsing: importing jax must not happen before distributed init

    config = load_config(fv)
    trainer.maybe_initialize_distributed()
    trainer.train_and_evaluate(config, fv["workdir"].value)
    return cli.EXIT_OK


def load_config(fv):
    """The parsed `--config` (ml_collections loads the file lazily: a missing or broken file surfaces here).

    Raises: cli.UsageError naming the file and the packaged names when the config cannot be loaded.
    """
    from clips_jax.configs import names

    try:
        config = fv["config"].value
        config.keys()
    except Exception as e:  # noqa: BLE001 - ml_collections reports a failed load as OSError/ValueError/...
        first = str(e).strip().splitlines()
        raise cli.UsageError(
            f"--config={fv['config'].config_filename}: cannot load it "
            f"({first[-1].strip() if first else type(e).__name__}); "
            f"use a packaged name ({', '.join(names())}, with :variant) or a config file path"
        ) from e
    return config


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """argv with a packaged config name after `--config` turned into its file path (`configs.config_path`)."""
    out: list[str] = []
    for a in argv:
        if a.startswith("--config="):
            out.append("--config=" + config_path(a[len("--config=") :]))
        elif out and out[-1] == "--config":
            out.append(config_path(a))
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from clips_jax.provenance import code_commit

    code_commit()  # the commit of the code just imported, cached for the runs' summaries (run_provenance)
    argv = list(sys.argv if argv is None else argv)
    return cli.run_tool(resolve_config_args(argv), define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
