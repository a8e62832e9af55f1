"""Statistics for comparing curricula trained with several seeds and evaluated on the same test patients.

What it is for
--------------
`compare_curricula` trains every curriculum with several seeds (training runs) and evaluates every run on the
same held-out test cases, giving per curriculum a table ``(n_runs, n_cases)`` of a per-case metric (Dice; any
metric where larger is better). `compare` tests each curriculum against the baseline on all cases and on the
hard third of the cases; `holm` adjusts its p-values across curricula; `minimal_detectable_effect` says how
large a difference the design can detect; `simulate` checks the error rates of the whole procedure;
`power_table` gives the power of the hard-case test over effects, test cases and seeds (to plan a study,
docs/experiments.md).

Why not a per-case Wilcoxon over seed-averaged differences
----------------------------------------------------------
Two sources of variance make a difference between two curricula: the test patients (cases) and the training
runs (seeds). A Wilcoxon (or paired t) test over cases of seed-averaged differences treats the cases as the
only random sample: a per-run offset (one seed's model is a little better on every case) is shared by all
cases of that run, does not shrink with more cases, and is ignored by such a test: with run offsets of s.d.
0.02 Dice the old test was reported to reject 24 % of comparisons of identical methods instead of 5 %
(Bouthillier et al. 2021 show how large this seed variance is in ML benchmarks). Second, the old code chose
the "hard" cases as the bottom tertile of the very baseline run it then compared against: a case that is low
in that run because of that run's noise is, on average, higher in any other run (regression to the mean,
Barnett et al. 2005), so every curriculum looked better on the hard cases (60 % false positives reported for
identical methods). Here the hard subset is chosen either by a hardness score fixed independently of the
compared runs, or by the baseline's first run, which is then left out of the hard-subset test.

The model and the estimator
---------------------------
For arm m in {A (the curriculum), B (the baseline)}, run r, case c::

    Y_mrc = mu_m + a_c + (ac)_mc + b_mr + e_mrc

with a case effect a_c shared by both arms (it cancels in the comparison), a case-by-method interaction
(ac)_mc (variance s2_ac; the curriculum helps some patients more than others), a run effect b_mr (variance
s2_b) and a residual e_mrc (variance s2_e). The test is of mu_A - mu_B, estimated by the difference of the
grand means D = mean_c d_c, d_c = Ybar_A.c - Ybar_B.c. With nA, nB runs, C cases and h = 1/nA + 1/nB::

    Var(D) = 2 s2_ac / C + h s2_b + h s2_e / C

estimated from three mean squares (variance components by ANOVA, balanced design):

* V_C = sample variance over cases of d_c (df C - 1); E[V_C] = 2 s2_ac + h s2_e;
* S_R = pooled within-arm sample variance of the run means Ybar_mr. (df nA + nB - 2); E[S_R] = s2_b + s2_e / C;
* MSE = pooled within-arm run x case residual mean square of Y_mrc - Ybar_mr. - Ybar_m.c + Ybar_m..
  (df (nA - 1 + nB - 1)(C - 1)); E[MSE] = s2_e.

Var(D) is estimated by the unbiased ANOVA (method-of-moments) combination of the three mean squares::

    Var(D) = V_C / C + h (S_R - MSE / C)            (patients through V_C, training runs through S_R)

floored at h MSE / C, the part of Var(D) due to the residual alone (the combination minus h MSE / C is the
ANOVA estimate of 2 s2_ac / C + h s2_b; when it is negative, se^2 = h MSE / C with df_e). The degrees of
freedom are Satterthwaite's (1946) for the linear combination actually used, the negative term included:
df = Var^2 / sum_i (k_i MS_i)^2 / df_i. The 95 % interval is D +- t(df, 0.975) se and
p = 2 (1 - T_df(|D| / se)) (scipy.stats.t). Without a case-by-method interaction this is close to the exact
two-sample t test of the run means (h S_R, df nA + nB - 2); without run effects it is close to the paired test
over cases (V_C / C, df C - 1).

Change from the procedure first specified (numbers in docs/statistics.md): that estimator truncated the run
component at zero, Var(D) = V_C / C + h max(0, S_R - MSE / C). A truncated estimate of a variance component
that is truly zero has a positive mean, so with a case-by-method interaction and no run effect it rejected
only about 3.2 % of true nulls (the lower edge of the wanted [3, 7] % band); the unbiased combination gives
about 4.0 % (all cases) and 3.5 % (hard third) there, and the same rates as the truncated one when runs do
differ (about 5 % and 4.5 %). Other degrees of freedom (Welch's 1947 form; dropping the negative term from the
Satterthwaite sum) did not help. With 3 runs per arm the run variance rests on 4 df, so some conservatism when
there is no run effect is the price of a test that stays valid when there is one; with 2 runs per arm (2 df)
the Satterthwaite approximation is poor and the test is liberal (about 7.5 %): use at least 3 runs per arm.

The procedure is analytic and deterministic: `compare`'s `seed` argument is accepted for the contract (for
resampling procedures) and does not change the result.

Sources
-------
* F. E. Satterthwaite (1946), An approximate distribution of estimates of variance components. Biometrics
  Bulletin 2(6):110-114.
* S. Holm (1979), A simple sequentially rejective multiple test procedure. Scand. J. Statist. 6(2):65-70.
* X. Bouthillier et al. (2021), Accounting for variance in machine learning benchmarks. Proc. MLSys 3.
* S. R. Searle, G. Casella, C. E. McCulloch (1992), Variance Components, Wiley, ch. 4 (ANOVA estimation).
* A. G. Barnett, J. C. van der Pols, A. J. Dobson (2005), Regression to the mean: what it is and how to deal
  with it. Int. J. Epidemiol. 34(1):215-220.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

SUBSETS = ("all", "hard")
NAN = float("nan")


# --------------------------------------------------------------------------------------------- validation


def _table(name: str, values) -> np.ndarray:
    """`values` as a float64 array (n_runs, n_cases); ValueError naming `name` if it is not 2-D."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"statistics: the metric table of {name!r} must be 2-D (n_runs, n_cases), got shape {y.shape}")
    return y


