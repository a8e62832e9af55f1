"""Self-paced regularisers (closed forms vs the published formulas and a grid minimisation) and SPLD."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from clips_jax.curricula import CaseTable, get_curriculum, make_observation, spl_weights, spld_select

LOSSES = np.array([0.0, 0.05, 0.1, 0.2, 0.29, 0.3, 0.31, 0.45, 0.6, 0.9, 1.5])
LAM = 0.3


def _reference(reg: str, loss: float, lam: float, ratio: float = 0.5, t: float = 3.0) -> float:
    """The closed forms of docs/curricula.md, "Self-paced options" (Kumar et al. 2010; Jiang et al. 2014), in
    plain Python."""
    if reg == "hard":
        return 1.0 if loss < lam else 0.0
    if reg == "linear":
        return max(0.0, 1.0 - loss / lam)
    if reg == "log":
        zeta = 1.0 - lam
        return math.log(loss + zeta) / math.log(zeta) if loss < lam else 0.0
    if reg == "mixture":
        lam_p = ratio * lam
        zeta = lam * lam_p / (lam - lam_p)
        return 1.0 if loss <= lam_p else (0.0 if loss >= lam else zeta / loss - zeta / lam)
    if reg == "polynomial":
        return (1.0 - loss / lam) ** (1.0 / (t - 1.0)) if loss < lam else 0.0
    raise ValueError(reg)


def _objective(reg: str, v: np.ndarray, loss: float, lam: float, ratio: float = 0.5, t: float = 3.0) -> np.ndarray:
    """v * l + g(v; lam) for one case, g the regulariser of Kumar et al. 2010 / Jiang et al. 2014."""
    if reg == "hard":
        g = -lam * v
    elif reg == "linear":
        g = lam * (0.5 * v**2 - v)
    elif reg == "log":
        zeta = 1.0 - lam
        g = zeta * v - zeta**v / np.log(zeta)
    elif reg == "mixture":
        lam_p = ratio * lam
        zeta = lam * lam_p / (lam - lam_p)
        g = -zeta * np.log(v + zeta / lam)
    elif reg == "polynomial":
        g = lam * (v**t / t - v)
    return v * loss + g


REGS = ("hard", "linear", "log", "mixture", "polynomial")


@pytest.mark.parametrize("reg", REGS)
def test_closed_form_matches_reference_and_minimises_objective(reg):
    got = np.asarray(spl_weights(jnp.asarray(LOSSES), LAM, reg, mixture_ratio=0.5, poly_order=3.0))
    want = np.array([_reference(reg, float(x), LAM) for x in LOSSES])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grid = np.linspace(0.0, 1.0, 20001)
    for loss, v in zip(LOSSES, got):
        f = _objective(reg, grid, float(loss), LAM)
        # v* attains the grid minimum (up to the grid step and float32 rounding of v*).
        assert _objective(reg, np.array([float(v)]), float(loss), LAM)[0] <= f.min() + 1e-6, (reg, loss, v)
        if reg != "hard" or abs(loss - LAM) > 1e-9:
            assert abs(grid[np.argmin(f)] - v) < 2e-3, (reg, loss, v, grid[np.argmin(f)])


def test_lambda_infinite_selects_all_and_nan_passes_through():
    v = np.asarray(spl_weights(jnp.array([0.1, 5.0, np.nan]), jnp.inf, "linear"))
    np.testing.assert_allclose(v[:2], 1.0)
    assert np.isnan(v[2])


def test_spld_hand_example():
    # Group 0 losses 0.1, 0.2, 0.22 (ranks 1, 2, 3), group 1 losses 0.15, 0.5 (ranks 1, 2); lam 0.15, gamma 0.2.
    # Thresholds lam + gamma / (sqrt(r) + sqrt(r - 1)):
    #   r1: 0.15 + 0.2 / 1 = 0.35;  r2: 0.15 + 0.2 / (1.41421 + 1) = 0.23284;
    #   r3: 0.15 + 0.2 / (1.73205 + 1.41421) = 0.21357.
    # -> 0.1 (r1) yes, 0.2 (r2) yes, 0.22 (r3) no; 0.15 (r1 of group 1) yes, 0.5 (r2) no.
    losses = jnp.array([0.22, 0.1, 0.15, 0.2, 0.5])
    groups = jnp.array([0, 0, 1, 0, 1])
    sel = np.asarray(spld_select(losses, groups, jnp.ones(5, bool), 0.15, 0.2))
    np.testing.assert_array_equal(sel, [False, True, True, True, False])
    # Plain hard SPL at the same lambda keeps only 0.1: diversity adds the best cases of every group.
    np.testing.assert_array_equal(np.asarray(spl_weights(losses, 0.15, "hard")) > 0, [False, True, False, False, False])
    # Invalid cases are neither selected nor counted in the ranks: without 0.1, 0.2 is r1 and 0.22 is r2
    # (0.22 < 0.23284 -> selected).
    sel = np.asarray(spld_select(losses, groups, jnp.array([True, False, True, True, True]), 0.15, 0.2))
    np.testing.assert_array_equal(sel, [True, False, True, True, False])


def _table(n):
    d = {"composite": np.linspace(0, 1, n)}
    return CaseTable(d, np.ones(n, bool), np.arange(n) % 2)


def test_self_paced_quantile_mode_and_update():
    n = 10
    cur = get_curriculum(
        "self_paced_hard", steps_per_epoch=5, pacing="linear", start_fraction=0.5, grow_epochs=4, k_min=1
    )
    state = cur.init(_table(n))
    losses = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0], np.float32)
    state = cur.update(state, make_observation(np.arange(n), losses, step=0))
    np.testing.assert_array_equal(np.asarray(state["losses"]), losses)
    lam = np.quantile(losses, 0.5)  # q(0) = start_fraction; jnp.nanquantile uses linear interpolation too
    w = np.asarray(cur.weights(state, 0))
    sel = losses < lam
    np.testing.assert_allclose(w, np.where(sel, 1 / sel.sum(), 0.0), rtol=1e-6)
    # At 2 epochs q = 0.75; at 4 epochs (q = 1) every case is selected.
    sel = losses < np.quantile(losses, 0.75)
    np.testing.assert_allclose(np.asarray(cur.weights(state, 10)), np.where(sel, 1 / sel.sum(), 0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cur.weights(state, 20)), 0.1, rtol=1e-6)
    # NaN, out-of-range and padding (-1) entries are ignored by update; a seen case's loss is a moving average
    # (loss_ema 0.5: 0.5 * 0.3 + 0.5 * 0.05 = 0.175), an unseen case takes its first observation as is.
    obs = make_observation([1, -1, 3, 99], [np.nan, 5.0, 0.05, 7.0])
    new = np.asarray(cur.update(state, obs)["losses"])
    np.testing.assert_allclose(new, np.where(np.arange(n) == 3, np.float32(0.175), losses), rtol=1e-6)
    fresh = cur.init(_table(n))
    first = np.asarray(cur.update(fresh, make_observation([2], [0.4]))["losses"])
    assert first[2] == np.float32(0.4) and np.isnan(np.delete(first, 2)).all()
    slow = get_curriculum("self_paced_hard", steps_per_epoch=5, loss_ema=0.9)
    st = slow.update(slow.update(slow.init(_table(n)), make_observation([0], [1.0])), make_observation([0], [0.0]))
    assert float(st["losses"][0]) == pytest.approx(0.9)
    assert cur.needs_losses and not cur.needs_gain and cur.update_every == "step"


def test_self_paced_geometric_lambda_and_fallback():
    cur = get_curriculum(
        "self_paced_linear", steps_per_epoch=4, lambda_mode="geometric", lambda0=0.2, mu=2.0, every_epochs=3, k_min=2
    )
    losses = np.array([0.1, 0.3, 0.5, 0.7], np.float32)
    state = cur.update(cur.init(_table(4)), make_observation(np.arange(4), losses))
    for step, lam in ((0, 0.2), (11, 0.2), (12, 0.4), (24, 0.8)):  # lam = 0.2 * 2^floor(floor(step/4)/3)
        v = np.maximum(0, 1 - losses / lam)
        np.testing.assert_allclose(np.asarray(cur.weights(state, step)), v / v.sum(), rtol=1e-5)
    # Nothing selected (all losses above lambda) -> the k_min = 2 lowest-loss cases, uniformly.
    high = cur.update(state, make_observation(np.arange(4), [3.0, 1.0, 2.0, 4.0]))
    np.testing.assert_allclose(np.asarray(cur.weights(high, 0)), [0.0, 0.5, 0.5, 0.0])
