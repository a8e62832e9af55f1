"""Per-patient reliability measures, score and checks (`clips_jax.metrics.reliability`) and calibration
(`clips_jax.metrics.calibration`): hand-checkable cases."""

import math
from pathlib import Path

import numpy as np
import pytest

from clips_jax.metrics import calibration as cal
from clips_jax.metrics import reliability as rel

SP = (6.0, 6.0, 6.0)  # 0.216 ml voxels


def box(shape, sl):
    m = np.zeros(shape, bool)
    m[sl] = True
    return m


def test_pairwise_dice_identical_disjoint_and_empty():
    a = box((8, 8, 8), np.s_[1:3, 1:3, 1:3])
    b = box((8, 8, 8), np.s_[5:7, 5:7, 5:7])
    empty = np.zeros((8, 8, 8), bool)
    assert rel.pairwise_dice(np.stack([a, a, a])).tolist() == [1.0, 1.0, 1.0]
    assert rel.pairwise_dice(np.stack([a, b])).tolist() == [0.0]
    assert rel.pairwise_dice(np.stack([empty, empty])).tolist() == [1.0]  # agreement on "no lesion"
    assert rel.pairwise_dice(np.stack([empty, empty]), 0.216, 0.5).tolist() == [1.0]
    # half overlap: |A and B| = 4, |A| = |B| = 8 -> 0.5; with smoothing s = 0.5 ml, v = 1 ml: (8 + 0.5) / 16.5
    c = box((8, 8, 8), np.s_[2:4, 1:3, 1:3])
    assert rel.pairwise_dice(np.stack([a, c])).tolist() == [0.5]
    assert rel.pairwise_dice(np.stack([a, c]), 1.0, 0.5)[0] == pytest.approx(8.5 / 16.5)
    # pair order (0, 1), (0, 2), (1, 2)
    assert rel.pairwise_dice(np.stack([a, a, b])).tolist() == [1.0, 0.0, 0.0]


def test_cv_disagreement_entropy():
    assert rel.coefficient_of_variation([0, 0, 0]) == 0.0
    assert rel.coefficient_of_variation([1, 3]) == pytest.approx(0.5)  # s.d. 1, mean 2
    a = box((6, 6, 6), np.s_[0:2, 0:2, 0:2])  # 8 voxels
    c = box((6, 6, 6), np.s_[1:3, 0:2, 0:2])  # overlap 4, union 12
    assert rel.disagreement_fraction(np.stack([a, c])) == pytest.approx(8 / 12)
    assert rel.disagreement_fraction(np.zeros((2, 6, 6, 6), bool)) == 0.0
    h = rel.binary_entropy_bits(np.array([0.0, 0.5, 1.0, 0.25]))
    assert h.dtype == np.float32
    assert h.tolist()[:3] == [0.0, 1.0, 0.0] and h[3] == pytest.approx(0.811278, abs=1e-6)


def test_lesion_region_is_a_ball_in_mm():
    c = box((9, 9, 9), np.s_[4, 4, 4])
    r = rel.lesion_region(c, (6.0, 6.0, 6.0), 6.0)
    assert r.sum() == 7  # the voxel and its 6 face neighbours
    r = rel.lesion_region(c, (2.0, 6.0, 6.0), 6.0)
    assert r[:, 4, 4].sum() == 7 and r.sum() == 7 + 4  # +-3 voxels along z (2 mm), +-1 in y and x
    assert not rel.lesion_region(np.zeros((4, 4, 4), bool), SP).any()


def test_mask_fraction_on_grid_counts_fine_voxels_per_coarse_voxel():
    m = np.zeros((12, 12, 12), bool)
    m[2:5, 2:5, 2:5] = True  # exactly coarse voxel (1, 1, 1) with a factor of 3 (fine i -> round(i / 3))
    f = rel.mask_fraction_on_grid(m, (2.0, 2.0, 2.0), (6.0, 6.0, 6.0), (4, 4, 4))
    assert f.dtype == np.float32 and f.shape == (4, 4, 4)
    assert f[1, 1, 1] == 1.0 and f.sum() == 1.0
    m2 = np.zeros((12, 12, 12), bool)
    m2[2, 2:5, 2:5] = True  # one of the three z-planes of that coarse voxel
    f2 = rel.mask_fraction_on_grid(m2, (2.0, 2.0, 2.0), (6.0, 6.0, 6.0), (4, 4, 4))
    assert f2[1, 1, 1] == pytest.approx(1 / 3) and f2.sum() == pytest.approx(1 / 3)


