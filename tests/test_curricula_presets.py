"""Pacing functions, predefined orderings and every preset: valid weights, purity, jit, no retracing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clips_jax.curricula import (
    PACINGS,
    PRESETS,
    CaseTable,
    PacingConfig,
    full_set_step,
    get_curriculum,
    make_observation,
    pacing_window,
    select_window,
)
from clips_jax.errors import ConfigError

SPE = 10  # steps per epoch in these tests


def _table(n: int, n_neg: int, seed: int = 0, teacher: bool = True) -> CaseTable:
    """N cases, the first n_neg lesion-free; random lesion measures, NaN on negatives."""
    rng = np.random.default_rng(seed)
    has = np.r_[np.zeros(n_neg, bool), np.ones(n - n_neg, bool)]
    d = {
        "tmtv_ml": rng.uniform(1, 200, n),
        "n_lesions": rng.integers(1, 9, n).astype(float),
        "smallest_lesion_ml": rng.uniform(0.1, 5, n),
        "suv_max": rng.uniform(3, 30, n),
        "tbr": rng.uniform(1, 15, n),
        "dmax_mm": rng.uniform(0, 600, n),
        "composite": rng.uniform(0, 1, n),
    }
    d = {k: np.where(has, v, np.nan) for k, v in d.items()}
    if teacher:
        d["teacher_loss"] = rng.uniform(0, 2, n)
    return CaseTable(d, has, None)


def _cfg(kind, **kw):
    return PacingConfig(
        pacing=kind,
        start_fraction=kw.pop("start_fraction", 0.1),
        grow_epochs=kw.pop("grow", 7.0),
        steps_per_epoch=SPE,
        inc=1.9,
        step_length_steps=13,
        n_buckets=4,
        **kw,
    )


@pytest.mark.parametrize("kind", [k for k in PACINGS if k != "one_pass"])
def test_pacing_monotone_and_full_at_configured_time(kind):
    cfg = _cfg(kind)
    full = full_set_step(cfg)
    steps = jnp.arange(0, full + 50)
    lo, hi = jax.vmap(lambda s: pacing_window(s, cfg))(steps)
    hi = np.asarray(hi)
    assert np.all(np.asarray(lo) == 0)
    assert np.all(np.diff(hi) >= 0), "pacing must be non-decreasing"
    assert np.all(hi[full:] == 1.0)
    if kind != "none":
        assert hi[full - 1] < 1.0 and hi[0] == pytest.approx(0.1 if kind != "baby_step" else 0.25)
    # And the selection built on it grows to the whole ordering at that step.
    n, ranks = 37, jnp.arange(37)
    counts = [int(np.sum(np.asarray(select_window(ranks, n, 0.0, h, 3)) > 0)) for h in hi[:: max(1, full // 20)]]
    assert np.all(np.diff(counts) >= 0) and counts[0] >= 3
    assert int(np.sum(np.asarray(select_window(ranks, n, 0.0, hi[full], 3)) > 0)) == n


def test_pacing_closed_forms():
    t = 3 * SPE  # epoch 3 of T = 7
    lam = {k: float(pacing_window(t, _cfg(k, p=3.0))[1]) for k in ("linear", "root", "root_p", "geometric")}
    assert lam["linear"] == pytest.approx(0.1 + 0.9 * 3 / 7, rel=1e-6)
    assert lam["root"] == pytest.approx(math.sqrt(0.01 + 0.99 * 3 / 7), rel=1e-6)
    assert lam["root_p"] == pytest.approx((0.001 + 0.999 * 3 / 7) ** (1 / 3), rel=1e-6)
    assert lam["geometric"] == pytest.approx(2 ** (math.log2(0.1) * (1 - 3 / 7)), rel=1e-6)
    assert float(pacing_window(26, _cfg("exponential"))[1]) == pytest.approx(0.1 * 1.9**2, rel=1e-6)
    # baby step, K = 4 over 7 epochs: a new bucket every 7/3 epochs.
    assert float(pacing_window(int(2.4 * SPE), _cfg("baby_step"))[1]) == pytest.approx(0.5)


def test_one_pass_moves_window_then_full():
    cfg = _cfg("one_pass", grow=8.0)  # K = 4, 2 epochs per bucket
    wins = [tuple(float(x) for x in pacing_window(e * SPE, cfg)) for e in (0, 2, 5, 7, 8, 100)]
    assert wins == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (0.0, 1.0), (0.0, 1.0)]
    w = np.asarray(select_window(jnp.arange(20), 20, 0.5, 0.75, 2))
    np.testing.assert_allclose(w, np.where((np.arange(20) >= 10) & (np.arange(20) < 15), 0.2, 0.0))


def test_select_window_k_min_and_sentinel():
    ranks = jnp.array([0, 1, 2, 3, 9, 9])  # two ineligible (sentinel) cases, n = 4
    w = np.asarray(select_window(ranks, 4, 0.0, 0.01, 3))
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    w = np.asarray(select_window(ranks, 4, 0.0, 0.01, 10))  # k_min > n -> all ranked
    np.testing.assert_allclose(w, [0.25] * 4 + [0, 0])
    assert np.all(np.asarray(select_window(ranks, 0, 0.0, 1.0, 3)) == 0)
    # 0.3 * 10 must select 3, not 4 (float round-off guard).
    assert int(np.sum(np.asarray(select_window(jnp.arange(10), 10, 0.0, 0.3, 1)) > 0)) == 3


def test_predefined_order_anti_random():
    table = _table(12, 4)
    kw = dict(steps_per_epoch=SPE, pacing="linear", start_fraction=0.25, grow_epochs=10, k_min=1)
    pos = np.flatnonzero(table.has_lesion)
    tmtv = table.difficulty["tmtv_ml"][pos]
    for order, expect in (("easy_first", pos[np.argsort(-tmtv)[:2]]), ("anti", pos[np.argsort(tmtv)[:2]])):
        cur = get_curriculum("predefined", measure="tmtv_ml", order=order, **kw)
        w = np.asarray(cur.weights(cur.init(table), 0))
        # 25 % of the 8 positives = the 2 largest TMTV (smaller TMTV is harder); negatives at q = 4/12.
        np.testing.assert_allclose(w[expect], (1 - 4 / 12) / 2, rtol=1e-6)
        np.testing.assert_allclose(w[:4], (4 / 12) / 4, rtol=1e-6)
        assert np.isclose(w.sum(), 1.0) and np.count_nonzero(w) == 6
    r1 = get_curriculum("random", seed=3, **kw).init(table)["ranks"]
    r2 = get_curriculum("random", seed=3, **kw).init(table)["ranks"]
    r3 = get_curriculum("random", seed=4, **kw).init(table)["ranks"]
    np.testing.assert_array_equal(r1, r2)
    assert sorted(r1[pos].tolist()) == list(range(8)) and np.all(r1[:4] == 12) and not np.array_equal(r1, r3)


def test_unknown_options_and_missing_teacher_raise():
    with pytest.raises(ConfigError, match="unknown option"):
        get_curriculum("anti", steps_per_epoch=1, bogus=1)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        get_curriculum("predefined_tmtv_root")
    with pytest.raises(ConfigError, match="unknown curriculum"):
        get_curriculum("nope")
    with pytest.raises(ConfigError, match="teacher"):
        get_curriculum("transfer_teacher", steps_per_epoch=1).init(_table(5, 1, teacher=False))


TABLES = {
    "mixed": _table(24, 9),
    "all_negative": _table(6, 6),
    "no_negative": _table(7, 0),
    "single": _table(1, 0),
    "single_negative": _table(1, 1),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_valid_pure_and_jittable(preset):
    extra = {"grow_epochs": 3} if preset.startswith(("self", "pre")) else {}
    extra.update({"reservoir_size": 64} if preset == "exp3s" else {})  # keep the test fast
    cur = get_curriculum(preset, steps_per_epoch=SPE, **extra)
    traces = {"w": 0, "u": 0}

    def w_fn(state, step):
        traces["w"] += 1
        return cur.weights(state, step)

    def u_fn(state, obs):
        traces["u"] += 1
        return cur.update(state, obs)

    wj, uj = jax.jit(w_fn), jax.jit(u_fn)
    for tname, table in TABLES.items():
        traces["w"] = traces["u"] = 0
        rng = np.random.default_rng(1)
        state = cur.init(table)
        before = jax.tree.map(np.array, state)
        for step in (0, 3, 11, 25, 40, 61, 90, 119):
            s = jnp.int32(step)
            w = wj(state, s)
            np.testing.assert_array_equal(np.asarray(w), np.asarray(wj(state, s)))  # same inputs, same output
            if step in (0, 61):  # jit and eager agree (up to float round-off of fused ops)
                np.testing.assert_allclose(np.asarray(w), np.asarray(cur.weights(state, s)), rtol=1e-5, atol=1e-7)
            wn = np.asarray(w)
            assert wn.shape == (table.n,) and wn.dtype == np.float32
            assert np.all(np.isfinite(wn)) and np.all(wn >= 0) and abs(wn.sum() - 1) < 1e-5, (tname, step, wn)
            idx = rng.choice(table.n, size=4, p=wn / wn.sum())
            losses = np.where(rng.random(4) < 0.2, np.nan, rng.uniform(0, 1, 4))  # some missing losses
            obs = make_observation(idx, losses, rng.normal(), step)
            new = uj(state, obs)
            jax.tree.map(
                np.testing.assert_array_equal, jax.tree.map(np.asarray, new), jax.tree.map(np.asarray, uj(state, obs))
            )  # same inputs, same outputs
            jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state))  # not mutated
            state = new
            before = jax.tree.map(np.array, state)
        # At most one trace per table shape (a table of an already-seen shape reuses the cache), none when
        # the step, the losses or the state values change.
        assert traces["w"] <= 1 and traces["u"] <= 1, (tname, traces)
        sig = float(cur.sigma(state, jnp.int32(0)))
        assert sig == (1.0 if preset == "cbs" else 0.0)


def test_all_nan_losses_self_paced_stays_uniform_over_unseen():
    cur = get_curriculum("self_paced_hard", steps_per_epoch=SPE)
    table = _table(10, 3)
    state = cur.update(cur.init(table), make_observation(np.arange(10), np.full(10, np.nan)))
    np.testing.assert_allclose(np.asarray(cur.weights(state, 5)), 0.1, rtol=1e-6)