def _tables(dice: Mapping[str, object], baseline: str) -> dict[str, np.ndarray]:
    """Validated tables: every value 2-D, the baseline present, the same number of cases everywhere."""
    if baseline not in dice:
        raise ValueError(f"statistics: baseline {baseline!r} is not among the compared names {list(dice)}")
    tables = {str(k): _table(str(k), v) for k, v in dice.items()}
    n_cases = tables[baseline].shape[1]
    wrong = {k: t.shape[1] for k, t in tables.items() if t.shape[1] != n_cases}
    if wrong:
        raise ValueError(
            f"statistics: every table needs the baseline's {n_cases} cases (same cases, same "
            f"order); these differ: {wrong}"
        )
    return tables


# --------------------------------------------------------------------------------------------- hard subset


def hard_subset(baseline, hardness=None) -> tuple[np.ndarray, str]:
    """The hard third of the cases.

    Args:
      baseline: float array (n_runs_b, n_cases), the baseline's metric (NaN where undefined).
      hardness: optional float array (n_cases,), larger = harder, fixed independently of the compared runs.
    Returns:
      (mask, hard_by): mask a bool array (n_cases,) of the ceil(n/3) hard cases among the n *defined* cases
      (metric finite in every baseline run, and hardness finite when given); hard_by is "hardness" (the
      largest hardness) or "baseline run 0" (the lowest metric in the baseline's first run; that run must then
      be left out of the test, see `compare`). Ties are broken by case index, lower index first.
    """
    y = _table("baseline", baseline)
    defined = np.all(np.isfinite(y), axis=0)
    if hardness is not None:
        hard = np.asarray(hardness, dtype=np.float64)
        if hard.shape != (y.shape[1],):
            raise ValueError(
                f"statistics: hardness must have shape ({y.shape[1]},) (one value per case), got {hard.shape}"
            )
        defined &= np.isfinite(hard)
        key, hard_by = -hard, "hardness"
    else:
        key, hard_by = (y[0] if y.shape[0] else np.zeros(y.shape[1])), "baseline run 0"
    idx = np.flatnonzero(defined)
    chosen = idx[np.argsort(key[idx], kind="stable")][: math.ceil(idx.size / 3)]
    mask = np.zeros(y.shape[1], dtype=bool)
    mask[chosen] = True
    return mask, hard_by


# --------------------------------------------------------------------------------------------- the test


