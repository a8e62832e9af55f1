"""Exp3.S teacher (hand-computed update, reservoir, reward rescaling) and the curriculum-by-smoothing schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clips_jax.curricula import (
    CaseTable,
    cbs_sigma,
    exp3s_policy,
    exp3s_weights_update,
    get_curriculum,
    kernel_1d,
    make_observation,
    with_smoothing,
)
from clips_jax.curricula.bandit import rescale_reward, reservoir_insert
from clips_jax.curricula.smoothing import SmoothingConfig


def test_exp3s_update_hand_example_k3():
    w = jnp.array([0.1, -0.2, 0.3])
    # pi = 0.95 * softmax(w) + 0.05 / 3: e^w = 1.105171, 0.818731, 1.349859 (sum 3.273761)
    #    -> softmax 0.337585, 0.250089, 0.412326 -> pi = 0.337372, 0.254251, 0.408377
    pi = exp3s_policy(w, 0.05)
    np.testing.assert_allclose(np.asarray(pi), [0.337372, 0.254251, 0.408377], atol=2e-6)
    # Action a = 2 (one-hot attribution), rescaled reward r = 0.6, eta = 0.5, beta = 0.1, t = 4 (alpha = 0.25):
    # r~ = (0.1/0.337372, 0.1/0.254251, 0.7/0.408377) = (0.296409, 0.393312, 1.714102)
    # z = w + 0.5 r~ = (0.248204, -0.003344, 1.157051)
    # w'_0 = log(0.75 e^0.248204 + 0.125 (e^-0.003344 + e^1.157051)) = log(0.963281 + 0.125 * 4.177387) = 0.394365
    # w'_1 = log(0.75 e^-0.003344 + 0.125 (e^0.248204 + e^1.157051)) = 0.266417
    # w'_2 = log(0.75 e^1.157051 + 0.125 (e^0.248204 + e^-0.003344)) = 0.982155
    new = exp3s_weights_update(w, pi, jnp.array([0.0, 0.0, 1.0]), 0.6, 4, eta=0.5, beta=0.1)
    np.testing.assert_allclose(np.asarray(new), [0.394365, 0.266417, 0.982155], atol=1e-5)
    # alpha_1 = 1 mixes fully: w'_k = log(0.5 (e^{z_j} + e^{z_l})), j, l != k.
    z = np.asarray(w) + 0.5 * (np.array([0.0, 0.0, 0.6]) + 0.1) / np.asarray(pi)
    full = exp3s_weights_update(w, pi, jnp.array([0.0, 0.0, 1.0]), 0.6, 1, eta=0.5, beta=0.1)
    want = [
        math.log(0.5 * (math.exp(z[1]) + math.exp(z[2]))),
        math.log(0.5 * (math.exp(z[0]) + math.exp(z[2]))),
        math.log(0.5 * (math.exp(z[0]) + math.exp(z[1]))),
    ]
    np.testing.assert_allclose(np.asarray(full), want, atol=1e-5)
    # K = 1: the update is w + eta (r + beta) / pi.
    np.testing.assert_allclose(
        np.asarray(exp3s_weights_update(jnp.zeros(1), jnp.ones(1), jnp.ones(1), 0.5, 3, 0.5, 0.0)), [0.25]
    )


def test_reward_rescaling_and_reservoir():
    res = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, jnp.nan, jnp.nan])
    # q20 = 0.8, q80 = 3.2 of [0, 1, 2, 3, 4] (linear interpolation).
    assert float(rescale_reward(0.5, res, 0.2, 0.8)) == -1.0
    assert float(rescale_reward(3.5, res, 0.2, 0.8)) == 1.0
    assert float(rescale_reward(2.0, res, 0.2, 0.8)) == pytest.approx(2 * (2.0 - 0.8) / 2.4 - 1)
    assert float(rescale_reward(1.0, jnp.array([1.0, jnp.nan]), 0.2, 0.8)) == 0.0  # q_lo == q_hi
    key = jax.random.PRNGKey(0)
    r, n = reservoir_insert(jnp.full(3, jnp.nan), 0, 7.0, key)
    assert int(n) == 1 and np.asarray(r)[0] == 7.0 and np.isnan(np.asarray(r)[1:]).all()
    # A full reservoir keeps its size; over many draws item n replaces a slot with probability M / (n + 1).
    hits = 0
    for i in range(200):
        r2, _ = reservoir_insert(jnp.zeros(3), 9, 1.0, jax.random.PRNGKey(i))
        hits += int(np.asarray(r2).sum() > 0)
    assert 30 < hits < 90  # expectation 200 * 3 / 10 = 60


def _table(n):
    return CaseTable({"composite": np.arange(n, dtype=float)}, np.ones(n, bool))


def test_exp3s_curriculum_update_matches_formulas():
    cur = get_curriculum("exp3s", num_buckets=3, eta=0.5, beta=0.1, eps=0.05, reservoir_size=10)
    state = cur.init(_table(6))  # buckets by rank: cases 0-1 -> 0, 2-3 -> 1, 4-5 -> 2
    np.testing.assert_array_equal(state["bucket"], [0, 0, 1, 1, 2, 2])
    w0 = np.array([0.1, -0.2, 0.3], np.float32)
    pi0 = np.asarray(exp3s_policy(w0, 0.05))
    state = {
        **state,
        "w": w0,
        "pi": pi0,
        "action": np.int32(2),
        "t": np.int32(3),
        "count": np.int32(5),
        "reservoir": np.r_[np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.full(5, np.nan)].astype(np.float32),
    }
    # Bucket mode: all mass on bucket 2 (cases 4, 5).
    np.testing.assert_allclose(np.asarray(cur.weights(state, 0)), [0, 0, 0, 0, 0.5, 0.5])
    # One stage of two steps with gains 2.0 and 3.0: the round's reward is their mean, 2.5; the weights (the
    # frozen action and policy) do not move within the stage.
    upd = jax.jit(cur.update)
    mid = upd(state, make_observation([4, 5], reward=2.0))
    mid = upd(mid, make_observation([4, 5], reward=3.0))
    np.testing.assert_array_equal(np.asarray(mid["w"]), w0)
    np.testing.assert_array_equal(np.asarray(cur.weights(mid, 1)), np.asarray(cur.weights(state, 0)))
    new = jax.jit(cur.end_stage)(mid)
    # Reservoir gets 2.5 in slot 5 (count 5 < M); quantiles of [0,1,2,3,4,2.5]: q20 = 1.0, q80 = 3.0
    # -> r = 2 (2.5 - 1) / 2 - 1 = 0.5; t = 4.
    vals = np.array([0, 1, 2, 3, 4, 2.5])
    lo, hi = np.quantile(vals, 0.2), np.quantile(vals, 0.8)
    r = 2 * (2.5 - lo) / (hi - lo) - 1
    assert r == pytest.approx(0.5)
    z = w0 + 0.5 * (r * np.array([0, 0, 1.0]) + 0.1) / pi0
    want = np.array(
        [math.log(0.75 * math.exp(z[k]) + 0.125 * sum(math.exp(z[j]) for j in range(3) if j != k)) for k in range(3)]
    )
    np.testing.assert_allclose(np.asarray(new["w"]), want - want.max(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["pi"]), np.asarray(exp3s_policy(want, 0.05)), atol=1e-6)
    assert int(new["t"]) == 4 and int(new["count"]) == 6 and np.asarray(new["reservoir"])[5] == 2.5
    assert 0 <= int(new["action"]) < 3
    assert float(new["gain_sum"]) == 0 and int(new["gain_n"]) == 0 and not np.asarray(new["bucket_hits"]).any()
    # A stage without a finite gain changes nothing but the action draw.
    same = cur.end_stage(cur.update(state, make_observation([4], reward=float("nan"))))
    np.testing.assert_array_equal(np.asarray(same["w"]), w0)
    assert int(same["t"]) == 3 and int(same["count"]) == 5


def test_exp3s_declares_stage_updates_and_keeps_them_under_smoothing():
    for cur in (get_curriculum("exp3s"), get_curriculum("exp3s", smoothing=True, steps_per_epoch=5)):
        assert cur.needs_gain and cur.update_every == "stage" and not cur.needs_losses
        assert cur.end_stage is not None and cur.end_stage.__name__ == "end_stage"
    assert get_curriculum("exp3s", smoothing=True, steps_per_epoch=5).smooths
    assert not get_curriculum("exp3s").smooths
    none = get_curriculum("none")
    assert not (none.needs_gain or none.needs_losses or none.smooths) and none.update_every == "step"


def _bandit_rounds(cur, state, reward_of_bucket, rounds, steps_per_stage, rng):
    """Run `rounds` stages: draw the stage's batches from its weights, one gain per step, then end_stage."""
    upd, end, wts = jax.jit(cur.update), jax.jit(cur.end_stage), jax.jit(cur.weights)
    bucket = np.asarray(state["bucket"])
    for _ in range(rounds):
        w = np.asarray(wts(state, 0), np.float64)
        for _ in range(steps_per_stage):
            idx = rng.choice(w.size, size=2, p=w / w.sum())
            gain = float(np.mean([reward_of_bucket(bucket[i]) for i in idx])) + 0.1 * rng.normal()
            state = upd(state, make_observation(idx, reward=gain))
        state = end(state)
    return state


