"""Export a CLIPS-JAX weights directory back to PyTorch state_dict files (no torch needed).

    python -m convert_weights.export --weights weights/tmtv-net --out-dir torch_files

writes one torch zip file per model, named like the originals: `ensemble` -> `e_latest.model`, `refiner` ->
`r_latest.model`, any other model NAME -> `NAME.model`. Each loads with `torch.load(f, weights_only=True)` and
`load_state_dict(strict=True)` into the original TMTV-Net classes (their state_dict keys and layouts:
`convert_weights.keymap`, docs/weights.md "5. Mapping"), so a network fine-tuned here can go back to the PyTorch
pipeline. The output directory is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clips_jax.errors import ClipsError, WeightsError
from clips_jax.fileio import atomic_dir
from convert_weights.keymap import to_torch_state_dict
from convert_weights.torchzip import write_state_dict

FILE_NAMES = {"ensemble": "e_latest.model", "refiner": "r_latest.model"}


def export_weights(weights_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   names: list[str] | None = None, overwrite: bool = False) -> list[Path]:
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
        raise WeightsError(f"{out}: already exists; choose another --out-dir or pass --overwrite") from e
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 error)."""
    p = argparse.ArgumentParser(
        prog="python -m convert_weights.export",
        description="Export a CLIPS-JAX weights directory to PyTorch state_dict files (torch.load-able, "
                    "strict-loadable into the original TMTV-Net classes). torch is not needed.",
        epilog="example:\n  python -m convert_weights.export --weights weights/tmtv-net --out-dir torch_files\n"
               "  -> torch_files/e_latest.model, torch_files/r_latest.model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", metavar="DIR", required=True, help="CLIPS-JAX weights directory")
    p.add_argument("--out-dir", metavar="D", required=True, help="output directory to create")
    p.add_argument("--models", nargs="*", metavar="NAME", help="models to export (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    args = p.parse_args(argv)
    try:
        files = export_weights(args.weights, args.out_dir, names=args.models, overwrite=args.overwrite)
    except ClipsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
