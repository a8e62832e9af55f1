"""The explicit key map between TMTV-Net's PyTorch state_dicts and our Flax NNX parameter trees.

Every parameter is one `Entry(torch_key, path, kind, member)`: `torch_key` is the PyTorch state_dict name,
`path` the key path in our pure parameter dict (`clips_jax.model.param_dict(model)`; `nnx.List` children are
int keys), `kind` says how the array is transformed, `member` is the ensemble member index (the member axis of
our stacked ensemble parameters) or None. The entries are GENERATED for a given depth / block count, so narrow
or fine-tuned variants convert as well as the pretrained networks (the mapping in words: docs/weights.md,
"5. Mapping").

Transforms (`to_ours` / `to_torch`):
  "conv":   Conv3d weight (O, I, kD, kH, kW) <-> Flax kernel (kD, kH, kW, I, O)   (transpose (2,3,4,1,0))
  "vector": conv bias, InstanceNorm weight (-> scale) and bias: unchanged

`detect_*_config` read a network's constructor config from the tensor shapes of a state_dict (missing keys fall
back to the pretrained values, so the strict check later names them). `convert_state_dict` performs the strict
key/shape check against our model and builds the parameter dict; `to_torch_state_dict` is its inverse.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import jax
import numpy as np

from clips_jax.errors import WeightsError

PRETRAINED_UNET = dict(
    in_channels=5, out_channels=2, channels=[64, 96, 128, 156], init_channels=32, bottleneck_kernel=9
)
PRETRAINED_REFINER = dict(in_channels=6, out_channels=2, features=32, n_blocks=4, first_kernel=9)
PRETRAINED_MEMBERS = 4


@dataclass(frozen=True)
class Entry:
    """One parameter: PyTorch name, path in our pure param dict, transform kind, ensemble member (or None)."""

    torch_key: str
    path: tuple
    kind: str
    member: int | None = None


def to_ours(kind: str, a: np.ndarray) -> np.ndarray:
    """PyTorch array -> our layout (float32)."""
    a = np.asarray(a, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 3, 4, 1, 0)) if kind == "conv" else a


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    """Our array -> PyTorch layout (float32)."""
    a = np.asarray(a, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(4, 3, 0, 1, 2)) if kind == "conv" else a


def torch_shape(kind: str, our_shape: tuple) -> tuple:
    """The PyTorch shape that maps to `our_shape` (without any member axis)."""
    s = tuple(our_shape)
    return (s[4], s[3], s[0], s[1], s[2]) if kind == "conv" and len(s) == 5 else s


def _conv(torch_prefix: str, path: tuple, bias: bool = True) -> list[Entry]:
    out = [Entry(torch_prefix + "weight", path + ("kernel",), "conv")]
    if bias:
        out.append(Entry(torch_prefix + "bias", path + ("bias",), "vector"))
    return out


def _norm(torch_prefix: str, path: tuple) -> list[Entry]:
    return [
        Entry(torch_prefix + "weight", path + ("scale",), "vector"),
        Entry(torch_prefix + "bias", path + ("bias",), "vector"),
    ]


def _cna(conv_prefix: str, norm_prefix: str, path: tuple, bias: bool = True) -> list[Entry]:
    return _conv(conv_prefix, path + ("conv",), bias) + _norm(norm_prefix, path + ("norm",))


def unet_entries(levels: int, prefix: str = "model.") -> list[Entry]:
    """Entries of one U-Net with `levels` stride-2 levels, in PyTorch module order (4 levels: 66 entries)."""
    b = prefix + "backbone."
    e = _cna(f"{b}init_block.ops.0.ops.0.", f"{b}init_block.ops.1.", ("init_block",))
    for n in range(levels):
        e += _cna(f"{b}downs.{n}.ops.ops.0.ops.0.", f"{b}downs.{n}.ops.ops.1.", ("downs", n))
    e += _cna(f"{b}middle_block.ops.ops.0.ops.0.", f"{b}middle_block.ops.ops.1.", ("middle_block",))
    for n in range(levels):
        u = f"{b}ups.{n}.ops."
        e += _cna(f"{u}ops_deconv.ops.1.", f"{u}ops_deconv.ops.2.", ("ups", n, "up_conv"))
        e += _cna(f"{u}ops_conv.ops.0.ops.0.", f"{u}ops_conv.ops.1.", ("ups", n, "conv"))
    e += _conv(f"{b}output.ops.0.ops.0.", ("output",))
    for k in range(levels):
        e += _conv(f"{prefix}outputs.{k}.ops.0.ops.0.", ("heads", k))
    return e


def ensemble_entries(n_members: int, levels: int) -> list[Entry]:
    """Entries of the stacked ensemble: `base_models.{i}.<U-Net key>` -> ('members', ...) at member i, then
    `staking_blocks` (sic) -> 'stacking'."""
    e = []
    for i in range(n_members):
        e += [Entry(f"base_models.{i}.{x.torch_key}", ("members",) + x.path, x.kind, i) for x in unet_entries(levels)]
    return e + _conv("staking_blocks.", ("stacking",))


def refiner_entries(n_blocks: int) -> list[Entry]:
    """Entries of the refiner with `n_blocks` residual blocks (4: 30 entries); all convs are bias-free."""
    e = _cna("model.ops.0.ops.0.ops.0.", "model.ops.0.ops.1.", ("first",), bias=False)
    for i in range(n_blocks):
        for blk in ("block_1", "block_2"):
            t = f"model.ops.{i + 1}.{blk}.ops."
            e += _cna(t + "0.ops.0.", t + "1.", ("blocks", i, blk), bias=False)
    last = f"model.ops.{n_blocks + 1}.ops."
    return e + _cna(last + "0.ops.0.", last + "1.", ("last",), bias=False)


def entries_for(class_name: str, config: Mapping) -> list[Entry]:
    """Entries for a model class ("UNet", "Ensemble", "Refiner") and its constructor config."""
    if class_name == "UNet":
        return unet_entries(len(config.get("channels", PRETRAINED_UNET["channels"])))
    if class_name == "Ensemble":
        uk = config.get("unet_kwargs") or {}
        return ensemble_entries(
            config.get("n_members", PRETRAINED_MEMBERS), len(uk.get("channels", PRETRAINED_UNET["channels"]))
        )
    if class_name == "Refiner":
        return refiner_entries(config.get("n_blocks", PRETRAINED_REFINER["n_blocks"]))
    raise WeightsError(f"no key map for model class {class_name!r}")


# ------------------------------------------------------------------------------------------------------------
# Config detection from shapes
# ------------------------------------------------------------------------------------------------------------


def strip_module_prefix(sd: Mapping[str, np.ndarray]) -> "collections.OrderedDict[str, np.ndarray]":
    """Drop a DataParallel `module.` prefix if EVERY key has it; otherwise return the keys unchanged."""
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return collections.OrderedDict((k[len("module.") :], v) for k, v in sd.items())
    return collections.OrderedDict(sd)


def _shape(sd: Mapping, key: str) -> tuple | None:
    v = sd.get(key)
    return tuple(v.shape) if v is not None else None


def _count_indexed(sd: Mapping, prefix: str) -> int:
    """1 + the largest n such that some key starts with `prefix{n}.` (0 if none)."""
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _width(sd: Mapping, *keys: str) -> int | None:
    """Output channels from the first present key: dim 0 of a conv weight, or the length of a 1-D vector."""
    for k in keys:
        s = _shape(sd, k)
        if s:
            return int(s[0])
    return None


def detect_unet_config(sd: Mapping[str, np.ndarray], prefix: str = "model.") -> dict:
    """UNet constructor config from the shapes of a single-U-Net state_dict (keys under `prefix`).

    Reads in/init channels from the init conv, one width per `downs.{n}` level (depth = highest `downs.n`
    present + 1; width from its conv weight, conv bias or norm vectors, whichever is present), the bottleneck
    kernel size, and the head output channels. Anything absent keeps its pretrained value (the strict check
    then reports the missing keys).
    """
    cfg = dict(PRETRAINED_UNET)
    b = prefix + "backbone."
    s = _shape(sd, f"{b}init_block.ops.0.ops.0.weight")
    if s and len(s) == 5:
        cfg["init_channels"], cfg["in_channels"] = s[0], s[1]
    n_levels = _count_indexed(sd, f"{b}downs.")
    if n_levels:
        chans = []
        for n in range(n_levels):
            d = f"{b}downs.{n}.ops.ops."
            w = _width(sd, d + "0.ops.0.weight", d + "0.ops.0.bias", d + "1.weight", d + "1.bias")
            if w is None:  # this level has no keys at all: guess, the strict check names its keys as missing
                w = PRETRAINED_UNET["channels"][n] if n < len(PRETRAINED_UNET["channels"]) else chans[-1]
            chans.append(w)
        cfg["channels"] = chans
    s = _shape(sd, f"{b}middle_block.ops.ops.0.ops.0.weight")
    if s and len(s) == 5:
        cfg["bottleneck_kernel"] = s[2]
    s = _shape(sd, f"{prefix}outputs.{len(cfg['channels']) - 1}.ops.0.ops.0.weight")
    if s and len(s) == 5:
        cfg["out_channels"] = s[0]
    return {k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in cfg.items()}


def detect_ensemble_config(sd: Mapping[str, np.ndarray]) -> dict:
    """Ensemble config: number of members (consecutive `base_models.{i}` prefixes; else the stacking conv's
    input channels; else 4) and the U-Net config of member 0."""
    n = 0
    while any(k.startswith(f"base_models.{n}.") for k in sd):
        n += 1
    if n == 0:
        s = _shape(sd, "staking_blocks.weight")
        n = s[1] if s and len(s) == 5 else PRETRAINED_MEMBERS
    return dict(n_members=int(n), unet_kwargs=detect_unet_config(sd, "base_models.0.model."))


def detect_refiner_config(sd: Mapping[str, np.ndarray]) -> dict:
    """Refiner config from shapes: features / in channels / kernel of the first conv, number of residual blocks
    (highest i with a `model.ops.{i}.block_*` key), out channels of the last conv."""
    cfg = dict(PRETRAINED_REFINER)
    s = _shape(sd, "model.ops.0.ops.0.ops.0.weight")
    if s and len(s) == 5:
        cfg["features"], cfg["in_channels"], cfg["first_kernel"] = s[0], s[1], s[2]
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"model\.ops\.(\d+)\.block_", k))]
    if blocks:
        cfg["n_blocks"] = max(blocks)
    elif any(k.startswith("model.ops.") for k in sd):
        cfg["n_blocks"] = 0
    s = _shape(sd, f"model.ops.{cfg['n_blocks'] + 1}.ops.0.ops.0.weight")
    if s and len(s) == 5:
        cfg["out_channels"] = s[0]
    return {k: int(v) for k, v in cfg.items()}


def detect_config(class_name: str, sd: Mapping[str, np.ndarray]) -> dict:
    """Constructor config of `class_name` detected from a (prefix-stripped) state_dict."""
    if class_name == "UNet":
        return detect_unet_config(sd)
    if class_name == "Ensemble":
        return detect_ensemble_config(sd)
    if class_name == "Refiner":
        return detect_refiner_config(sd)
    raise WeightsError(f"no key map for model class {class_name!r}")


# ------------------------------------------------------------------------------------------------------------
# Conversion with a strict check
# ------------------------------------------------------------------------------------------------------------


def _leaves(tree: Mapping, prefix: tuple = ()) -> Iterable[tuple[tuple, object]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree: Mapping, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def model_shapes(class_name: str, config: Mapping) -> dict:
    """Our parameter tree for (class_name, config) as a nested dict of shape tuples (no allocation)."""
    from clips_jax.model.checkpoint import abstract_model, param_dict

    try:
        model = abstract_model(class_name, config)
    except WeightsError:
        raise
    except Exception as e:  # a detected config the constructor cannot take (e.g. zero levels)
        raise WeightsError(
            f"cannot build {class_name} with config {dict(config)} read from the file ({type(e).__name__}: {e})"
        ) from e
    return jax.tree.map(lambda a: tuple(a.shape), param_dict(model))


def expected_torch_shapes(class_name: str, config: Mapping) -> "collections.OrderedDict[str, tuple]":
    """PyTorch name -> PyTorch shape that our model (class_name, config) requires, in module order."""
    shapes = model_shapes(class_name, config)
    entries = entries_for(class_name, config)
    covered = {e.path for e in entries}
    ours = {p for p, _ in _leaves(shapes)}
    if covered != ours:  # the key map and the model disagree: a programming error, not a user error
        raise AssertionError(
            f"key map out of sync with {class_name}: unmapped {sorted(map(str, ours - covered))},"
            f" unknown {sorted(map(str, covered - ours))}"
        )
    out = collections.OrderedDict()
    for e in entries:
        s = _get(shapes, e.path)
        out[e.torch_key] = torch_shape(e.kind, s[1:] if e.member is not None else s)
    return out


def check_state_dict(sd: Mapping[str, np.ndarray], class_name: str, config: Mapping, source: str) -> None:
    """Raise one WeightsError listing EVERY missing, unexpected and mis-shaped key, or return None."""
    want = expected_torch_shapes(class_name, config)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    misshaped = [
        f"{k} file {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {'; '.join(misshaped)}")
        raise WeightsError(
            f"{source}: does not match {class_name} {_summary(class_name, config)} — "
            + " | ".join(parts)
            + " (is it the right file for this network?)"
        )


def _summary(class_name: str, config: Mapping) -> str:
    if class_name == "Ensemble":
        uk = config.get("unet_kwargs") or {}
        return f"(members={config.get('n_members')}, channels={uk.get('channels')})"
    if class_name == "UNet":
        return f"(channels={config.get('channels')}, init={config.get('init_channels')})"
    return f"(features={config.get('features')}, blocks={config.get('n_blocks')})"


def convert_state_dict(
    sd: Mapping[str, np.ndarray], class_name: str, config: Mapping | None = None, *, source: str = "state_dict"
) -> tuple[dict, dict]:
    """Convert a PyTorch state_dict (numpy arrays, PyTorch layout) to our pure parameter dict.

    Args:
      sd: name -> array (fp32/fp16; a `module.` prefix is stripped).
      class_name: "UNet", "Ensemble" or "Refiner".
      config: constructor config; None = detect it from the shapes.
      source: file name used in error messages.

    Returns:
      (config, params): params is the nested dict `param_dict(model)` would give (float32 numpy arrays; the
      ensemble members stacked along a leading axis).

    Raises:
      WeightsError listing every missing / unexpected / mis-shaped key.
    """
    sd = strip_module_prefix(sd)
    config = dict(config) if config is not None else detect_config(class_name, sd)
    check_state_dict(sd, class_name, config, source)
    params: dict = {}
    stacked: dict[tuple, dict[int, np.ndarray]] = collections.defaultdict(dict)
    for e in entries_for(class_name, config):
        a = to_ours(e.kind, sd[e.torch_key])
        if e.member is None:
            _set(params, e.path, a)
        else:
            stacked[e.path][e.member] = a
    for path, per_member in stacked.items():
        _set(params, path, np.stack([per_member[i] for i in sorted(per_member)]))
    return config, params


def to_torch_state_dict(class_name: str, config: Mapping, params: Mapping) -> "collections.OrderedDict":
    """Inverse of `convert_state_dict`: our pure param dict -> PyTorch state_dict (float32 numpy arrays,
    PyTorch names/layout, module order) that `load_state_dict(strict=True)` accepts in the original network."""
    out = collections.OrderedDict()
    for e in entries_for(class_name, config):
        a = np.asarray(_get(params, e.path))
        out[e.torch_key] = to_torch(e.kind, a[e.member] if e.member is not None else a)
    return out