def _run_and_residual_ms(y: np.ndarray) -> tuple[float, float]:
    """Within-arm sums of squares of one arm's table (n_runs, n_cases), all finite.

    Returns: (ss_runs, ss_resid): sum over runs of (Ybar_r. - Ybar..)^2 and sum over cells of the two-way
    residual (Y_rc - Ybar_r. - Ybar_.c + Ybar..)^2.
    """
    run_means = y.mean(axis=1)
    resid = y - run_means[:, None] - y.mean(axis=0)[None, :] + y.mean()
    return float(np.sum((run_means - run_means.mean()) ** 2)), float(np.sum(resid**2))


def _satterthwaite(terms: Sequence[tuple[float, float]]) -> float:
    """Satterthwaite df of sum_i t_i for terms (t_i = coefficient x mean square, df_i); t_i may be negative."""
    total = sum(t for t, _ in terms)
    denom = sum(t * t / df for t, df in terms if t != 0.0)
    return total * total / denom if denom > 0 else NAN


def variance_of_difference(a, b) -> dict:
    """Var(D) of the difference of grand means of two arms by the mixed model (module docstring).

    Args:
      a, b: float arrays (n_runs_a, C) and (n_runs_b, C) of the same C cases, all finite, n_runs >= 2, C >= 2.
    Returns:
      {"diff": D, "var": estimated Var(D) (>= 0), "df": Satterthwaite df, "v_c", "s_r", "mse": the three mean
      squares, "s2_b", "s2_ac": the ANOVA component estimates (not truncated, may be < 0; s2_ac is the per-arm
      interaction variance), "floored": True when Var(D) was floored at h MSE / C}.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    (na, c), nb = a.shape, b.shape[0]
    h = 1.0 / na + 1.0 / nb
    d = a.mean(axis=0) - b.mean(axis=0)
    v_c = float(np.var(d, ddof=1))
    ss_ra, ss_ea = _run_and_residual_ms(a)
    ss_rb, ss_eb = _run_and_residual_ms(b)
    df_r, df_e = na + nb - 2, (na + nb - 2) * (c - 1)
    s_r, mse = (ss_ra + ss_rb) / df_r, (ss_ea + ss_eb) / df_e
    terms = [(v_c / c, c - 1), (h * s_r, df_r), (-h * mse / c, df_e)]
    var = sum(t for t, _ in terms)
    if var <= h * mse / c:  # 2 s2_ac / C + h s2_b estimated <= 0: the residual part alone
        terms = [(h * mse / c, df_e)]
        var = h * mse / c
    if var <= (64.0 * np.finfo(np.float64).eps * max(1.0, np.abs(a).max(), np.abs(b).max())) ** 2:
        var, terms = 0.0, []  # round-off of constant data, not variance
    return {
        "diff": float(d.mean()),
        "var": var,
        "df": _satterthwaite(terms) if var > 0 else NAN,
        "v_c": v_c,
        "s_r": s_r,
        "mse": mse,
        "s2_b": s_r - mse / c,
        "s2_ac": (v_c - h * mse) / 2.0,
        "floored": len(terms) == 1,
    }


def mixed_model_test(a, b, *, level: float = 0.95) -> dict:
    """Two-sided test of mean(a) = mean(b) for two arms of runs x cases, cases and runs both random.

    Args:
      a, b: float arrays (n_runs_a, n_cases) and (n_runs_b, n_cases), the same cases in the same order; cases
        with a non-finite value in any run of either arm are dropped.
      level: confidence level of the interval.
    Returns:
      {"n_cases", "n_runs", "n_runs_baseline", "diff" (mean a - b), "se", "df", "ci_low", "ci_high", "p",
      "note"}. p, se, df and the interval are NaN (with a note) when an arm has fewer than 2 runs or fewer than
      2 cases remain; se == 0 (up to round-off) gives p = 1.0 when diff == 0 (interval [0, 0]) and NaN
      otherwise, with a note; a Var(D) floored at the residual part (module docstring) is noted too.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.all(np.isfinite(a), axis=0) & np.all(np.isfinite(b), axis=0)
    a, b = a[:, ok], b[:, ok]
    out = {
        "n_cases": int(ok.sum()),
        "n_runs": int(a.shape[0]),
        "n_runs_baseline": int(b.shape[0]),
        "diff": NAN,
        "se": NAN,
        "df": NAN,
        "ci_low": NAN,
        "ci_high": NAN,
        "p": NAN,
        "note": "",
    }
    if a.shape[0] and b.shape[0] and out["n_cases"]:
        out["diff"] = float(a.mean() - b.mean())
    if a.shape[0] < 2 or b.shape[0] < 2:
        out["note"] = (
            f"fewer than 2 runs (curriculum {a.shape[0]}, baseline {b.shape[0]}): the run variance "
            "cannot be estimated, no test"
        )
        return out
    if out["n_cases"] < 2:
        out["note"] = f"{out['n_cases']} case(s) defined in every run of both arms: no test"
        return out
    v = variance_of_difference(a, b)
    diff, se = v["diff"], math.sqrt(v["var"])
    out.update(diff=diff, se=se, df=v["df"])
    if v["floored"]:
        out["note"] = "run + case-by-method variance estimated <= 0: se from the residual variance alone"
    if se == 0.0:
        if diff == 0.0:
            out.update(p=1.0, ci_low=0.0, ci_high=0.0, note="identical results (zero variance, zero difference)")
        else:
            out["note"] = "zero variance with a nonzero difference: test undefined"
        return out
    q = float(stats.t.ppf(0.5 + level / 2.0, v["df"]))
    out.update(ci_low=diff - q * se, ci_high=diff + q * se, p=float(2.0 * stats.t.sf(abs(diff) / se, v["df"])))
    return out