def test_exp3s_concentrates_on_the_most_rewarding_bucket():
    # Graves et al. 2017: a task whose learning progress is always the largest ends up with most of the policy.
    # 5 buckets of 4 cases; bucket 3 gives gain 1, the others 0; 10 steps per stage, one update per stage.
    cur = get_curriculum("exp3s", num_buckets=5, eta=0.1, eps=0.05, reservoir_size=1000, seed=1)
    state = cur.init(_table(20))
    state = _bandit_rounds(cur, state, lambda b: 1.0 if b == 3 else 0.0, 300, 10, np.random.default_rng(0))
    pi = np.asarray(state["pi"])
    assert int(state["t"]) == 300  # one update per stage, not per step
    assert pi[3] > 0.8 and int(np.argmax(pi)) == 3, pi


def test_exp3s_mixture_mode_weights_and_learning():
    cur = get_curriculum("exp3s", num_buckets=2, mode="mixture", eta=0.2, eps=0.0, reservoir_size=100)
    state = cur.init(_table(6))  # buckets: cases 0-2 -> 0, 3-5 -> 1
    w = np.asarray(cur.weights(state, 0))
    np.testing.assert_allclose(w, [0.5 / 3] * 6, rtol=1e-6)  # pi = (0.5, 0.5) split over 3 cases each
    upd, end = jax.jit(cur.update), jax.jit(cur.end_stage)
    rng = np.random.default_rng(0)
    for step in range(300):  # bucket 1 always gives more progress than bucket 0 (one-batch stages)
        b = int(rng.integers(0, 2))
        state = end(upd(state, make_observation([3 * b, 3 * b + 1], reward=b + 0.1 * rng.normal(), step=step)))
    pi = np.asarray(state["pi"])
    assert pi[1] > 0.6, pi
    np.testing.assert_allclose(np.asarray(cur.weights(state, 0))[3:], pi[1] / 3, rtol=1e-5)