def test_identical_confident_members_are_perfectly_reliable():
    lesion = box((10, 10, 10), np.s_[3:6, 3:6, 3:6])
    p = lesion.astype(np.float32)
    members = np.stack([p] * 4)
    out = rel.assess(p, lesion, SP, members)
    assert out["member_dice_mean"] == 1.0 and out["member_dice_min"] == 1.0
    assert out["member_disagreement"] == 0.0 and out["member_tmtv_cv"] == 0.0 and out["member_sd_mean"] == 0.0
    assert out["expected_dice"] == 1.0 and out["entropy_mean_bits"] == 0.0 and out["uncertain_ml"] == 0.0
    assert out["score"] == 1.0 and out["review"] is False and out["reasons"] == []
    assert out["tmtv_ml"] == pytest.approx(27 * 0.216) and out["member_tmtv_ml"] == [pytest.approx(27 * 0.216)] * 4
    assert out["components"] == {"members": 1.0, "voxels": 1.0}
    assert any("flip" in n for n in out["notes"])


def test_lesion_free_agreement_is_reliable():
    z = np.zeros((8, 8, 8), np.float32)
    out = rel.assess(z, z > 0, SP, np.stack([z, z]))
    assert out["member_dice_mean"] == 1.0 and out["expected_dice"] == 1.0 and out["score"] == 1.0
    assert out["region_ml"] == 0.0 and out["tmtv_ml"] == 0.0 and not out["review"]


def test_disjoint_members_give_a_low_score_and_a_reason_in_words():
    a = box((12, 12, 12), np.s_[1:5, 1:5, 1:5]).astype(np.float32)  # 64 voxels = 13.8 ml each
    b = box((12, 12, 12), np.s_[7:11, 7:11, 7:11]).astype(np.float32)
    members = np.stack([a, b])
    prob = members.mean(axis=0)  # 0.5 on both boxes: nothing > 0.5
    out = rel.assess(prob, prob > 0.5, SP, members)
    assert out["member_dice_mean"] == pytest.approx(0.5 / (2 * 64 * 0.216 + 0.5))  # smoothed 0
    assert out["member_disagreement"] == 1.0
    assert out["uncertain_ml"] == pytest.approx(128 * 0.216)
    assert out["entropy_mean_bits"] == pytest.approx(128 * 0.216 / out["region_ml"])  # H = 1 on the boxes, 0 around
    assert out["score"] < 0.1 and out["review"] is True
    assert out["reasons"][0].startswith("the 2 ensemble members disagree on 100 % of the lesion volume")
    assert any("no lesion in the mask" in r for r in out["reasons"])
    assert rel.assess(prob, prob > 0.5, SP, members, threshold=0.0)["review"] is False


def test_single_network_uses_voxel_probabilities_only():
    p = np.zeros((8, 8, 8), np.float32)
    p[2:6, 2:6, 2:6] = 0.6
    out = rel.assess(p, p > 0.5, SP)
    assert out["member_dice_mean"] is None and out["member_tmtv_cv"] is None and out["members"] == 0
    assert out["score"] == pytest.approx(out["expected_dice"])
    # sum p f = 0.6 * 64 v, sum p = 0.6 * 64 v, sum f = 64 v (v = 0.216 ml)
    v = 0.216
    assert out["expected_dice"] == pytest.approx((2 * 0.6 * 64 * v + 0.5) / (1.6 * 64 * v + 0.5))
    assert any("single network" in n for n in out["notes"])
    tta = np.stack([p, np.roll(p, 2, axis=0)])
    out = rel.assess(p, p > 0.5, SP, tta=tta)
    assert out["tta_passes"] == 2 and out["tta_dice_mean"] < 1.0
    assert out["score"] == pytest.approx(math.sqrt(out["tta_dice_mean"] * out["expected_dice"]))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="members shape"):
        rel.measures(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), SP, np.zeros((2, 4, 4, 5)))


def test_auroc_delong_youden_tertile_spearman():
    label = np.array([True, True, False, False, False])
    assert rel.auroc([0.9, 0.8, 0.1, 0.2, 0.3], label) == 1.0
    assert rel.auroc([0.1, 0.2, 0.9, 0.8, 0.7], label) == 0.0
    assert rel.auroc([0.5] * 5, label) == 0.5
    assert rel.auroc([0.9, 0.2, 0.1, 0.5, 0.3], label) == pytest.approx(4 / 6)  # 0.9 beats 3, 0.2 beats 1
    assert math.isnan(rel.auroc([1, 2], [True, True]))
    d = rel.delong_interval([0.9, 0.2, 0.1, 0.5, 0.3], label)
    assert d["auroc"] == pytest.approx(4 / 6) and d["ci_low"] < d["auroc"] < d["ci_high"] <= 1.0
    assert d["n_pos"] == 2 and d["n_neg"] == 3
    # DeLong's variance by hand: V10 = (1, 1/3), V01 = (1/2, 1, 1/2) (psi averaged per negative)
    se = math.sqrt(np.var([1, 1 / 3], ddof=1) / 2 + np.var([0.5, 1, 0.5], ddof=1) / 3)
    assert d["se"] == pytest.approx(se)
    assert rel.worst_tertile([0.9, np.nan, 0.1, 0.5, 0.3, 0.8]).tolist() == [False, False, True, False, True, False]
    y = rel.youden_threshold([0.2, 0.3, 0.8, 0.9, 0.7], [True, True, False, False, False])
    assert y["threshold"] == pytest.approx(0.5) and y["j"] == 1.0  # midpoint between 0.3 and 0.7
    s = rel.spearman([1, 2, 3, np.nan], [10, 20, 30, 0])
    assert s["rho"] == pytest.approx(1.0) and s["n"] == 3


