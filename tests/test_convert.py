"""Tests of the weight converter (issue 2, items 4 and 6): safe torch-zip reading, key map, strict checks,
fp16/bf16, DataParallel prefix, single U-Net files, export back to torch, and every bad input.

Networks are narrow variants (a few channels) so the file runs in seconds; full-width parity is in
test_parity.py. Tests that need real `torch.save` files or `torch.load` skip without torch; the rest use our own
writer and run everywhere.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from clips_jax.errors import WeightsError
from clips_jax.model import load_model, load_pretrained, param_dict, read_weights_meta
from convert_weights import convert_files
from convert_weights.__main__ import main as cli_main
from convert_weights.export import export_weights
from convert_weights.keymap import (
    PRETRAINED_REFINER,
    PRETRAINED_UNET,
    convert_state_dict,
    expected_torch_shapes,
    to_torch_state_dict,
)
from convert_weights.torchzip import read_state_dict, write_state_dict

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "reference" / "tmtv-net-state-dict.json"
NARROW_UNET = dict(channels=(6, 8), init_channels=4, bottleneck_kernel=3)


def _torch():
    return pytest.importorskip("torch")


def _ref():
    _torch()
    import torch_reference

    return torch_reference


def _np_state_dict(module) -> "collections.OrderedDict[str, np.ndarray]":
    return collections.OrderedDict((k, v.detach().numpy().copy()) for k, v in module.state_dict().items())


def _random_sd(class_name: str, config: dict, seed: int = 0) -> "collections.OrderedDict[str, np.ndarray]":
    """A random state_dict with exactly the PyTorch names/shapes our model needs (no torch involved)."""
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        (k, rng.standard_normal(s).astype(np.float32)) for k, s in expected_torch_shapes(class_name, config).items()
    )


def _narrow_refiner_sd(seed=0):
    return _random_sd("Refiner", dict(PRETRAINED_REFINER, features=4, n_blocks=2, first_kernel=3), seed)


def _zip_with_pickle(path: Path, pkl: bytes, extra: dict | None = None) -> Path:
    """A torch-zip-shaped file whose data.pkl is `pkl` (for hostile/odd pickles)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        for k, v in (extra or {}).items():
            zf.writestr(f"archive/{k}", v)
    return path


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# ------------------------------------------------------------------------------------------------------------
# Key map
# ------------------------------------------------------------------------------------------------------------


def test_keymap_matches_recorded_original_state_dicts():
    if not SPEC.is_file():
        pytest.skip("tmtv-net-state-dict.json not available")
    spec = json.loads(SPEC.read_text())
    as_lists = lambda d: {k: list(v) for k, v in d.items()}  # noqa: E731
    assert as_lists(expected_torch_shapes("UNet", PRETRAINED_UNET)) == spec["single_unet"]
    assert as_lists(expected_torch_shapes("Refiner", PRETRAINED_REFINER)) == spec["refiner"]
    want = {f"base_models.{i}.{k}": v for i in range(4) for k, v in spec["single_unet"].items()}
    want.update(spec["ensemble_extra"])
    got = as_lists(expected_torch_shapes("Ensemble", {"n_members": 4, "unet_kwargs": PRETRAINED_UNET}))
    assert got == want and len(got) == 266


def test_conversion_transposes_and_stacks_independently_checked():
    cfg = {"n_members": 3, "unet_kwargs": dict(NARROW_UNET)}
    sd = _random_sd("Ensemble", cfg, seed=1)
    detected, params = convert_state_dict(sd, "Ensemble")  # config detected from the shapes
    assert detected["n_members"] == 3 and detected["unet_kwargs"]["channels"] == [6, 8]
    assert detected["unet_kwargs"]["init_channels"] == 4 and detected["unet_kwargs"]["bottleneck_kernel"] == 3
    # hand-picked entries against numpy transposes of the torch arrays
    w = sd["base_models.2.model.backbone.middle_block.ops.ops.0.ops.0.weight"]  # (O, I, kD, kH, kW)
    k = params["members"]["middle_block"]["conv"]["kernel"][2]  # (kD, kH, kW, I, O)
    for o, i, a, b, c in [(0, 1, 0, 1, 2), (7, 3, 2, 2, 0), (5, 0, 1, 0, 1)]:
        assert k[a, b, c, i, o] == w[o, i, a, b, c]
    np.testing.assert_array_equal(
        params["members"]["ups"][1]["up_conv"]["norm"]["scale"][1],
        sd["base_models.1.model.backbone.ups.1.ops.ops_deconv.ops.2.weight"],
    )
    np.testing.assert_array_equal(
        params["members"]["heads"][0]["bias"][0], sd["base_models.0.model.outputs.0.ops.0.ops.0.bias"]
    )
    np.testing.assert_array_equal(params["stacking"]["kernel"][0, 0, 0], sd["staking_blocks.weight"][:, :, 0, 0, 0].T)
    # the parameter tree has exactly our model's structure and shapes
    from clips_jax.model.checkpoint import abstract_model

    want = dict(_leaves(jax.tree.map(lambda a: a.shape, param_dict(abstract_model("Ensemble", detected)))))
    got = {p: a.shape for p, a in _leaves(params)}
    assert got == want
    # and the inverse map gives the file back exactly
    back = to_torch_state_dict("Ensemble", detected, params)
    assert list(back) == list(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])


