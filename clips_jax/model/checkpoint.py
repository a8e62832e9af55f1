"""Model-weight checkpoints: the format the converter writes and `load_pretrained` reads.

A weights directory holds one orbax checkpoint per network plus a small JSON description:

    DIR/clips_weights.json   {"format": "clips-jax-weights", "version": 1,
                              "models": {"ensemble": {"class": "Ensemble", "config": {...}}, "refiner": {...}},
                              "source": {...free-form provenance...}}
    DIR/ensemble/            orbax StandardCheckpointer tree: the model's parameters as a pure dict
    DIR/refiner/

Model names are free ("ensemble", "refiner", "unet", ...); the class and its constructor config are stored, so a
directory is self-describing. Directories are written atomically (complete or absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clips_jax.errors import WeightsError
from clips_jax.fileio import atomic_dir
from clips_jax.model.ensemble import Ensemble
from clips_jax.model.refiner import Refiner
from clips_jax.model.unet import UNet

FORMAT = "clips-jax-weights"
META_FILE = "clips_weights.json"
MODEL_CLASSES = {"UNet": UNet, "Ensemble": Ensemble, "Refiner": Refiner}


def build_model(class_name: str, config: Mapping, *, dtype=None, seed: int = 0) -> nnx.Module:
    """Instantiate a network from its class name and constructor config (as stored in `clips_weights.json`)."""
    if class_name not in MODEL_CLASSES:
        raise WeightsError(f"unknown model class {class_name!r}; expected one of {sorted(MODEL_CLASSES)}")
    cfg = config.to_json() if hasattr(config, "to_json") else dict(config)
    if class_name == "Ensemble":
        return Ensemble(
            cfg.get("n_members", 4),
            unet_kwargs=cfg.get("unet_kwargs"),
            dtype=dtype,
            combine=cfg.get("combine", "stacking"),
            rngs=nnx.Rngs(seed),
        )
    return MODEL_CLASSES[class_name](**cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(class_name: str, config: Mapping, *, dtype=None) -> nnx.Module:
    """Like `build_model` but without allocating parameters (shapes and dtypes only)."""
    return nnx.eval_shape(lambda: build_model(class_name, config, dtype=dtype))


def abstract_arrays(tree, *, dtype=None, sharding=None):
    """ShapeDtypeStructs of `tree`'s leaves (their dtype unless `dtype` is given, with `sharding`): the restore
    target of orbax."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype if dtype is None else dtype, sharding=sharding), tree
    )


def param_dict(model: nnx.Module) -> dict:
    """The model's parameters as a nested pure dict of arrays (lists become dicts with int keys)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _stringify(tree):
    if isinstance(tree, Mapping):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree, like):
    if isinstance(like, Mapping):
        return {k: _restore_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def save_weights(
    out_dir: str | os.PathLike,
    models: Mapping[str, nnx.Module | tuple[str, dict, dict]],
    *,
    source: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a weights directory atomically.

    Args:
      out_dir: target directory (must not exist unless `overwrite`).
      models: name -> an nnx model (UNet / Ensemble / Refiner), or a tuple (class_name, config, pure param dict)
        (what the converter produces without building the module).
      source: provenance recorded in the JSON (e.g. original file names and sha256).
    """
    meta = {"format": FORMAT, "version": 1, "models": {}, "source": dict(source or {})}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        for name, m in models.items():
            if isinstance(m, tuple):
                class_name, config, params = m
            else:
                class_name, config, params = type(m).__name__, m.config.to_json(), param_dict(m)
            params = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), params)
            ckptr.save((tmp / name).absolute(), _stringify(params))  # orbax needs an absolute path
            meta["models"][name] = {"class": class_name, "config": config}
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out_dir)


def read_weights_meta(weights_dir: str | os.PathLike) -> dict:
    """Read and check `clips_weights.json` of a weights directory."""
    d = Path(weights_dir)
    f = d / META_FILE
    if not f.is_file():
        raise WeightsError(
            f"{d}: not a CLIPS-JAX weights directory (no {META_FILE}). Convert TMTV-Net .model "
            "files with `python -m convert_weights --ensemble e_latest.model --refiner "
            "r_latest.model --out DIR`."
        )
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{f}: damaged JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{f}: unknown format {meta.get('format')!r}")
    return meta


def load_model(weights_dir: str | os.PathLike, name: str, *, dtype=None) -> nnx.Module:
    """Load one network `name` ("ensemble", "refiner", "unet", ...) from a weights directory."""
    d = Path(weights_dir)
    meta = read_weights_meta(d)
    if name not in meta["models"]:
        raise WeightsError(f"{d}: no model {name!r} (has {sorted(meta['models'])})")
    spec = meta["models"][name]
    # Build the module abstractly (shapes only: no random initialisation, which takes tens of seconds for the
    # full ensemble on a CPU), then fill it with the restored arrays.
    graphdef, state = nnx.split(abstract_model(spec["class"], spec["config"], dtype=dtype))
    target = nnx.to_pure_dict(state)
    abstract = abstract_arrays(_stringify(target), dtype=jnp.float32)
    try:
        restored = ocp.StandardCheckpointer().restore((d / name).absolute(), abstract)
    except Exception as e:  # orbax raises several types for missing/damaged/mismatched trees
        raise WeightsError(f"{d / name}: cannot restore {spec['class']} parameters ({type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(state, _restore_keys(restored, target))
    return nnx.merge(graphdef, state)


def load_pretrained(weights_dir: str | os.PathLike, *, dtype=None) -> tuple[Ensemble, Refiner]:
    """Load the converted TMTV-Net pair: `ensemble, refiner = load_pretrained(DIR)`.

    `ensemble(x)` takes `(N, D, H, W, 5)` at 6 mm (D, H, W divisible by 16) and `refiner(x)` takes
    `(N, D, H, W, 6)` at native PET resolution; both return logits `(N, D, H, W, 2)`.
    """
    return load_model(weights_dir, "ensemble", dtype=dtype), load_model(weights_dir, "refiner", dtype=dtype)