def test_calibration_bins_ece_and_temperature():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    t = np.array([0, 0, 1, 1, 1, 0])
    b = cal.calibration_bins(p, t, n_bins=10)
    assert b["count"].tolist() == [2, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert b["positives"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    # |0 - 0.1| + |1 - 1.1| + |2 - 1.9| over 6 voxels
    assert cal.expected_calibration_error(b) == pytest.approx(0.3 / 6)
    both = cal.add_bins(cal.add_bins(None, b), b)
    assert both["count"].sum() == 12 and cal.expected_calibration_error(both) == pytest.approx(0.05)
    assert math.isnan(cal.expected_calibration_error(cal.calibration_bins(p, t, where=np.zeros(6, bool))))
    assert cal.calibration_bins(np.array([1.0]), np.array([1]))["count"][-1] == 1  # p = 1 in the last bin
    # temperature: the mask never changes, T = 1 is the identity
    q = cal.apply_temperature(np.array([0.1, 0.5, 0.9]), 2.0)
    assert q[1] == pytest.approx(0.5) and 0.1 < q[0] < 0.5 < q[2] < 0.9
    assert cal.apply_temperature(p, 1.0).tolist() == p.astype(np.float32).tolist()


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 2, 200_000)
    truth = rng.random(logit.size) < 1 / (1 + np.exp(-logit))  # calibrated at T = 1
    over = 1 / (1 + np.exp(-3.0 * logit))  # three times too confident
    t = cal.fit_temperature(cal.logit_histogram(over, truth))
    assert t == pytest.approx(3.0, rel=0.05)
    fixed = cal.apply_temperature(over, t)
    before = cal.expected_calibration_error(cal.calibration_bins(over, truth))
    after = cal.expected_calibration_error(cal.calibration_bins(fixed, truth))
    assert after < 0.01 < before
    assert cal.fit_temperature(cal.logit_histogram(over, np.zeros(over.size, bool))) == 1.0


def test_lesion_neighbourhood():
    p = np.zeros((9, 9, 9), np.float32)
    p[2, 2, 2] = 0.9
    t = np.zeros((9, 9, 9), bool)
    t[6, 6, 6] = True
    n = cal.lesion_neighbourhood(p, t, SP)
    assert n.sum() == 14 and n[2, 2, 2] and n[6, 6, 6]


# ---------------------------------------------------------------------------------------------------------
# Members in one pass: grouped softmax, per-pass callback, mean ensembles
# ---------------------------------------------------------------------------------------------------------


def _two_pairs(x):
    """4 logits: pair 0 = (0, x0), pair 1 = (0, -2 x0): two independent 2-class softmaxes."""
    import jax.numpy as jnp

    a = x[..., :1]
    return jnp.concatenate([jnp.zeros_like(a), a, jnp.zeros_like(a), -2.0 * a], axis=-1)


@pytest.mark.parametrize("on_device", [False, True])
def test_softmax_groups_give_each_pair_its_own_probabilities(on_device):
    from clips_jax.errors import ConfigError
    from clips_jax.inference import tiled_inference

    vol = np.random.default_rng(0).normal(size=(12, 10, 9, 1)).astype(np.float32)
    kw = dict(tile_shape=(8, 8, 8), step=(4, 4, 4), blend="constant", cover_end=True, tiles_on_device=on_device)
    out = tiled_inference(vol, _two_pairs, softmax_groups=2, **kw)
    sig = 1.0 / (1.0 + np.exp(-vol[..., 0].astype(np.float64)))
    np.testing.assert_allclose(out[..., 1], sig, atol=1e-6)
    np.testing.assert_allclose(out[..., 3], 1.0 / (1.0 + np.exp(2.0 * vol[..., 0])), atol=1e-6)
    np.testing.assert_allclose(out[..., 0] + out[..., 1], 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="softmax_groups"):
        tiled_inference(vol, _two_pairs, softmax_groups=3, **kw)


def test_on_pass_sees_every_flip_and_their_mean_is_the_tta_result():
    from clips_jax.inference import tiled_inference

    def skew(x):  # not flip-equivariant: the passes differ
        import jax.numpy as jnp

        ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None, None]
        return jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :1] + 0.3 * ramp], axis=-1)

    vol = np.random.default_rng(1).normal(size=(8, 8, 8, 1)).astype(np.float32)
    seen = []
    kw = dict(tile_shape=(8, 8, 8), step=(4, 4, 4), blend="constant", cover_end=True)
    out = tiled_inference(vol, skew, tta=True, on_pass=lambda f, p: seen.append((f, p[..., 1].copy())), **kw)
    assert len(seen) == 8 and len({f for f, _ in seen}) == 8
    np.testing.assert_allclose(np.mean([p for _, p in seen], axis=0), out[..., 1], atol=1e-6)
    assert np.abs(seen[0][1] - seen[-1][1]).max() > 0.1
    once = []
    tiled_inference(vol, skew, on_pass=lambda f, p: once.append(f), **kw)
    assert once == [(False, False, False)]


