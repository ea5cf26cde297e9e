"""Scaling-law fits with intervals that carry every noise source, a lack-of-fit test and a
held-out check.

Forms, fitted to *error* (1 - accuracy or 1 - F1):

- saturating power law in one variable x (base-model size N, LoRA rank r, training examples D,
  trainable parameters):      error = E + A * (x / x0)^-alpha
- the multiplicative joint law of Zhang et al. (ICLR 2024):
                              error = E + A * (N / N0)^-alpha * (D / D0)^-beta
- the additive joint law (Chinchilla's form, the one this project's design states):
                              error = E + A * (N / N0)^-alpha + B * (D / D0)^-beta

x0 (N0, D0) is the smallest x observed, so A is the reducible error there. For given exponents
the coefficients are a weighted non-negative least-squares solve (the floor E is never
negative); the exponents come from a grid search refined by a bounded optimiser.

The noise model of one point (one x, averaged over its seeds):
- seed variance: pooled over every point of the series (the seeds of one point are too few to
  estimate it: with 2 seeds a bootstrap of their values halves the variance of a mean), with
  its own uncertainty (the pooled variance is redrawn from its scaled chi-square in every
  replicate);
- dev-set sampling noise: the dev set is a sample too. Every point of a series is scored on the
  same dev examples, so this noise is largely common to all points: it moves the level (E) more
  than the shape. Where the records carry per-example dev statistics (`dev_example_stats`,
  written by every run since they were added), the dev examples are resampled with
  replacement, the same examples for every point and seed of a replicate, and each run's metric
  recomputed: exact, correlations included. Older records lack them; there it enters as a shift
  common to all points of a replicate, with the binomial variance m(1 - m) / n_dev of the mean
  metric (for F1-type metrics an approximation, with n_dev the number of dev examples);
- misfit: a lack-of-fit F test compares the points' scatter around the law with the pure seed
  error; where the law misfits (mean square ratio > 1), the seed noise of the replicates is
  inflated by that ratio, so the interval widens instead of pretending the law is exact.

Intervals are percentiles of a parametric bootstrap around the fitted law under that noise
model. A law is *supported* only when: at least 4 distinct x values (of one model lineage, for
size laws; decided by the caller), the lack-of-fit test passes (p >= 0.05), the exponents'
intervals stay clear of zero and of the search bound (an exponent the points cannot pin down),
the law beats a flat line (F test, p < 0.05), and the held-out
check passes (the law fitted without the largest x predicts it within its 95% band). Otherwise
`Fit.verdict` says why and reports show the points instead of a law.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar, nnls
from scipy.stats import f as f_dist

ALPHA_GRID = np.concatenate([np.linspace(0.0, 0.1, 11), np.linspace(0.1, 3.0, 59)[1:]])
MIN_POINTS = 4  # distinct x values for a law to be claimed


@dataclass(frozen=True)
class HeldOut:
    """The law fitted without one x value, predicting it."""

    x: tuple[float, ...]
    observed: float  # mean error at the held-out x
    predicted: float
    band: tuple[float, float]  # 95% prediction band (law uncertainty + the point's own noise)

    @property
    def covered(self) -> bool:
        return self.band[0] <= self.observed <= self.band[1]

    @property
    def error(self) -> float:
        return self.observed - self.predicted


@dataclass(frozen=True)
class Fit:
    """A fitted law: the point estimate, 95% intervals, tests, and whether the data bear it."""

    form: str  # "saturating", "pure" (E fixed at 0), "joint" (multiplicative) or "additive"
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    x0: tuple[float, ...]
    n_points: int  # distinct x values (cells averaged over seeds)
    rmse: float
    verdict: str  # "supported" or the reason it is not
    p_flat: float | None = None  # F test: the law explains more than a flat line
    p_lack_of_fit: float | None = None  # F test: misfit against pure seed error
    held_out: tuple[HeldOut, ...] = ()
    e_sensitivity: dict[str, tuple[float, float]] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)  # the noise model's figures
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def supported(self) -> bool:
        return self.verdict == "supported"

    def predict(self, *x: float | np.ndarray) -> np.ndarray:
        return _predict(self.form, self.params, self.x0, *x)

    def describe(self) -> str:
        """One line for a report: the law with intervals, or why there is none."""
        if not self.supported:
            return f"not supported: {self.verdict}"
        show = ", ".join(f"{k} = {v:.3g} [{self.intervals[k][0]:.3g}, {self.intervals[k][1]:.3g}]"
                         for k, v in self.params.items())
        kind = {"pure": "pure power law (E = 0)", "saturating": "saturating power law",
                "joint": "multiplicative joint law", "additive": "additive joint law"}[self.form]
        return f"{kind}: {show} (rmse {self.rmse:.4f}, {self.n_points} points)"


def format_p(p: float | None) -> str:
    """p-values at a precision a reader can use."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