def test_cbs_sigma_schedule_values():
    # steps_per_epoch 10, decay every 5 epochs: sigma = 0.9^floor(floor(step / 10) / 5).
    for step, want in ((0, 1.0), (49, 1.0), (50, 0.9), (99, 0.9), (100, 0.81), (499, 0.9**9), (2000, 0.9**40)):
        assert float(cbs_sigma(step, 1.0, 0.9, 5, 10)) == pytest.approx(want, rel=1e-5)
    cur = get_curriculum("cbs", steps_per_epoch=10, sigma0=2.0, sigma_decay=0.5, sigma_every_epochs=1)
    state = cur.init(_table(3))
    assert [float(cur.sigma(state, s)) for s in (0, 9, 10, 25)] == [2.0, 2.0, 1.0, 0.5]
    sig = jax.jit(cur.sigma)
    assert float(sig(state, jnp.int32(30))) == 0.25
    # Composes with a data curriculum without changing its weights.
    base = get_curriculum("anti", steps_per_epoch=10)
    smooth = with_smoothing(base, SmoothingConfig(steps_per_epoch=10))
    st = base.init(_table(12))
    np.testing.assert_array_equal(np.asarray(base.weights(st, 7)), np.asarray(smooth.weights(st, 7)))
    assert float(base.sigma(st, 0)) == 0.0 and float(smooth.sigma(st, 0)) == 1.0


def test_kernel_1d():
    a = math.exp(-0.5)
    np.testing.assert_allclose(np.asarray(kernel_1d(1.0)), np.array([a, 1, a]) / (1 + 2 * a), rtol=1e-6)
    # Curriculum by smoothing (Sinha et al. 2020), kernel size 3: the 3-D centre weight at sigma = 1 is 0.092.
    assert float(kernel_1d(1.0)[1]) ** 3 == pytest.approx(0.092, abs=5e-4)
    np.testing.assert_array_equal(np.asarray(kernel_1d(0.0)), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(np.asarray(jax.jit(kernel_1d)(5e-4)), [0.0, 1.0, 0.0])
    x = np.arange(-2, 3)
    g = np.exp(-(x**2) / (2 * 0.7**2))
    np.testing.assert_allclose(np.asarray(kernel_1d(0.7, 5)), g / g.sum(), rtol=1e-6)
    with pytest.raises(ValueError):
        kernel_1d(1.0, 4)
