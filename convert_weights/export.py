"""Export a CLIPS-JAX weights directory back to PyTorch state_dict files (no torch needed).

Examples:
    clips-export-weights --weights weights/tmtv-net --out_dir torch_files
    python -m convert_weights.export --weights weights/tmtv-net --out_dir torch_files --models ensemble

writes one torch zip file per model, named like the originals: `ensemble` -> `e_latest.model`, `refiner` ->
`r_latest.model`, any other model NAME -> `NAME.model`. Each loads with `torch.load(f, weights_only=True)` and
`load_state_dict(strict=True)` into the original TMTV-Net classes (their state_dict keys and layouts:
`convert_weights.keymap`, docs/weights.md "5. Mapping"), so a network fine-tuned here can go back to the PyTorch
pipeline. The output directory is written atomically.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from clips_jax.errors import WeightsError
from clips_jax.fileio import atomic_dir
from convert_weights.keymap import to_torch_state_dict
from convert_weights.torchzip import write_state_dict

FILE_NAMES = {"ensemble": "e_latest.model", "refiner": "r_latest.model"}


def export_weights(
    weights_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    names: list[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the models of `weights_dir` as torch state_dict files into a new directory `out_dir`.

    Args:
      weights_dir: a directory written by `convert_weights` / `clips_jax.model.save_weights`.
      out_dir: directory to create (atomically; must not exist unless `overwrite`).
      names: models to export (default: all in the directory).

    Returns: the written file paths (float32 tensors, PyTorch names and layouts).
    Raises: WeightsError for a missing/damaged weights directory, an unknown model name or an existing out_dir.
    """
    from clips_jax.model.checkpoint import load_model, param_dict, read_weights_meta

    meta = read_weights_meta(weights_dir)
    names = list(names or meta["models"])
    for n in names:
        if n not in meta["models"]:
            raise WeightsError(f"{weights_dir}: no model {n!r} (has {sorted(meta['models'])})")
    out = Path(out_dir)
    try:
        written = []
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for n in names:
                spec = meta["models"][n]
                model = load_model(weights_dir, n)
                sd = to_torch_state_dict(spec["class"], spec["config"], param_dict(model))
                fname = FILE_NAMES.get(n, f"{n}.model")
                write_state_dict(tmp / fname, sd, archive_name=Path(fname).stem)
                written.append(out / fname)
    except FileExistsError as e:
        raise WeightsError(f"{out}: already exists; choose another --out_dir or pass --overwrite") from e
    return written


def define_flags(fv) -> None:
    """The command's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_string("weights", None, "CLIPS-JAX weights directory.", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Output directory to create.", flag_values=fv)
    flags.DEFINE_list("models", [], "Models to export, comma-separated (default: all).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace the output directory if it exists.", flag_values=fv)
    flags.mark_flags_as_required(["weights", "out_dir"], flag_values=fv)


def run_from_flags(fv) -> int:
    """Export; returns 0 (errors: `clips_jax.cli.run_tool`)."""
    files = export_weights(
        fv["weights"].value, fv["out_dir"].value, names=fv["models"].value or None, overwrite=fv["overwrite"].value
    )
    for f in files:
        print(f"wrote {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`clips-export-weights`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status."""
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