def _tiny_unets(n):
    from flax import nnx

    from clips_jax.model import UNet

    return [UNet(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3, rngs=nnx.Rngs(i)) for i in range(n)]


def test_mean_ensemble_from_members_and_logits_with_members(tmp_path):
    import jax

    from clips_jax.errors import ConfigError
    from clips_jax.inference import nnx_predictor, tiled_inference
    from clips_jax.model import Ensemble, load_model, save_weights

    unets = _tiny_unets(3)
    ens = Ensemble.from_members(unets)
    assert ens.combine == "mean" and ens.config["combine"] == "mean" and not hasattr(ens, "stacking")
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 5))
    members = np.stack([np.asarray(jax.nn.softmax(u(x), -1)[..., 1]) for u in unets])
    # float32: the ensemble's one pass may round differently from the members' own passes (1.04e-6 seen on an
    # Intel Xeon CI VM against atol 1e-6); a wrong member or combination differs by far more than 1e-5.
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(ens(x), -1)[..., 1]), members.mean(0), atol=1e-5)
    both = np.asarray(ens.logits_with_members(x))
    assert both.shape == (1, 16, 16, 16, 8)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(both[..., 4:6], -1)[..., 1]), members[1], atol=1e-5)
    # saved and loaded, then tiled: channels 1 = ensemble, 3 + 2i = member i (one network pass)
    save_weights(tmp_path / "w", {"ensemble": ens})
    loaded = load_model(tmp_path / "w", "ensemble")
    assert loaded.combine == "mean"
    vol = np.asarray(x[0])
    pred, state = nnx_predictor(loaded, "logits_with_members")
    out = tiled_inference(vol, pred, params=state, tile_shape=(16, 16, 16), step=(8, 8, 8), softmax_groups=4)
    plain = tiled_inference(vol, *nnx_predictor(loaded)[:1], params=nnx_predictor(loaded)[1], tile_shape=(16,) * 3)
    np.testing.assert_allclose(out[..., :2], plain, atol=1e-5)
    np.testing.assert_allclose(out[..., 3::2].mean(-1), out[..., 1], atol=1e-5)
    with pytest.raises(ConfigError):
        Ensemble.from_members(unets[:1])
    with pytest.raises(ConfigError, match="no method"):
        nnx_predictor(loaded, "nothing")


