"""Parity of our Flax networks with a PyTorch reference through the real converter (issue 2, item 5).

Full-width networks (pretrained shapes) with random weights, including random InstanceNorm affine parameters,
are saved with `torch.save`, converted by `convert_weights` (the CLI for the ensemble + refiner pair), loaded with
`clips_jax.model.load_pretrained` / `load_model`, and run on small random inputs. Softmax probabilities must agree
within 1e-4 (JAX matmul precision "highest"). Also: the reference's state_dict keys/shapes equal the recorded
original ones (tmtv-net-state-dict.json) and parameter counts match on both sides. Skipped without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from torch_reference import TorchEnsemble, TorchRefiner, TorchUNet, n_params, randomize_norms  # noqa: E402

from clips_jax.model import load_model, read_weights_meta  # noqa: E402
from clips_jax.model.checkpoint import abstract_model, param_dict  # noqa: E402
from convert_weights import convert_files  # noqa: E402
from convert_weights.__main__ import main as cli_main  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tmtv-net-state-dict.json"
TOL = 1e-4
COUNTS = (21_594_530, 86_378_130, 361_796)  # of the original PyTorch classes: U-Net, ensemble, refiner


def _spec() -> dict:
    """The recorded original state_dict shapes (tmtv-net-state-dict.json): $TMTV_STATE_DICT_JSON, the shared
    reference folder next to the repository, or tests/data/; skip if none is present."""
    env = os.environ.get("TMTV_STATE_DICT_JSON")
    for cand in ([Path(env)] if env else []) + [SPEC, Path(__file__).resolve().parent / "data" / SPEC.name]:
        if cand.is_file():
            return json.loads(cand.read_text())
    pytest.skip("tmtv-net-state-dict.json not available")


@pytest.fixture
def highest_precision():
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", old)


def _shapes(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _n_ours(class_name: str, config: dict) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(param_dict(abstract_model(class_name, config))))


def _load_fast(weights_dir: Path, name: str):
    """Same result as `clips_jax.model.load_model(weights_dir, name)` but without its eager random
    initialisation (46 s for the full ensemble on 2 CPU cores): build the model abstractly, restore the orbax
    tree, merge. The meta file and the checkpoint are the converter's real output. (load_model itself is
    exercised on the refiner here and on narrow networks in test_convert.py.)"""
    spec = read_weights_meta(weights_dir)["models"][name]
    model = abstract_model(spec["class"], spec["config"])
    target = param_dict(model)

    def strkeys(t):
        return {str(k): strkeys(v) for k, v in t.items()} if isinstance(t, dict) else t

    def back(t, like):
        return {k: back(t[str(k)], v) for k, v in like.items()} if isinstance(like, dict) else t

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), strkeys(target))
    restored = ocp.StandardCheckpointer().restore((weights_dir / name).absolute(), abstract)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, back(restored, target))
    nnx.update(model, state)
    return model


def _seeded(cls, seed, **kw):
    torch.manual_seed(seed)
    m = cls(**kw)
    randomize_norms(m, torch.Generator().manual_seed(seed + 1))
    return m.eval()


def _softmax_np(logits_ncdhw: torch.Tensor) -> np.ndarray:
    """torch logits (N, C, D, H, W) -> softmax probabilities, channels last (N, D, H, W, C)."""
    return np.moveaxis(torch.softmax(logits_ncdhw, dim=1).numpy(), 1, -1)


def _ours_softmax(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def test_reference_state_dicts_match_original_keys_and_counts():
    spec = _spec()
    unet, refiner = TorchUNet(), TorchRefiner()
    assert _shapes(unet) == spec["single_unet"]
    assert _shapes(refiner) == spec["refiner"]
    ens = TorchEnsemble()
    want = {f"base_models.{i}.{k}": v for i in range(4) for k, v in spec["single_unet"].items()}
    want.update(spec["ensemble_extra"])
    assert _shapes(ens) == want
    assert len(ens.state_dict()) == spec["state_dict_entries"]["ensemble"] == 266
    assert tuple(spec["param_counts"][k] for k in ("single_unet", "ensemble", "refiner")) == COUNTS


def test_parameter_counts_ours_and_reference():
    counts = COUNTS
    assert (n_params(TorchUNet()), n_params(TorchEnsemble()), n_params(TorchRefiner())) == counts
    assert (_n_ours("UNet", {}), _n_ours("Ensemble", {}), _n_ours("Refiner", {})) == counts


def test_unet_parity_all_deep_supervision_heads(tmp_path, highest_precision):
    ref = _seeded(TorchUNet, 0)
    f = tmp_path / "unet.model"
    torch.save(ref.state_dict(), f)
    convert_files({"unet": f}, tmp_path / "w")
    ours = _load_fast(tmp_path / "w", "unet")
    x = torch.rand(1, 5, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_heads = ref(x, deep_supervision=True)
    xj = jnp.asarray(np.moveaxis(x.numpy(), 1, -1))
    o_heads, o_default = nnx.jit(lambda m, v: (m(v, deep_supervision=True), m(v)))(ours, xj)
    assert len(o_heads) == len(t_heads) == 4
    for k, (t, o) in enumerate(zip(t_heads, o_heads)):
        assert o.shape == tuple(np.moveaxis(t.numpy(), 1, -1).shape), k
        err = np.abs(_ours_softmax(o) - _softmax_np(t)).max()
        assert err < TOL, f"head {k}: max abs prob diff {err}"
    # the default call is head 3
    np.testing.assert_allclose(np.asarray(o_default), np.asarray(o_heads[-1]), atol=1e-6)
    # logits themselves close too (guards against a mapping that only survives the softmax)
    np.testing.assert_allclose(np.asarray(o_heads[-1]), np.moveaxis(t_heads[-1].numpy(), 1, -1), atol=1e-3)


def test_ensemble_and_refiner_parity_via_cli(tmp_path, highest_precision):
    ens = _seeded(TorchEnsemble, 10)
    with torch.no_grad():  # make the stacking conv decisive (its code init gives constant 0.5)
        ens.staking_blocks.weight.copy_(
            torch.randn(ens.staking_blocks.weight.shape, generator=torch.Generator().manual_seed(11)) * 3
        )
    refiner = _seeded(TorchRefiner, 20)
    torch.save(ens.state_dict(), tmp_path / "e_latest.model")
    torch.save(refiner.state_dict(), tmp_path / "r_latest.model")
    out = tmp_path / "weights"
    rc = cli_main(
        [
            "convert_weights",
            "--ensemble",
            str(tmp_path / "e_latest.model"),
            "--refiner",
            str(tmp_path / "r_latest.model"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert set(read_weights_meta(out)["models"]) == {"ensemble", "refiner"}  # what load_pretrained reads
    o_ens, o_ref = _load_fast(out, "ensemble"), load_model(out, "refiner")

    x = torch.rand(1, 5, 32, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        t = ens(x)
        t_members = [torch.softmax(m(x), dim=1)[:, 1] for m in ens.base_models]
    xj = jnp.asarray(np.moveaxis(x.numpy(), 1, -1))
    members, o_logits = nnx.jit(lambda m, v: (m.member_probabilities(v), m(v)))(o_ens, xj)
    members = np.asarray(members)
    for i, tm in enumerate(t_members):
        assert np.abs(members[..., i] - tm.numpy()).max() < TOL, f"member {i}"
    p_t = _softmax_np(t)
    assert p_t[..., 1].std() > 1e-3  # a non-trivial output, so the comparison means something
    err = np.abs(_ours_softmax(o_logits) - p_t).max()
    assert err < TOL, f"ensemble: max abs prob diff {err}"

    xr = torch.rand(1, 6, 20, 20, 20, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        tr = refiner(xr)
    o_r = nnx.jit(lambda m, v: m(v))(o_ref, jnp.asarray(np.moveaxis(xr.numpy(), 1, -1)))
    err = np.abs(_ours_softmax(o_r) - _softmax_np(tr)).max()
    assert err < TOL, f"refiner: max abs prob diff {err}"
