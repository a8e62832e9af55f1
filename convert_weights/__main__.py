"""Command line of the converter: `clips-convert-weights` (`python -m convert_weights`).

Turns TMTV-Net's PyTorch weight files into a CLIPS-JAX weights directory (orbax checkpoints + JSON), without
importing torch and without executing anything stored in the files. Errors are printed as one line (no
traceback); exit status 1 for a file that cannot be converted, 2 for a usage error (README, "Command-line
convention"); no partial output directory is ever left behind.
"""

from __future__ import annotations

import sys

EPILOG = """\
Examples:
  # the released TMTV-Net weights (download: see docs/weights.md)
  clips-convert-weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net
  # then, in Python:  ensemble, refiner = clips_jax.model.load_pretrained("weights/tmtv-net")

  # a single U-Net (one ensemble member or a fine-tuned U-Net, any width/depth)
  clips-convert-weights --unet my_unet.model --out weights/my-unet
  # then:  unet = clips_jax.model.load_model("weights/my-unet", "unet")

  # back to PyTorch files:  clips-export-weights --weights weights/tmtv-net --out_dir torch_files

Accepted input: files written by torch.save(model.state_dict(), path) (zip format, torch >= 1.6) holding
fp32, fp16 or bf16 tensors; a DataParallel 'module.' prefix is fine. Widths/depths are read from the tensor
shapes; every missing, unexpected or mis-shaped key is reported.
"""


def define_flags(fv) -> None:
    """The converter's flags (module docstring)."""
    from absl import flags

    flags.DEFINE_string("ensemble", None, "Ensemble file (e_latest.model: 4 U-Nets + stacking conv).", flag_values=fv)
    flags.DEFINE_string("refiner", None, "Refiner file (r_latest.model).", flag_values=fv)
    flags.DEFINE_string("unet", None, "A single U-Net state_dict (saved as model 'unet').", flag_values=fv)
    flags.DEFINE_string("out", None, "Output weights directory (must not exist).", flag_values=fv)
    flags.DEFINE_bool(
        "overwrite", False, "Replace --out if it exists (only once the new one is complete).", flag_values=fv
    )
    flags.mark_flag_as_required("out", flag_values=fv)


def run_from_flags(fv) -> int:
    """Convert the given files; returns 0 (errors: `clips_jax.cli.run_tool`)."""
    from clips_jax.cli import UsageError
    from clips_jax.errors import WeightsError

    files = {name: fv[name].value for name in ("ensemble", "refiner", "unet") if fv[name].value}
    if not files:
        raise UsageError("nothing to convert: give --ensemble and/or --refiner, or --unet (see --help)")
    from convert_weights import convert_files

    try:
        out = convert_files(files, fv["out"].value, overwrite=fv["overwrite"].value)
    except FileExistsError as e:
        raise WeightsError(f"{e}; choose another --out or add --overwrite") from e
    names = ", ".join(f"{k} <- {v}" for k, v in files.items())
    print(f"wrote {out} ({names})")
    if not {"ensemble", "refiner"} <= set(files):
        print(
            "note: load_pretrained() needs both 'ensemble' and 'refiner'; use clips_jax.model.load_model(DIR, "
            "NAME) for a single network"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`clips-convert-weights`; `argv` as `sys.argv` (None = sys.argv). Returns the exit status (0 ok,
    1 a file that cannot be converted, 2 a usage error)."""
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__ + "\n" + EPILOG)


if __name__ == "__main__":
    sys.exit(main())