# --------------------------------------------------------------------------------------------- public API


def compare(dice: Mapping[str, object], baseline: str = "none", hardness=None, *, seed: int = 0) -> list[dict]:
    """Test every curriculum against the baseline on all cases and on the hard third.

    Args:
      dice: name -> float array (n_runs, n_cases) of a per-case test metric, larger = better (Dice; callers pass
        -|TMTV error| for TMTV), one row per training run (seed), NaN where undefined (lesion-free case). Same
        cases in the same order for every name; n_runs may differ between names.
      baseline: the name compared against.
      hardness: optional float array (n_cases,), larger = harder, fixed independently of the compared runs (for
        example a teacher's loss). hard = the ceil(n/3) defined cases with the largest hardness. Without it the
        baseline's first run (row 0) picks the ceil(n/3) defined cases with the lowest metric and is left out
        of the hard test (its baseline arm uses rows 1..), which removes regression to the mean.
      seed: accepted for the contract (resampling procedures); the test is analytic and deterministic, the
        result does not depend on it.
    Returns:
      one dict per (name != baseline, subset in ("all", "hard")), in the order of `dice`'s keys, "all" first:
      {"curriculum", "subset", "n_cases" (cases finite in every run of both arms, in the subset), "n_runs",
      "n_runs_baseline" (runs used), "diff" (mean name minus baseline), "se", "df", "ci_low", "ci_high" (95 %
      interval), "p" (two-sided), "note" ("" when nothing to say), "hard_by" ("hardness" / "baseline run 0" for
      the hard rows, "" for all)}. p, se, df and the interval are NaN, with a note, when an arm has fewer than 2
      runs or fewer than 2 cases remain; the hard row chosen by baseline run 0 also has diff NaN when fewer than
      2 other baseline runs remain.
    Raises:
      ValueError: baseline missing, a table not 2-D, tables with different numbers of cases, hardness of the
      wrong shape.
    """
    del seed  # deterministic procedure; see the docstring
    tables = _tables(dice, baseline)
    base = tables[baseline]
    hard, hard_by = hard_subset(base, hardness)
    base_hard = base if hard_by == "hardness" else base[1:]
    rows = []
    for name, y in tables.items():
        if name == baseline:
            continue
        for subset in SUBSETS:
            if subset == "all":
                res = mixed_model_test(y, base)
            else:
                res = mixed_model_test(y[:, hard], base_hard[:, hard])
                if hard_by != "hardness" and base_hard.shape[0] < 2:
                    res["diff"] = NAN
                    res["note"] = (
                        f"hard cases chosen by baseline run 0, which is left out of the test; "
                        f"{base_hard.shape[0]} other baseline run(s) remain (need 2): no test"
                    )
            rows.append({"curriculum": name, "subset": subset, **res, "hard_by": hard_by if subset == "hard" else ""})
    return rows


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979).

    Args: pvalues: 1-D sequence of p-values; NaN entries stay NaN and are not counted in the number of tests m.
    Returns: float64 array of the same length: sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j))
      (i, j from 1), put back in the input order. Monotone in p, capped at 1. Reject at level alpha where
      adjusted p <= alpha (controls the family-wise error rate).
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, NAN)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if m else scaled
    return out