# ----------------------------------------------------------------------------------------------
# Laws and their point fits.


def _predict(form: str, p: Mapping[str, float], x0: Sequence[float],
             *x: float | np.ndarray) -> np.ndarray:
    if form == "joint":
        n, d = (np.asarray(v, dtype=float) for v in x)
        return p["E"] + p["A"] * (n / x0[0]) ** -p["alpha"] * (d / x0[1]) ** -p["beta"]
    if form == "additive":
        n, d = (np.asarray(v, dtype=float) for v in x)
        return p["E"] + p["A"] * (n / x0[0]) ** -p["alpha"] + p["B"] * (d / x0[1]) ** -p["beta"]
    return p["E"] + p["A"] * (np.asarray(x[0], dtype=float) / x0[0]) ** -p["alpha"]


def _nnls(columns: list[np.ndarray], y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted non-negative least squares; returns (coefficients, weighted sse)."""
    root = np.sqrt(w)
    design = np.column_stack(columns) * root[:, None]
    coef, residual_norm = nnls(design, y * root)
    return coef, float(residual_norm**2)


def _fit_single(xs: np.ndarray, y: np.ndarray, w: np.ndarray, x0: float, form: str,
                fixed_e: float | None = None) -> dict[str, float]:
    scaled = xs / x0

    def solve(alpha: float) -> tuple[np.ndarray, float]:
        if fixed_e is not None:
            coef, sse = _nnls([scaled**-alpha], y - fixed_e, w)
            return np.array([fixed_e, coef[0]]), sse
        if form == "pure":
            coef, sse = _nnls([scaled**-alpha], y, w)
            return np.array([0.0, coef[0]]), sse
        return _nnls([np.ones_like(scaled), scaled**-alpha], y, w)

    losses = [solve(a)[1] for a in ALPHA_GRID]
    i = int(np.argmin(losses))
    lo, hi = ALPHA_GRID[max(0, i - 1)], ALPHA_GRID[min(len(ALPHA_GRID) - 1, i + 1)]
    alpha = float(ALPHA_GRID[i])
    if hi > lo:
        refined = float(minimize_scalar(lambda a: solve(a)[1], bounds=(lo, hi),
                                        method="bounded").x)
        if solve(refined)[1] <= losses[i]:
            alpha = refined
    coef, _ = solve(alpha)
    return {"E": float(coef[0]), "A": float(coef[1]), "alpha": alpha}


def _fit_pair(n: np.ndarray, d: np.ndarray, y: np.ndarray, w: np.ndarray,
              x0: tuple[float, float], form: str) -> dict[str, float]:
    sn, sd = n / x0[0], d / x0[1]

    top = float(ALPHA_GRID[-1])  # the same bound as the single-variable search

    def solve(ab: Sequence[float]) -> tuple[np.ndarray, float]:
        a, b = min(max(0.0, ab[0]), top), min(max(0.0, ab[1]), top)
        if form == "joint":
            return _nnls([np.ones_like(sn), sn**-a * sd**-b], y, w)
        return _nnls([np.ones_like(sn), sn**-a, sd**-b], y, w)

    coarse = ALPHA_GRID[::3]
    best = min(((a, b) for a in coarse for b in coarse), key=lambda ab: solve(ab)[1])
    refined = minimize(lambda ab: solve(ab)[1], np.array(best), method="Nelder-Mead",
                       options={"xatol": 1e-4, "fatol": 1e-14})
    a, b = (min(max(0.0, v), top) for v in refined.x) if refined.fun <= solve(best)[1] \
        else best
    coef, _ = solve((a, b))
    out = {"E": float(coef[0]), "A": float(coef[1]), "alpha": float(a), "beta": float(b)}
    if form == "additive":
        out = {"E": out["E"], "A": out["A"], "B": float(coef[2]), "alpha": out["alpha"],
               "beta": out["beta"]}
    return out


# ----------------------------------------------------------------------------------------------
# The noise model.


@dataclass
class Series:
    """Per-seed observations of one law, grouped by x (a float, or an (N, D) pair)."""

    keys: list  # distinct x, sorted
    groups: dict  # x -> per-seed errors
    dev_var: float  # variance of every point's mean from dev-set sampling (common to all)
    dev: "DevResampler | None" = None  # per-example dev statistics, where every run has them

    @classmethod
    def of(cls, x: Sequence, error: Sequence[float], dev_var: Sequence[float] | None = None,
           dev: "DevStats | None" = None) -> "Series":
        groups: dict = {}
        runs: dict = {}
        for i, (k, v) in enumerate(zip(x, error)):
            k = tuple(map(float, k)) if isinstance(k, (tuple, list)) else float(k)
            groups.setdefault(k, []).append(float(v))
            if dev is not None:
                runs.setdefault(k, []).append(dev.stats[i])
        var = float(np.mean(dev_var)) if dev_var is not None and len(dev_var) else 0.0
        keys = sorted(groups)
        resampler = DevResampler.of(dev, keys, runs) if dev is not None else None
        return cls(keys, groups, var, resampler)

    @property
    def means(self) -> np.ndarray:
        return np.array([np.mean(self.groups[k]) for k in self.keys])

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(self.groups[k]) for k in self.keys], dtype=float)

    @property
    def pure_error(self) -> tuple[float, int]:
        """(pooled seed variance of one run, its degrees of freedom)."""
        dof = int(sum(len(self.groups[k]) - 1 for k in self.keys))
        ss = sum(float(np.sum((np.array(self.groups[k]) - np.mean(self.groups[k])) ** 2))
                 for k in self.keys)
        return (ss / dof if dof else float("nan")), dof

    def subset(self, keep: Callable[[object], bool]) -> "Series":
        keys = [k for k in self.keys if keep(k)]
        dev = self.dev.subset([i for i, k in enumerate(self.keys) if keep(k)]) \
            if self.dev is not None else None
        return Series(keys, {k: self.groups[k] for k in keys}, self.dev_var, dev)

    def dev_noise(self, n_boot: int, rng: np.random.Generator) -> np.ndarray:
        """n_boot x points: each point's mean error moved by dev-set sampling."""
        if self.dev is not None:
            return self.dev.sample(n_boot, rng)
        # Common to every point of the series (the same dev examples).
        return np.repeat(rng.normal(0.0, np.sqrt(self.dev_var), size=(n_boot, 1)),
                         len(self.keys), axis=1)

    def dev_point_var(self) -> np.ndarray:
        """Each point's dev-set sampling variance (for a held-out point's own noise)."""
        if self.dev is not None:
            return self.dev.sample(300, np.random.default_rng(5)).var(axis=0)
        return np.full(len(self.keys), self.dev_var)


@dataclass(frozen=True)
class DevStats:
    """Per observation, its per-example dev statistics (examples x k), and how a task turns
    their column sums into its metric, and a metric into the error that is fitted."""

    stats: Sequence[np.ndarray]
    metric: Callable[[np.ndarray, int], float]
    error: Callable[[float], float]


@dataclass
class DevResampler:
    """Resamples the dev examples, the same ones for every run of a series."""

    points: list[list[np.ndarray]]  # per point, per seed: examples x k
    metric: Callable[[np.ndarray, int], float]
    error: Callable[[float], float]

    @classmethod
    def of(cls, dev: DevStats, keys: list, runs: dict) -> "DevResampler":
        return cls([runs[k] for k in keys], dev.metric, dev.error)

    def subset(self, index: list[int]) -> "DevResampler":
        return DevResampler([self.points[i] for i in index], self.metric, self.error)

    def sample(self, n_boot: int, rng: np.random.Generator) -> np.ndarray:
        n = len(self.points[0][0])
        observed = [[self.error(self.metric(run.sum(0), n)) for run in point]
                    for point in self.points]
        out = np.zeros((n_boot, len(self.points)))
        for b in range(n_boot):
            weights = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(float)
            for j, point in enumerate(self.points):
                moved = [self.error(self.metric(weights @ run, n)) - o
                         for run, o in zip(point, observed[j])]
                out[b, j] = float(np.mean(moved))
        return out


def _lack_of_fit(series: Series, fitted: np.ndarray, n_params: int) -> tuple[float, float | None]:
    """(mean-square ratio of misfit to pure seed error, p-value of the F test). The ratio is 1
    where the test cannot be made (no spare points or no replicate seeds)."""
    s2, dof = series.pure_error
    k = len(series.keys)
    if dof == 0 or k <= n_params or not s2 > 0:
        return 1.0, None
    ms_lof = float(np.sum(series.counts * (series.means - fitted) ** 2)) / (k - n_params)
    ratio = ms_lof / s2
    return ratio, float(f_dist.sf(ratio, k - n_params, dof))


def _flat_p(series: Series, fitted: np.ndarray, n_params: int) -> float | None:
    """F test of the law against a flat line (the mean), with the pure seed error: extra sum of
    squares of the law's n_params - 1 extra parameters."""
    s2, dof = series.pure_error
    if dof == 0 or not s2 > 0:
        return None
    w = series.counts
    means = series.means
    flat = float(np.sum(w * (means - np.average(means, weights=w)) ** 2))
    law = float(np.sum(w * (means - fitted) ** 2))
    extra = max(1, n_params - 1)
    gain = max(flat - law, 0.0) / extra
    return float(f_dist.sf(gain / s2, extra, dof))


def _replicates(series: Series, fitted: np.ndarray, inflation: float, n_boot: int,
                rng: np.random.Generator) -> np.ndarray:
    """n_boot x points matrix of simulated point means around the fitted law."""
    s2, dof = series.pure_error
    counts = series.counts
    k = len(series.keys)
    # The seed variance itself is uncertain with few seeds: redraw it from its scaled chi-square.
    s2_draws = s2 * dof / rng.chisquare(dof, size=n_boot) if dof else np.zeros(n_boot)
    seed_noise = rng.normal(size=(n_boot, k)) * np.sqrt(s2_draws[:, None] * inflation / counts)
    return fitted[None, :] + seed_noise + series.dev_noise(n_boot, rng)


# ----------------------------------------------------------------------------------------------
# Fits with intervals, tests and the held-out check.


def fit_power_law(x: Sequence[float], error: Sequence[float], *,
                  dev_var: Sequence[float] | None = None, dev: DevStats | None = None,
                  n_boot: int = 1000, seed: int = 0, held_out: bool = True) -> Fit:
    """Fit error = E + A * (x/x0)^-alpha to per-seed observations (x repeats across seeds).
    `dev_var`: per observation, the sampling variance of its metric from the finite dev set;
    `dev`: per observation, its per-example dev statistics (resampled instead)."""
    return _fit_series(Series.of(list(x), error, dev_var, dev), n_boot, seed, held_out)


def _fit_series(series: Series, n_boot: int, seed: int, held_out: bool,
                form: str | None = None) -> Fit:
    """`form`: the law to fit; by default saturating from 4 points on, pure with 3 (the
    held-out refit keeps the full fit's form, so the check tests the law that is claimed)."""
    k = len(series.keys)
    x0 = (float(series.keys[0]) if k else 1.0,)
    if k < 3:
        return Fit("saturating", {}, {}, x0, k, float("nan"),
                   f"too few points ({k} distinct values; at least {MIN_POINTS} needed)")
    form = form or ("saturating" if k >= MIN_POINTS else "pure")
    xs = np.array(series.keys, dtype=float)

    def fit(y: np.ndarray, w: np.ndarray, fixed_e: float | None = None) -> dict[str, float]:
        return _fit_single(xs, y, w, x0[0], form, fixed_e)

    fit_obj = _fit_with_noise(series, form, fit, lambda p: _predict(form, p, x0, xs),
                              3 if form == "saturating" else 2, x0, n_boot, seed)
    if fit_obj.params and form == "saturating":
        fit_obj = _with_e_sensitivity(fit_obj, series, fit)
    if held_out and k >= 3:
        largest = series.keys[-1]
        fit_obj = _with_held_out(fit_obj, series, [largest], lambda s: _fit_series(
            s, max(200, n_boot // 2), seed + 1, held_out=False, form=form))
    return _final_verdict(fit_obj, enough=k >= MIN_POINTS)


def fit_joint_law(n: Sequence[float], d: Sequence[float], error: Sequence[float], *,
                  form: str = "joint", dev_var: Sequence[float] | None = None,
                  dev: DevStats | None = None, n_boot: int = 500, seed: int = 0,
                  held_out: bool = True) -> Fit:
    """Fit the multiplicative (form="joint") or additive (form="additive") law in (N, D)."""
    return _fit_pair_series(Series.of(list(zip(map(float, n), map(float, d))), error, dev_var,
                                      dev), form, n_boot, seed, held_out)


def _fit_pair_series(series: Series, form: str, n_boot: int, seed: int, held_out: bool) -> Fit:
    keys = series.keys
    ns = np.array([k[0] for k in keys])
    ds = np.array([k[1] for k in keys])
    x0 = (float(ns.min()) if keys else 1.0, float(ds.min()) if keys else 1.0)
    distinct_n, distinct_d = len(set(ns.tolist())), len(set(ds.tolist()))
    n_params = 4 if form == "joint" else 5
    if len(keys) < n_params + 1 or distinct_n < 2 or distinct_d < 2:
        return Fit(form, {}, {}, x0, len(keys), float("nan"),
                   f"too few points ({len(keys)} cells over {distinct_n} sizes and {distinct_d} "
                   f"data sizes; at least {n_params + 1} cells over 2 of each needed)")

    def fit(y: np.ndarray, w: np.ndarray, fixed_e: float | None = None) -> dict[str, float]:
        return _fit_pair(ns, ds, y, w, x0, form)

    fit_obj = _fit_with_noise(series, form, fit, lambda p: _predict(form, p, x0, ns, ds),
                              n_params, x0, n_boot, seed)
    if held_out:
        # Hold out the largest data size at every model size: extrapolation along D.
        held = [k for k in keys if k[1] == ds.max()]
        fit_obj = _with_held_out(fit_obj, series, held, lambda s: _fit_pair_series(
            s, form, max(100, n_boot // 2), seed + 1, held_out=False))
    return _final_verdict(fit_obj, enough=True)


def _fit_with_noise(series: Series, form: str, fit, predict, n_params: int,
                    x0: tuple[float, ...], n_boot: int, seed: int) -> Fit:
    s2, dof = series.pure_error
    counts = series.counts
    means = series.means
    # Weights: inverse variance of each point's mean (seed noise only: the dev-set noise is
    # common to all points and does not change their relative weight).
    w = counts / (s2 if dof and s2 > 0 else 1.0)
    point = fit(means, w)
    fitted = predict(point)
    rmse = float(np.sqrt(np.mean((means - fitted) ** 2)))
    ratio, p_lof = _lack_of_fit(series, fitted, n_params)
    p_flat = _flat_p(series, fitted, n_params)
    noise = {"seed_sd": float(np.sqrt(s2)) if dof else float("nan"), "seed_dof": dof,
             "dev_sd": float(np.sqrt(series.dev_var)), "misfit_ratio": ratio}
    if dof == 0:
        return Fit(form, point, {}, x0, len(series.keys), rmse,
                   "one seed per point: no estimate of the noise, so no interval",
                   p_flat, p_lof, noise=noise)
    rng = np.random.default_rng(seed)
    sims = _replicates(series, fitted, max(1.0, ratio), n_boot, rng)
    boots = [fit(row, w) for row in sims]
    samples = {k: np.array([b[k] for b in boots]) for k in point}
    intervals = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
                 for k, v in samples.items()}
    return Fit(form, point, intervals, x0, len(series.keys), rmse, "", p_flat, p_lof,
               noise=noise, samples=samples)


def _with_e_sensitivity(fit: Fit, series: Series, refit) -> Fit:
    """How the exponent moves when the floor E is pinned at 0 and at its interval's ends."""
    if not fit.intervals:
        return fit
    s2, dof = series.pure_error
    w = series.counts / (s2 if dof and s2 > 0 else 1.0)
    lo, hi = fit.intervals["E"]
    floor = float(series.means.min())
    alphas = {}
    for label, e in (("E = 0", 0.0), (f"E = {lo:.3g}", lo), (f"E = {hi:.3g}", hi)):
        if e < floor:  # a floor above the smallest error is not a floor
            alphas[label] = refit(series.means, w, fixed_e=e)["alpha"]
    values = list(alphas.values()) + [fit.params["alpha"]]
    return Fit(**{**fit.__dict__, "e_sensitivity": {
        "alpha": (float(min(values)), float(max(values))),
        **{k: (v, v) for k, v in alphas.items()}}})


def _with_held_out(fit: Fit, series: Series, held: list, refit) -> Fit:
    """Refit without the `held` x values and predict them: the 95% band is the refit law's
    bootstrap spread at that x plus the held point's own noise (seed and dev set)."""
    rest = series.subset(lambda k: k not in held)
    if len(rest.keys) < 3:
        return fit
    partial = refit(rest)
    if not partial.params or not partial.samples:
        return fit
    s2, dof = series.pure_error
    dev_var = dict(zip(series.keys, series.dev_point_var()))
    checks = []
    rng = np.random.default_rng(7)
    draws = {k: v for k, v in partial.samples.items()}
    n_draws = len(next(iter(draws.values())))
    for k in held:
        x = k if isinstance(k, tuple) else (k,)
        centre = float(partial.predict(*x))
        law = np.array([float(_predict(partial.form, {p: draws[p][i] for p in draws},
                                       partial.x0, *x)) for i in range(n_draws)])
        own = rng.normal(0, np.sqrt((s2 if dof else 0.0) / len(series.groups[k])
                                    + dev_var[k]), size=n_draws)
        spread = law + own
        # An error (or perplexity) is never negative: the band stops at 0.
        band = (max(0.0, float(np.percentile(spread, 2.5))), float(np.percentile(spread, 97.5)))
        checks.append(HeldOut(x, float(np.mean(series.groups[k])), centre, band))
    return Fit(**{**fit.__dict__, "held_out": tuple(checks)})


def _final_verdict(fit: Fit, enough: bool) -> Fit:
    if fit.verdict:  # already decided (no noise estimate)
        return fit
    verdict = "supported"
    exponents = [k for k in ("alpha", "beta") if k in fit.params]
    if not enough:
        verdict = (f"{fit.n_points} points: at least {MIN_POINTS} distinct values are needed "
                   "to test a law (with 3 the floor E cannot be told from the exponent)")
    elif fit.p_lack_of_fit is not None and fit.p_lack_of_fit < 0.05:
        verdict = (f"the law misfits the points beyond their seed noise (lack-of-fit F test, "
                   f"{format_p(fit.p_lack_of_fit)})")
    elif fit.p_flat is not None and fit.p_flat >= 0.05:
        verdict = f"a flat line fits as well within the seed noise ({format_p(fit.p_flat)})"
    else:
        for k in exponents:
            # The optimiser cannot go below 0; a lower bound at (or within a hair of) 0 means
            # the data are consistent with "no effect".
            if fit.intervals[k][0] <= 1e-3:
                verdict = (f"the interval of {k} reaches zero ({fit.intervals[k][0]:.3g} to "
                           f"{fit.intervals[k][1]:.3g}): no measurable scaling along this axis")
                break
            if fit.intervals[k][1] >= ALPHA_GRID[-1] - 1e-6:
                verdict = (f"{k} is not identified: its interval ({fit.intervals[k][0]:.3g} to "
                           f"{fit.intervals[k][1]:.3g}) runs to the search bound "
                           f"{ALPHA_GRID[-1]:g} (the points cannot tell a fast approach to a "
                           "floor from a slow power law)")
                break
        if verdict == "supported" and fit.intervals["A"][0] <= 1e-6:
            verdict = ("the interval of A reaches zero: the error does not depend on this axis "
                       "within the noise")
        if verdict == "supported" and fit.held_out and not all(h.covered for h in fit.held_out):
            missed = [h for h in fit.held_out if not h.covered]
            verdict = (f"the held-out check fails: fitted without the largest x, the law "
                       f"predicts {missed[0].predicted:.4f} there, outside its 95% band "
                       f"[{missed[0].band[0]:.4f}, {missed[0].band[1]:.4f}] around the "
                       f"observed {missed[0].observed:.4f}")
    return Fit(**{**fit.__dict__, "verdict": verdict})


def binomial_var(metric: float, n: int) -> float:
    """Sampling variance of a mean-of-examples metric in [0, 1] on n dev examples."""
    m = min(max(float(metric), 0.0), 1.0)
    return m * (1.0 - m) / max(1, int(n))