# ---------------------------------------------------------------------------------------------------------
# clips-evaluate reads predict's reliability record and probability maps
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_adds_score_columns_auroc_and_calibration(tmp_path):
    import csv
    import json

    from clips_jax.data.geometry import Geometry
    from clips_jax.data.nifti import save_nifti
    from clips_jax.evaluate import main

    geom = Geometry.from_spacing((10, 12, 12), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for k in range(6):  # case k: prediction shifted by k voxels -> Dice falls with k; score falls with k too
        t = box(geom.shape, np.s_[3:7, 3:8, 3:8])
        p = np.roll(t, k, axis=2)
        save_nifti(truth_dir / f"c{k}_SEG.nii.gz", t, geom, dtype=np.uint8)
        save_nifti(pred_dir / f"c{k}_SEG.nii.gz", p, geom, dtype=np.uint8)
        prob = np.clip(p * 0.8 + rng.random(geom.shape) * 0.1, 0, 1).astype(np.float32)
        if k != 5:  # one case without a probability map, one without a report
            save_nifti(pred_dir / f"c{k}_PROB.nii.gz", prob, geom, dtype=np.float32)
        if k != 4:
            rel_rec = {"reliability": {"score": 1.0 - 0.15 * k, "review": k >= 3}}
            (pred_dir / f"c{k}_report.json").write_text(json.dumps(rel_rec))
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(out)]) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [f"c{k}" for k in range(6)]  # the PROB files are not taken as masks
    assert rows[0]["reliability"] == "1" and rows[3]["review"] == "1" and rows[4]["reliability"] == "nan"
    summary = (out / "summary.md").read_text()
    assert "## Reliability and calibration" in summary
    # 5 scored lesion cases, worst tertile = the 2 most shifted ones, which have the lowest scores
    assert "worst tertile of Dice 1.000" in summary and "flagged for review: 2 (2 in the worst tertile)" in summary
    assert "calibration (5 probability maps)" in summary and (out / "calibration.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# --hardness reliability:DIR
# ---------------------------------------------------------------------------------------------------------


def test_hardness_from_the_reliability_of_a_reference_ensemble(tmp_path):
    import json

    from clips_jax import trainer
    from clips_jax.configs import default as default_config
    from clips_jax.experiments import hardness as hl
    from clips_jax.experiments.reliability import predict_case, reference_pair
    from clips_jax.model import Ensemble, save_weights

    cfg = default_config.get_config("tiny")
    cfg.data.phantoms.cache = str(tmp_path / "cache")
    store = trainer.ensure_store(cfg, lambda _: None)
    weights = tmp_path / "ens"
    ens = Ensemble.from_members(_tiny_unets(2))
    save_weights(weights, {"ensemble": ens})
    settings = {"temperature": 1.0, "review_threshold": 0.5, "tile_shape": [32, 16, 16], "tile_step": [16, 8, 8]}
    (weights / "reliability.json").write_text(json.dumps(settings))
    h = hl.resolve(f"reliability:{weights}", store, tmp_path / "w")
    assert h.spec == f"reliability:{weights.absolute()}" and "reliability score" in h.description
    test = [store.ids[int(i)] for i in store.split_indices("test")]
    lesion = {store.ids[int(i)] for i in store.split_indices("test") if store.has_lesion[int(i)]}
    assert set(h.values) == set(test) and lesion
    # by hand for one lesion case: 1 - score of the ensemble and its members on the store grid
    from clips_jax.data.pipeline import make_eval_cases

    cid = sorted(lesion)[0]
    case = next(make_eval_cases(store, [store.index(cid)]))
    p = predict_case(case["image"], *reference_pair(ens), (32, 16, 16), (16, 8, 8))
    want = 1.0 - rel.assess(p["prob"], p["prob"] > 0.5, case["geometry"].spacing_mm, p["members"])["score"]
    assert h.values[cid] == pytest.approx(want, abs=1e-6) and 0.0 <= want <= 1.0
    assert all(math.isnan(v) for c, v in h.values.items() if c not in lesion)
    assert (tmp_path / "w" / "hardness.csv").is_file()
    assert hl.resolve(f"reliability:{weights}", store, tmp_path / "w").values == pytest.approx(h.values, nan_ok=True)
    assert hl._resolved_spec("reliability", "a,b", None) == f"reliability:{Path('a').absolute()},{Path('b').absolute()}"


# ---------------------------------------------------------------------------------------------------------
# clips-predict: the reliability record, Markdown line, MIP panel, batch review list, probability maps
# ---------------------------------------------------------------------------------------------------------

PRED_TILES = ["--stage_a_tile", "32,32,32", "--stage_b_tile", "32,32,32"]


@pytest.fixture(scope="module")
def predict_weights(tmp_path_factory):
    """Weights dirs of random tiny networks: {ensemble (4 members, stacking), refiner} and {unet}."""
    from flax import nnx

    from clips_jax.model import Ensemble, Refiner, save_weights

    root = tmp_path_factory.mktemp("rel_weights")
    kw = dict(channels=(4, 4, 8, 8), init_channels=4, bottleneck_kernel=3)
    ens = Ensemble(4, unet_kwargs=kw, rngs=nnx.Rngs(0))
    save_weights(root / "cascade", {"ensemble": ens, "refiner": Refiner(features=4, n_blocks=1, rngs=nnx.Rngs(1))})
    save_weights(root / "unet", {"unet": _tiny_unets(1)[0]})
    return root


def _nifti_study(folder, seed, shape=(24, 32, 32)):
    from clips_jax.data.nifti import save_nifti
    from clips_jax.data.phantoms import make_phantom

    ph = make_phantom(seed, shape)
    folder.mkdir(parents=True)
    save_nifti(folder / "CTres.nii.gz", ph.ct, ph.geometry, dtype=np.float32)
    save_nifti(folder / "SUV.nii.gz", ph.suv, ph.geometry, dtype=np.float32)
    return ph


def test_segment_keeps_the_members_of_the_same_pass(predict_weights):
    from clips_jax import predict
    from clips_jax.data.case import Case
    from clips_jax.data.channels import make_channels
    from clips_jax.data.phantoms import make_phantom
    from clips_jax.data.resample import resample_case
    from clips_jax.inference import nnx_predictor, tiled_inference
    from clips_jax.model import load_model

    ph = make_phantom(5, (24, 32, 32))
    ens = load_model(predict_weights / "cascade", "ensemble")
    models = predict.Models.from_modules(ens)
    assert models.n_members == 4 and models.members is not None
    opts = predict.Options(stage_a_tile=(32, 32, 32), stage_a_only=True, tta=True)
    seg = predict.segment(ph.ct, ph.suv, ph.geometry, models, opts)
    assert seg.members.shape == (4, *seg.stage_a_prob.shape) and seg.tta.shape == (8, *seg.stage_a_prob.shape)
    np.testing.assert_allclose(seg.tta.mean(0), seg.stage_a_prob, atol=1e-6)  # TTA = mean of the passes
    coarse = resample_case(Case("x", ph.ct, ph.suv, None, ph.geometry), 6.0)
    x = make_channels(coarse.ct, coarse.suv)
    pred, params = nnx_predictor(ens.member(2))
    alone = tiled_inference(x, pred, params=params, tile_shape=(32,) * 3, step=(16,) * 3, tta=True)[..., 1]
    np.testing.assert_allclose(seg.members[2], alone, atol=1e-5)  # member 2 of the one pass = member 2 alone
    plain = predict.segment(
        ph.ct,
        ph.suv,
        ph.geometry,
        models,
        predict.Options(stage_a_tile=(32,) * 3, stage_a_only=True, reliability=False),
    )
    assert plain.members is None and plain.tta is None
    no_tta = predict.segment(
        ph.ct, ph.suv, ph.geometry, models, predict.Options(stage_a_tile=(32,) * 3, stage_a_only=True)
    )
    np.testing.assert_allclose(no_tta.stage_a_prob, plain.stage_a_prob, atol=1e-6)  # same ensemble output


def test_predict_report_review_flag_mip_and_batch_list(tmp_path, predict_weights, capsys):
    import json
    import shutil

    from clips_jax import predict

    weights = tmp_path / "w"
    shutil.copytree(predict_weights / "cascade", weights)
    (weights / "reliability.json").write_text(json.dumps({"temperature": 2.0, "review_threshold": 1.0}))
    for name, seed in (("a", 3), ("b", 4)):
        _nifti_study(tmp_path / "in" / name, seed)
    out = tmp_path / "out"
    argv = ["predict", "--input", str(tmp_path / "in"), "--weights", str(weights), "--out", str(out), *PRED_TILES]
    assert predict.main([*argv, "--save_probabilities"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("[1/2] a: ok, TMTV") and "reliability" in text[0] and "REVIEW" in text[0]
    assert text[3] == "review (2 studies below the reliability threshold):"
    assert text[4].startswith("  ") and text[5].startswith("  ")
    rep = json.loads((out / "a_report.json").read_text())
    r = rep["reliability"]
    assert r["review"] is True and r["threshold"] == 1.0 and r["threshold_source"] == "weights"
    assert r["temperature"] == 2.0 and r["members"] == 4 and len(r["member_tmtv_ml"]) == 4
    assert 0.0 <= r["score"] <= 1.0 and r["reasons"] and r["grid"] == "stage A, 6x6x6 mm"
    assert rep["outputs"]["probabilities"] == "a_PROB.nii.gz" and rep["options"]["save_probabilities"] is True
    md = (out / "a_report.md").read_text()
    assert md.splitlines()[4].startswith("**REVIEW: reliability ") and "## Reliability" in md
    import nibabel as nib
    import PIL.Image

    prob = np.asarray(nib.load(out / "a_PROB.nii.gz").dataobj)
    mask = np.asarray(nib.load(out / "a_SEG.nii.gz").dataobj)
    assert prob.shape == mask.shape and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    # T = 2 changes the confidence, never the mask (up to float32 rounding at p = 0.5: one voxel seen on one CPU)
    sure = np.abs(prob - 0.5) > 1e-5
    np.testing.assert_array_equal((prob > 0.5)[sure], (mask > 0)[sure])
    with_panel = PIL.Image.open(out / "a_mip.png").size[0]
    # --noreliability: no record, no panel (a narrower figure); the threshold option overrides the weights'
    assert predict.main([*argv, "--noreliability", "--overwrite", "--out", str(tmp_path / "o2")]) == 0
    rep2 = json.loads((tmp_path / "o2" / "a_report.json").read_text())
    assert rep2["reliability"] is None and "not computed" in (tmp_path / "o2" / "a_report.md").read_text()
    assert PIL.Image.open(tmp_path / "o2" / "a_mip.png").size[0] < with_panel
    assert "review (" not in capsys.readouterr().out
    assert predict.main([*argv, "--review_threshold", "0", "--overwrite", "--out", str(tmp_path / "o3")]) == 0
    r3 = json.loads((tmp_path / "o3" / "a_report.json").read_text())["reliability"]
    assert r3["review"] is False and r3["threshold_source"] == "option" and r3["score"] == pytest.approx(r["score"])
    assert "(review threshold 0.00; no review flag)." in (tmp_path / "o3" / "a_report.md").read_text()
    # a resumed batch lists the flagged studies from their reports
    capsys.readouterr()
    assert predict.main(argv) == 0
    assert "review (2 studies below the reliability threshold):" in capsys.readouterr().out
    (weights / "reliability.json").write_text('{"temperature": -1}')
    assert predict.main([*argv, "--out", str(tmp_path / "o4")]) == 1
    assert "reliability.json" in capsys.readouterr().err


def test_single_unet_is_measured_by_its_voxel_probabilities(tmp_path, predict_weights):
    import json

    from clips_jax import predict

    _nifti_study(tmp_path / "in" / "s", 6)
    argv = ["predict", "--input", str(tmp_path / "in" / "s"), "--weights", str(predict_weights / "unet")]
    assert predict.main([*argv, "--out", str(tmp_path / "out"), "--stage_a_only", "--tta", *PRED_TILES[:2]]) == 0
    r = json.loads((tmp_path / "out" / "s_report.json").read_text())["reliability"]
    assert r["members"] == 0 and r["member_dice_mean"] is None and r["member_tmtv_ml"] is None
    assert r["tta_passes"] == 8 and set(r["components"]) == {"tta", "voxels"}
    assert r["threshold_source"] == "default" and any("single network" in n for n in r["notes"])
    md = (tmp_path / "out" / "s_report.md").read_text()
    assert "single network" in md and "the default; not fixed" in md


def test_save_weights_accepts_a_relative_path(tmp_path, monkeypatch):
    from clips_jax.model import Ensemble, load_model, save_weights

    monkeypatch.chdir(tmp_path)
    save_weights("rel/ens", {"ensemble": Ensemble.from_members(_tiny_unets(2))})  # orbax itself needs absolute
    assert load_model("rel/ens", "ensemble").combine == "mean"


# ---------------------------------------------------------------------------------------------------------
# clips-reliability's pieces (the whole command trains 4 networks: run by hand, docs/reliability.md)
# ---------------------------------------------------------------------------------------------------------


def _rows(split, dice, score, err=None):
    from clips_jax.experiments.reliability import CASE_MEASURES

    err = err or [10.0 * (1 - d) if np.isfinite(d) else 5.0 for d in dice]
    rows = []
    for k, (d, s, e) in enumerate(zip(dice, score, err)):
        row = {"split": split, "case": f"{split}{k}", "dice": d, "score": s, "review_risk": 1 - s}
        row.update(tmtv_abs_err_ml=e, tmtv_true_ml=10.0 if np.isfinite(d) else 0.0, difficulty=1 - s, tmtv_pred_ml=s)
        rows.append({**row, **{m: 0.5 for m in CASE_MEASURES}})
    return rows


def test_split_statistics_fix_the_threshold_on_validation_only():
    from clips_jax.experiments import reliability as exp

    val = _rows("val", [0.1, 0.2, 0.8, 0.9, 0.7, 0.6], [0.2, 0.3, 0.8, 0.9, 0.7, 0.6])
    # test: the score ranks the Dice perfectly, but is shifted: the validation threshold (0.45) flags 1 of 2
    test = _rows("test", [0.1, 0.2, 0.8, 0.9, 0.7, 0.6, float("nan")], [0.4, 0.5, 0.8, 0.9, 0.7, 0.6, 0.95])
    st = exp.split_statistics(val, test)
    assert st["threshold"]["threshold"] == pytest.approx(0.45) and st["threshold"]["j"] == 1.0
    assert st["auroc"]["auroc"] == 1.0 and st["auroc"]["n_pos"] == 2 and st["auroc"]["n_neg"] == 4
    assert st["test_flag"] == {"flagged": 1, "sensitivity": 0.5, "specificity": 1.0}
    assert st["n"] == {"val": 6, "val_lesion": 6, "test": 7, "test_lesion": 6}
    assert st["spearman_abs_tmtv_error"]["n"] == 7 and st["spearman_dice"]["rho"] == pytest.approx(-1.0)
    assert st["worst_tertile_dice_max"] == 0.2 and st["secondary_auroc"]["difficulty"] == 1.0
    res = {
        "command": "clips-reliability", "machine": "2-core CPU", "seconds": {"total": 10.0, "training": 6.0},
        "members": 4, "config": "default", "cohort_seed": 1, "tta": False,
        "member_train_s": 500.0, "member_val_dice": [0.3, 0.4], "temperature": 1.5, "statistics": st,
        "ece": {"raw": {"all": 0.01, "neighbourhood": 0.2}, "scaled": {"all": 0.01, "neighbourhood": 0.1}},
    }  # fmt: skip
    md = exp.report_markdown(res)
    assert "**AUROC 1.000**" in md and "target >= 0.8: met" in md and "**score < 0.450**" in md
    assert "T = 1.500 (T > 1: the ensemble was over-confident)" in md


def test_cohort_ids_fill_the_test_split_with_lesion_cases(tmp_path):
    import json

    from clips_jax.experiments.reliability import _check_workdir, cohort_ids

    split = cohort_ids(tmp_path / "raw", 3, (24, 32, 32), 2, 3, log=lambda _: None)
    assert len(split["val"]) == 2 and split["val"][0] == "phantom_s3_0000"
    lesions = [json.loads((tmp_path / "raw" / c / "truth.json").read_text())["n_lesions"] > 0 for c in split["test"]]
    assert sum(lesions) == 3 and lesions[-1]  # stops at the case that completes the lesion count
    assert cohort_ids(tmp_path / "raw", 3, (24, 32, 32), 2, 3, log=lambda _: None) == split  # deterministic
    _check_workdir(tmp_path / "w", {"a": 1})
    _check_workdir(tmp_path / "w", {"a": 1})
    from clips_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        _check_workdir(tmp_path / "w", {"a": 2})


def test_the_lesion_region_is_fixed_by_the_unscaled_probability():
    from clips_jax.metrics import calibration as cal

    p = np.full((10, 10, 10), 0.01, np.float32)  # faint background everywhere
    p[4:6, 4:6, 4:6] = 0.95
    hot = cal.apply_temperature(p, 6.0)  # a large T lifts the background above CANDIDATE_P (0.25)
    assert hot[0, 0, 0] > rel.CANDIDATE_P
    lifted = rel.measures(hot, p > 0.5, SP)
    fixed = rel.measures(hot, p > 0.5, SP, candidate_prob=p)
    assert lifted["region_ml"] == pytest.approx(1000 * 0.216)  # the whole volume
    assert fixed["region_ml"] == pytest.approx(rel.measures(p, p > 0.5, SP)["region_ml"])  # the lesion + 6 mm
    assert fixed["expected_dice"] > 5 * lifted["expected_dice"]


def test_predict_takes_the_calibrated_stage_a_tile_and_warns_on_another(tmp_path):
    import json

    from clips_jax.errors import DataWarning, WeightsError
    from clips_jax.predict import Options, calibrated_stage_a_tile
    from clips_jax.reliability_report import read_settings

    settings = {"temperature": 1.0, "review_threshold": 0.5, "tile_shape": [32, 32, 32], "tile_step": [16, 16, 16]}
    opts = Options()
    assert calibrated_stage_a_tile(opts, settings, explicit=False).stage_a_tile == (32, 32, 32)
    assert calibrated_stage_a_tile(opts, {}, explicit=False) is opts  # nothing recorded: the default stays
    off = Options(reliability=False)  # the tile belongs to the weights: the masks must not depend on the flag
    assert calibrated_stage_a_tile(off, settings, explicit=False).stage_a_tile == (32, 32, 32)
    with pytest.warns(DataWarning, match=r"fixed with tiles \(32, 32, 32\).*--stage_a_tile 32,32,32"):
        assert calibrated_stage_a_tile(opts, settings, explicit=True).stage_a_tile == (128, 96, 96)
    other_step = dict(settings, tile_step=[24, 24, 24])  # a step clips-predict cannot run: keep, and say so
    for o in (opts, Options(stage_a_tile=(32, 32, 32))):
        with pytest.warns(DataWarning, match=r"step \(24, 24, 24\).*calibrate again"):
            assert calibrated_stage_a_tile(o, other_step, explicit=False).stage_a_tile == o.stage_a_tile
    for bad in ("128,96,96", [32, None, 32], [32, 32], [24, 32, 32]):
        (tmp_path / "reliability.json").write_text(json.dumps(dict(settings, tile_shape=bad)))
        with pytest.raises(WeightsError, match="reliability.json: tile_shape"):
            read_settings(tmp_path)