def minimal_detectable_effect(baseline, n_runs: int | None = None, *, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Smallest true mean difference the design detects with probability `power` (two-sided test at `alpha`).

    The run and residual variances are estimated from the baseline's own table by the two-way ANOVA (run x
    case): s2_e = MSE, s2_b = max(0, S_R - s2_e / C) (module docstring). For a comparison with `n_runs` runs
    per arm on these C cases, h = 2 / n_runs, df = 2 n_runs - 2::

        mde = (t(df, 1 - alpha/2) + t(df, power)) * sqrt(h (s2_b + s2_e / C))

    This assumes no case-by-method interaction (s2_ac = 0), which only adds variance: the MDE is a lower bound.

    Args:
      baseline: float array (n_runs_b, n_cases) of the baseline's per-case metric (NaN where undefined; cases
        not finite in every run are dropped).
      n_runs: runs per arm of the planned comparison (default: the baseline's run count).
      alpha, power: test level and wanted power.
    Returns:
      {"mde", "sd_run" (sqrt s2_b), "sd_case_noise" (sqrt s2_e), "n_runs", "n_cases"}; all but the counts are
      NaN with fewer than 2 runs (baseline or n_runs) or fewer than 2 cases.
    """
    y = _table("baseline", baseline)
    y = y[:, np.all(np.isfinite(y), axis=0)]
    n_b, c = y.shape
    n = n_b if n_runs is None else int(n_runs)
    out = {"mde": NAN, "sd_run": NAN, "sd_case_noise": NAN, "n_runs": n, "n_cases": int(c)}
    if n_b < 2 or n < 2 or c < 2:
        return out
    ss_r, ss_e = _run_and_residual_ms(y)
    s2_e = ss_e / ((n_b - 1) * (c - 1))
    s2_b = max(0.0, ss_r / (n_b - 1) - s2_e / c)
    df = 2 * n - 2
    se = math.sqrt((2.0 / n) * (s2_b + s2_e / c))
    mult = float(stats.t.ppf(1.0 - alpha / 2.0, df) + stats.t.ppf(power, df))
    out.update(mde=mult * se, sd_run=math.sqrt(s2_b), sd_case_noise=math.sqrt(s2_e))
    return out


# --------------------------------------------------------------------------------------------- simulation


def simulate_tables(
    rng: np.random.Generator,
    n_cases: int = 40,
    n_runs: int = 3,
    n_runs_baseline: int | None = None,
    *,
    mean: float = 0.65,
    sd_case: float = 0.15,
    sd_run: float = 0.02,
    sd_noise: float = 0.08,
    sd_interaction: float = 0.0,
    effect_hard: float = 0.0,
    hardness_noise: float = 0.0,
):
    """One simulated comparison of a curriculum "a" with the baseline "none".

    Model: Y_mrc = clip(mean + a_c + (ac)_mc + b_mr + e_mrc, 0, 1) (Dice-like), a_c ~ N(0, sd_case),
    (ac)_mc ~ N(0, sd_interaction), b_mr ~ N(0, sd_run), e_mrc ~ N(0, sd_noise). The latent difficulty is
    -a_c; the truly hard cases are the ceil(n_cases/3) with the largest difficulty, where arm "a" gets
    `effect_hard` added (before clipping).

    Returns:
      (dice, hardness, truly_hard): {"a": (n_runs, n_cases), "none": (n_runs_baseline, n_cases)} float64
      arrays; hardness float (n_cases,) = difficulty + N(0, hardness_noise); truly_hard bool (n_cases,).
    """
    n_b = n_runs if n_runs_baseline is None else n_runs_baseline
    case = rng.normal(0.0, sd_case, n_cases)
    truly_hard = np.zeros(n_cases, dtype=bool)
    truly_hard[np.argsort(case, kind="stable")[: math.ceil(n_cases / 3)]] = True

    def arm(n: int, shift: np.ndarray) -> np.ndarray:
        y = (
            mean
            + case
            + shift
            + rng.normal(0.0, sd_interaction, n_cases)[None, :]
            + rng.normal(0.0, sd_run, n)[:, None]
            + rng.normal(0.0, sd_noise, (n, n_cases))
        )
        return np.clip(y, 0.0, 1.0)

    dice = {"none": arm(n_b, np.zeros(n_cases)), "a": arm(n_runs, effect_hard * truly_hard)}
    hardness = -case + rng.normal(0.0, hardness_noise, n_cases)
    return dice, hardness, truly_hard


def simulate(
    n_sims: int = 2000,
    n_cases: int = 40,
    n_runs: int = 3,
    *,
    sd_case: float = 0.15,
    sd_run: float = 0.02,
    sd_noise: float = 0.08,
    sd_interaction: float = 0.0,
    effect_hard: float = 0.0,
    use_hardness: bool = True,
    hardness_noise: float = 0.0,
    n_runs_baseline: int | None = None,
    alpha: float = 0.05,
    rng_seed: int = 0,
) -> dict:
    """Error rates of `compare` on `n_sims` simulated comparisons (`simulate_tables`; deterministic given rng_seed).

    Args: as `simulate_tables`; use_hardness passes the (noisy) latent difficulty as `hardness`, otherwise the
      baseline's first run picks the hard cases; alpha: the rejection level counted.
    Returns:
      {"rate_all", "rate_hard": fraction of simulations with p < alpha (a false-positive rate when
      effect_hard = 0, with or without the zero-mean interaction; power otherwise), "coverage_all": fraction
      whose "all" 95 % interval contains 0 (meaningful under the null), "mean_diff_all", "mean_diff_hard": mean
      estimated differences, "n_sims", "n_undefined": simulations with a NaN p (counted as not rejected)}.
    """
    rng = np.random.default_rng(rng_seed)
    p = np.empty((n_sims, 2))
    diff = np.empty((n_sims, 2))
    covered = np.empty(n_sims, dtype=bool)
    for i in range(n_sims):
        dice, hardness, _ = simulate_tables(
            rng,
            n_cases,
            n_runs,
            n_runs_baseline,
            sd_case=sd_case,
            sd_run=sd_run,
            sd_noise=sd_noise,
            sd_interaction=sd_interaction,
            effect_hard=effect_hard,
            hardness_noise=hardness_noise,
        )
        rows = compare(dice, "none", hardness if use_hardness else None)
        p[i] = [r["p"] for r in rows]
        diff[i] = [r["diff"] for r in rows]
        covered[i] = rows[0]["ci_low"] <= 0.0 <= rows[0]["ci_high"]
    rejected = np.nan_to_num(p, nan=1.0) < alpha
    return {
        "rate_all": float(rejected[:, 0].mean()),
        "rate_hard": float(rejected[:, 1].mean()),
        "coverage_all": float(covered.mean()),
        "mean_diff_all": float(np.nanmean(diff[:, 0])),
        "mean_diff_hard": float(np.nanmean(diff[:, 1])),
        "n_sims": int(n_sims),
        "n_undefined": int(np.isnan(p).any(axis=1).sum()),
    }


# Scenarios of docs/statistics.md: name -> `simulate` keyword arguments (Dice-like, 40 cases, case s.d. 0.15,
# per-case noise s.d. 0.08; the first four are the nulls the tests check).
SCENARIOS: dict[str, dict] = {
    "null, run s.d. 0.02, 3 runs, hardness": dict(n_runs=3),
    "null, run s.d. 0.02, 3 runs, baseline run 0": dict(n_runs=3, use_hardness=False),
    "null, interaction s.d. 0.03, no run effect, 3 runs, hardness": dict(n_runs=3, sd_run=0.0, sd_interaction=0.03),
    "null, interaction s.d. 0.03, no run effect, 3 runs, baseline run 0": dict(
        n_runs=3, sd_run=0.0, sd_interaction=0.03, use_hardness=False
    ),
    "null, noise only (no run effect, no interaction), 3 runs, hardness": dict(n_runs=3, sd_run=0.0),
    "null, run s.d. 0.02, 2 runs, hardness": dict(n_runs=2),
    "null, run s.d. 0.02, 5 runs, hardness": dict(n_runs=5),
    "null, run s.d. 0.02, 3 runs, hardness with noise s.d. 0.1": dict(n_runs=3, hardness_noise=0.1),
    "+0.05 on the hard third, 3 runs, hardness": dict(n_runs=3, effect_hard=0.05),
    "+0.05 on the hard third, 5 runs, hardness": dict(n_runs=5, effect_hard=0.05),
    "+0.05 on the hard third, 5 runs, baseline run 0": dict(n_runs=5, effect_hard=0.05, use_hardness=False),
}


def simulation_table(n_sims: int = 20000, rng_seed: int = 2026) -> str:
    """Markdown table of `simulate` over `SCENARIOS` (the table of docs/statistics.md; deterministic).

    Args: n_sims: simulations per scenario; rng_seed: `simulate`'s seed, the same for every scenario.
    Returns: the table as a string: per scenario p < 0.05 rate (all, hard), coverage of 0 by the "all" 95 %
      interval, mean hard-subset difference.
    """
    lines = [
        f"| scenario ({n_sims} sims each, rng_seed {rng_seed}) | p < 0.05, all | p < 0.05, hard "
        "| CI covers 0, all | mean diff, hard |",
        "|---|---|---|---|---|",
    ]
    for name, kwargs in SCENARIOS.items():
        r = simulate(n_sims, rng_seed=rng_seed, **kwargs)
        lines.append(
            f"| {name} | {100 * r['rate_all']:.1f} % | {100 * r['rate_hard']:.1f} % "
            f"| {100 * r['coverage_all']:.1f} % | {r['mean_diff_hard']:+.4f} |"
        )
    return "\n".join(lines)


#: The grid of `power_table`: true ΔDice on the hard third, test cases (the hard third is ceil(n/3) of them),
#: runs (seeds) per arm.
POWER_GRID = {"effects": (0.03, 0.05, 0.10), "cases": (40, 100, 200), "runs": (3, 5, 10)}


def power_table(
    n_sims: int = 2000,
    rng_seed: int = 2026,
    *,
    sd_run: float = 0.02,
    sd_noise: float = 0.08,
    sd_case: float = 0.15,
    n_curricula: int = 8,
    grid: Mapping[str, Sequence] | None = None,
) -> str:
    """Markdown table: power of the hard-case test (`compare` with an independent hardness) to detect a true
    ΔDice on the truly hard third, per effect, number of test cases and runs per arm (`simulate`, the same
    rng_seed in every cell; deterministic).

    Two levels: 5 % (one curriculum against the baseline) and 5 % / `n_curricula` (the threshold Holm's first
    step applies to the smallest p among `n_curricula` compared curricula: the power when one curriculum has
    the effect and the others none). The variances (run, per-case noise, case) are `simulate`'s; pass those
    measured on your own baseline runs (`minimal_detectable_effect` reports sd_run and sd_case_noise).

    Args: n_sims: simulations per cell; grid: {"effects", "cases", "runs"} (default POWER_GRID).
    Returns: the table as a string, one row per (effect, cases, runs).
    """
    g = {**POWER_GRID, **(grid or {})}
    holm_alpha = 0.05 / max(1, int(n_curricula))
    lines = [
        f"| true ΔDice, hard third | test cases (hard) | runs per arm | power, p < 0.05 | power, p < {holm_alpha:.4g} "
        f"(Holm, {n_curricula} curricula) |",
        "|---|---|---|---|---|",
    ]
    for effect in g["effects"]:
        for n_cases in g["cases"]:
            for n_runs in g["runs"]:
                kw = dict(
                    n_cases=int(n_cases),
                    n_runs=int(n_runs),
                    effect_hard=float(effect),
                    sd_run=sd_run,
                    sd_noise=sd_noise,
                    sd_case=sd_case,
                    rng_seed=rng_seed,
                )
                one = simulate(n_sims, **kw)["rate_hard"]
                holm_first = simulate(n_sims, alpha=holm_alpha, **kw)["rate_hard"]
                lines.append(
                    f"| {effect:+.2f} | {n_cases} ({math.ceil(n_cases / 3)}) | {n_runs} | {100 * one:.0f} % "
                    f"| {100 * holm_first:.0f} % |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m clips_jax.experiments.statistics [N_SIMS [RNG_SEED]]                 error rates (SCENARIOS)
    # python -m clips_jax.experiments.statistics power [N_SIMS [RNG_SEED [SD_RUN [SD_NOISE]]]]   power grid
    import sys

    args = sys.argv[1:]
    if args[:1] == ["power"]:
        nums = args[1:5]
        kw = dict(zip(("sd_run", "sd_noise"), (float(a) for a in nums[2:4])))
        print(power_table(*(int(a) for a in nums[:2]), **kw))
    else:
        print(simulation_table(*(int(a) for a in args[:2])))
