"""Command line of the converter: `python -m convert_weights --help`.

Turns TMTV-Net's PyTorch weight files into a CLIPS-JAX weights directory (orbax checkpoints + JSON), without
importing torch and without executing anything stored in the files. Errors are printed as one line (no
traceback) and the exit status is 1; no partial output directory is ever left behind.
"""

from __future__ import annotations

import argparse
import sys

from clips_jax.errors import ClipsError

EPILOG = """\
examples:
  # the released TMTV-Net weights (download: see docs/weights.md)
  python -m convert_weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net
  # then, in Python:  ensemble, refiner = clips_jax.model.load_pretrained("weights/tmtv-net")

  # a single U-Net (one ensemble member or a fine-tuned U-Net, any width/depth)
  python -m convert_weights --unet my_unet.model --out weights/my-unet
  # then:  unet = clips_jax.model.load_model("weights/my-unet", "unet")

  # back to PyTorch files:  python -m convert_weights.export --weights weights/tmtv-net --out-dir torch_files

Accepted input: files written by torch.save(model.state_dict(), path) (zip format, torch >= 1.6) holding
fp32, fp16 or bf16 tensors; a DataParallel 'module.' prefix is fine. Widths/depths are read from the tensor
shapes; every missing, unexpected or mis-shaped key is reported.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m convert_weights`."""
    p = argparse.ArgumentParser(
        prog="python -m convert_weights",
        description="Convert TMTV-Net PyTorch weights (.model state_dicts) into a CLIPS-JAX weights directory "
                    "(no torch needed; pickled code is never executed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", metavar="FILE", help="ensemble file (e_latest.model: 4 U-Nets + stacking conv)")
    p.add_argument("--refiner", metavar="FILE", help="refiner file (r_latest.model)")
    p.add_argument("--unet", metavar="FILE", help="a single U-Net state_dict (saved as model 'unet')")
    p.add_argument("--out", metavar="DIR", required=True, help="output weights directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once complete)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 user error, 2 usage error from argparse)."""
    args = build_parser().parse_args(argv)
    files = {name: getattr(args, name) for name in ("ensemble", "refiner", "unet") if getattr(args, name)}
    if not files:
        print("error: nothing to convert: give --ensemble and/or --refiner, or --unet (see --help)",
              file=sys.stderr)
        return 2
    try:
        from convert_weights import convert_files
        out = convert_files(files, args.out, overwrite=args.overwrite)
    except ClipsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(f"{k} <- {v}" for k, v in files.items())
    print(f"wrote {out} ({names})")
    if not {"ensemble", "refiner"} <= set(files):
        print("note: load_pretrained() needs both 'ensemble' and 'refiner'; use clips_jax.model.load_model(DIR, "
              "NAME) for a single network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
