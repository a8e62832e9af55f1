"""Convert TMTV-Net's PyTorch weight files to a CLIPS-JAX weights directory (and back), without torch.

    python -m convert_weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net
    python -m convert_weights --unet finetuned_unet.model --out weights/my-unet
    python -m convert_weights.export --weights weights/tmtv-net --out_dir back_to_torch/

From Python:

    from convert_weights import convert_files
    convert_files({"ensemble": "e_latest.model", "refiner": "r_latest.model"}, "weights/tmtv-net")
    ensemble, refiner = clips_jax.model.load_pretrained("weights/tmtv-net")

Pieces: `torchzip` reads/writes the torch.save zip format safely (no pickle code execution), `keymap` maps names
and layouts and checks keys/shapes strictly, `export` writes torch-loadable files back. The output directory is
written by `clips_jax.model.save_weights` (atomic: complete or absent).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from clips_jax.errors import WeightsError
from convert_weights.keymap import convert_state_dict, strip_module_prefix
from convert_weights.torchzip import read_state_dict, write_state_dict  # noqa: F401

#: model name -> our class (the CLI flags --ensemble / --refiner / --unet).
MODEL_CLASS = {"ensemble": "Ensemble", "refiner": "Refiner", "unet": "UNet"}

#: sha256 and size of the released TMTV-Net files (the Git-LFS pointers of `main/src/models/e_latest.model` and
#: `r_latest.model` in the history of qurit-frizi/TMTV-Net).
PRETRAINED_FILES = {
    "0792262f82abafdf2ffbb277a92d65849e63f0e97eceeb1c2991650398c00004": ("e_latest.model", 345642925),
    "d25082f4698915a9bc1d49ea2bde06870569a1ec1df5ff460891edaef53d92de": ("r_latest.model", 1459659),
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def convert_file(path: str | os.PathLike, class_name: str) -> tuple[dict, dict, dict]:
    """Read one torch file and convert it to our layout.

    Args:
      path: a torch.save'd state_dict of a TMTV-Net network (a `module.` prefix is accepted).
      class_name: "Ensemble", "Refiner" or "UNet".

    Returns:
      (config, params, provenance): the detected constructor config, the pure float32 parameter dict for
      `save_weights`, and a JSON-able record (file name, sha256, size, tensor count, dtypes, whether the file
      is the released TMTV-Net file).

    Raises:
      WeightsError (unreadable/unsafe file, or every missing / unexpected / mis-shaped key listed).
    """
    p = Path(path)
    sd = read_state_dict(p)
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    config, params = convert_state_dict(strip_module_prefix(sd), class_name, source=str(p))
    digest = sha256_file(p)
    known = PRETRAINED_FILES.get(digest)
    prov = {
        "file": p.name,
        "sha256": digest,
        "bytes": p.stat().st_size,
        "tensors": len(sd),
        "file_dtypes": dtypes,
        "parameters": int(sum(int(np.prod(v.shape)) for v in sd.values())),
        "released_tmtv_net_file": known[0] if known else None,
    }
    return config, params, prov


def convert_files(
    files: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert several torch files into one weights directory that `clips_jax.model.load_model` reads.

    Args:
      files: model name ("ensemble", "refiner", "unet") -> torch file. "ensemble" + "refiner" is what
        `load_pretrained` needs.
      out_dir: directory to create (must not exist unless `overwrite`); written atomically, so on any error
        nothing is left behind.

    Returns: the output directory.
    Raises: WeightsError (bad input file or name), FileExistsError as WeightsError when out_dir exists.
    """
    from clips_jax.model.checkpoint import save_weights

    if not files:
        raise WeightsError("nothing to convert: give --ensemble and --refiner, or --unet")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise WeightsError(f"{out}: already exists; choose another --out or pass --overwrite")
    models, source = {}, {}
    for name, path in files.items():
        if name not in MODEL_CLASS:
            raise WeightsError(f"unknown model name {name!r}; expected one of {sorted(MODEL_CLASS)}")
        config, params, prov = convert_file(path, MODEL_CLASS[name])
        models[name] = (MODEL_CLASS[name], config, params)
        source[name] = prov
    source["converter"] = "convert_weights (clips_jax)"
    return save_weights(out, models, source=source, overwrite=overwrite)