# ------------------------------------------------------------------------------------------------------------
# Reading real torch files
# ------------------------------------------------------------------------------------------------------------


def test_read_real_torch_files_fp32_fp16_bf16_views(tmp_path):
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict(
        f32=torch.randn(2, 3, 1, 1, 1, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).bfloat16(),
        scalar=torch.tensor(2.5),
        view=base[1:, 2],
        transposed=base.t(),
        shared=base,
        empty=torch.zeros(0, 4),
    )
    torch.save(sd, tmp_path / "t.model")
    got = read_state_dict(tmp_path / "t.model")
    assert list(got) == list(sd)
    for k, t in sd.items():
        assert got[k].shape == tuple(t.shape), k
        np.testing.assert_array_equal(got[k].astype(np.float32), t.float().numpy(), err_msg=k)
    assert got["f16"].dtype == np.float16 and got["bf16"].dtype == np.float32


def test_big_endian_file_is_byte_swapped(tmp_path):
    sd = collections.OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, h=np.array([1.5, -2.0], np.float16)
    )
    write_state_dict(tmp_path / "le.model", sd)
    with zipfile.ZipFile(tmp_path / "le.model") as src, zipfile.ZipFile(tmp_path / "be.model", "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            if n.endswith("byteorder"):
                data = b"big"
            elif "/data/" in n:
                dt = "<f4" if n.endswith("/0") else "<f2"
                data = np.frombuffer(data, dt).astype(dt.replace("<", ">")).tobytes()
            dst.writestr(n, data)
    got = read_state_dict(tmp_path / "be.model")
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])


def test_narrow_unet_file_converts_and_matches_torch(tmp_path):
    torch, ref = _torch(), _ref()
    torch.manual_seed(3)
    net = ref.TorchUNet(**NARROW_UNET).eval()
    ref.randomize_norms(net, torch.Generator().manual_seed(4))
    torch.save(net.state_dict(), tmp_path / "unet.model")
    assert cli_main(["convert_weights", "--unet", str(tmp_path / "unet.model"), "--out", str(tmp_path / "w")]) == 0
    meta = read_weights_meta(tmp_path / "w")
    assert meta["models"]["unet"]["class"] == "UNet"
    assert meta["models"]["unet"]["config"]["channels"] == [6, 8]
    assert meta["source"]["unet"]["file"] == "unet.model" and len(meta["source"]["unet"]["sha256"]) == 64
    ours = load_model(tmp_path / "w", "unet")
    x = torch.rand(1, 5, 8, 12, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        t = net(x).numpy()
    o = np.asarray(nnx.jit(lambda m, v: m(v))(ours, np.moveaxis(x.numpy(), 1, -1)))
    np.testing.assert_allclose(o, np.moveaxis(t, 1, -1), atol=2e-4)


def test_fp16_bf16_and_module_prefix_files(tmp_path):
    torch, ref = _torch(), _ref()
    torch.manual_seed(6)
    net = ref.TorchRefiner(features=4, n_blocks=2, first_kernel=3)
    sd32 = net.state_dict()
    torch.save({k: v.half() for k, v in sd32.items()}, tmp_path / "h.model")
    torch.save({k: v.bfloat16() for k, v in sd32.items()}, tmp_path / "b.model")
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in sd32.items()), tmp_path / "dp.model")
    for name, cast in [("h", torch.float16), ("b", torch.bfloat16), ("dp", torch.float32)]:
        cfg, params = convert_state_dict(read_state_dict(tmp_path / f"{name}.model"), "Refiner")
        assert cfg["n_blocks"] == 2 and cfg["features"] == 4 and cfg["first_kernel"] == 3
        w = sd32["model.ops.2.block_2.ops.0.ops.0.weight"].to(cast).float().numpy()
        np.testing.assert_array_equal(params["blocks"][1]["block_2"]["conv"]["kernel"], w.transpose(2, 3, 4, 1, 0))
        np.testing.assert_array_equal(
            params["last"]["norm"]["scale"], sd32["model.ops.3.ops.1.weight"].to(cast).float().numpy()
        )
        assert all(a.dtype == np.float32 for _, a in _leaves(params))


def test_cli_pair_is_read_by_load_pretrained(tmp_path):
    ens = _random_sd("Ensemble", {"n_members": 2, "unet_kwargs": dict(NARROW_UNET)}, seed=7)
    refi = _narrow_refiner_sd(seed=8)
    write_state_dict(tmp_path / "e.model", ens)
    write_state_dict(tmp_path / "r.model", refi)
    assert (
        cli_main(
            [
                "convert_weights",
                "--ensemble",
                str(tmp_path / "e.model"),
                "--refiner",
                str(tmp_path / "r.model"),
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    e, r = load_pretrained(tmp_path / "w")
    assert e.n_members == 2 and r.config["n_blocks"] == 2
    np.testing.assert_array_equal(
        np.asarray(e.members.downs[1].conv.kernel[...][1]),
        ens["base_models.1.model.backbone.downs.1.ops.ops.0.ops.0.weight"].transpose(2, 3, 4, 1, 0),
    )
    np.testing.assert_array_equal(np.asarray(r.first.norm.bias[...]), refi["model.ops.0.ops.1.bias"])
    assert nnx.jit(lambda m, v: m(v))(e, np.zeros((1, 16, 16, 16, 5), np.float32)).shape == (1, 16, 16, 16, 2)


def test_export_roundtrip_without_torch(tmp_path):
    ens = _random_sd("Ensemble", {"n_members": 2, "unet_kwargs": dict(NARROW_UNET)}, seed=9)
    refi = _narrow_refiner_sd(seed=10)
    write_state_dict(tmp_path / "e.model", ens)
    write_state_dict(tmp_path / "r.model", refi)
    convert_files({"ensemble": tmp_path / "e.model", "refiner": tmp_path / "r.model"}, tmp_path / "w")
    files = export_weights(tmp_path / "w", tmp_path / "back")
    assert sorted(f.name for f in files) == ["e_latest.model", "r_latest.model"]
    for f, orig in [("e_latest.model", ens), ("r_latest.model", refi)]:
        got = read_state_dict(tmp_path / "back" / f)
        assert list(got) == list(orig)
        for k in orig:
            np.testing.assert_array_equal(got[k], orig[k])


def test_export_is_torch_loadable_and_strict_loads_into_reference(tmp_path):
    torch, ref = _torch(), _ref()
    torch.manual_seed(11)
    ens = ref.TorchEnsemble(n_members=2, **NARROW_UNET)
    refiner = ref.TorchRefiner()  # full width (cheap)
    ref.randomize_norms(refiner, torch.Generator().manual_seed(12))
    torch.save(ens.state_dict(), tmp_path / "e.model")
    torch.save(refiner.state_dict(), tmp_path / "r.model")
    convert_files({"ensemble": tmp_path / "e.model", "refiner": tmp_path / "r.model"}, tmp_path / "w")
    from convert_weights.export import main as export_main

    assert export_main(["export", "--weights", str(tmp_path / "w"), "--out_dir", str(tmp_path / "back")]) == 0
    for fname, orig, fresh in [
        ("e_latest.model", ens, ref.TorchEnsemble(n_members=2, **NARROW_UNET)),
        ("r_latest.model", refiner, ref.TorchRefiner()),
    ]:
        loaded = torch.load(tmp_path / "back" / fname, weights_only=True)
        assert isinstance(loaded, collections.OrderedDict)
        fresh.load_state_dict(loaded, strict=True)
        for k, v in orig.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------


def _cli_fails(tmp_path, capsys, *args) -> str:
    out = tmp_path / "out"
    rc = cli_main(["convert_weights", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no (partial) output directory
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "missing"])
def test_unreadable_files(tmp_path, capsys, kind):
    f = tmp_path / f"{kind}.model"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "text":
        f.write_text("<html>Google Drive: virus scan warning</html>")
    elif kind == "truncated":
        write_state_dict(tmp_path / "full.model", _narrow_refiner_sd())
        data = (tmp_path / "full.model").read_bytes()
        f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as ei:
        read_state_dict(f)
    assert str(f) in str(ei.value) and "\n" not in str(ei.value)
    assert str(f) in _cli_fails(tmp_path, capsys, "--refiner", str(f))


@pytest.mark.parametrize("target", ["os.system", "builtins.open", "eval"])
def test_hostile_pickle_is_refused_before_running(tmp_path, capsys, target):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            if target == "os.system":
                return os.system, (f"touch {marker}",)
            if target == "builtins.open":
                return open, (str(marker), "w")
            return eval, (f"open({str(marker)!r}, 'w')",)

    pkl = pickle.dumps(collections.OrderedDict(w=Payload()), protocol=2)
    f = _zip_with_pickle(tmp_path / "evil.model", pkl)
    with pytest.raises(WeightsError, match="refused to load") as ei:
        read_state_dict(f)
    assert str(f) in str(ei.value)
    assert not marker.exists()
    _cli_fails(tmp_path, capsys, "--unet", str(f))
    assert not marker.exists()
    # sanity check of the payload itself: the plain pickle module WOULD run it
    if target != "os.system":
        pickle.loads(pkl)
        assert marker.exists()


def test_odd_but_harmless_pickles_are_refused(tmp_path):
    cases = {
        "list": pickle.dumps([1, 2], protocol=2),
        "int_value": pickle.dumps(collections.OrderedDict(a=3), protocol=2),
        "float64": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nDoubleStorage"
        b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89)tR.",
        "not_storage_pid": b"\x80\x02(X\x03\x00\x00\x00abcK\x01tQ.",
        "bad_layout": b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
        b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x05\x85K\x01"
        b"\x85\x89)tRs.",
    }
    for name, pkl in cases.items():
        f = _zip_with_pickle(tmp_path / f"{name}.model", pkl, {"data/0": np.zeros(2, np.float32).tobytes()})
        with pytest.raises(WeightsError) as ei:
            read_state_dict(f)
        assert str(f) in str(ei.value), name


def test_missing_extra_and_misshaped_keys_all_listed(tmp_path, capsys):
    sd = _narrow_refiner_sd()
    del sd["model.ops.2.block_2.ops.1.bias"]
    del sd["model.ops.1.block_1.ops.0.ops.0.weight"]
    sd["model.extra.weight"] = np.zeros(3, np.float32)
    sd["model.ops.1.block_2.ops.1.weight"] = np.zeros(5, np.float32)
    f = write_state_dict(tmp_path / "bad.model", sd)
    with pytest.raises(WeightsError) as ei:
        convert_files({"refiner": f}, tmp_path / "w")
    msg = str(ei.value)
    assert "\n" not in msg and str(f) in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg
    for key in [
        "model.ops.2.block_2.ops.1.bias",
        "model.ops.1.block_1.ops.0.ops.0.weight",
        "model.extra.weight",
        "model.ops.1.block_2.ops.1.weight file (5,) vs model (4,)",
    ]:
        assert key in msg
    assert not (tmp_path / "w").exists()
    _cli_fails(tmp_path, capsys, "--refiner", str(f))


def test_wrong_network_and_existing_output(tmp_path, capsys):
    f = write_state_dict(tmp_path / "r.model", _narrow_refiner_sd())
    err = _cli_fails(tmp_path, capsys, "--ensemble", str(f))  # a refiner file given as the ensemble
    assert "missing" in err and "unexpected" in err
    (tmp_path / "taken").mkdir()
    assert cli_main(["convert_weights", "--refiner", str(f), "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "taken").iterdir()) == []


def test_help_explains_usage():
    r = subprocess.run(
        [sys.executable, "-m", "convert_weights", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    for word in ("--ensemble", "--refiner", "--unet", "--out", "e_latest.model", "load_pretrained"):
        assert word in r.stdout
