"""Scaling-law fits with bootstrap confidence intervals.

Two forms, fitted to *error* (1 - accuracy or 1 - F1):

- saturating power law in one variable x (base-model size N, LoRA rank r, training examples D):
      error = E + A * (x / x0)^-alpha
- the multiplicative joint law of Zhang et al. (ICLR 2024, "When Scaling Meets LLM Finetuning"):
      error = E + A * (N / N0)^-alpha * (D / D0)^-beta

x0 (N0, D0) is the smallest x observed, so A is the reducible error at the smallest point. The
exponents are found by a grid search refined by a bounded optimiser; for given exponents E and A
are a non-negative least-squares solve, so the search never lands on a negative error floor.

Uncertainty: the fit is repeated on bootstrap resamples that draw, for every x, the seeds'
values with replacement (the seed is the unit of replication). A fit is *supported* only when
(1) it explains significantly more than a flat line: the drop in squared error against the
constant model, divided by the seed-to-seed variance of a mean, is tested as chi-square with one
degree of freedom per extra parameter, p < 0.05; (2) the exponents' intervals stay clear of zero;
and (3) there are at least two seeds per point (else there is no interval at all). Otherwise
`Fit.verdict` says why, and reports print that instead of a number. With exactly three
points the floor E cannot be identified, so a pure power law (E = 0) is fitted and labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar, nnls
from scipy.stats import chi2

ALPHA_GRID = np.concatenate([np.linspace(0.0, 0.1, 11), np.linspace(0.1, 3.0, 59)[1:]])


@dataclass(frozen=True)
class Fit:
    """A fitted law: the point estimate, percentile intervals, and whether the data support it."""

    form: str  # "saturating", "pure" (E fixed at 0) or "joint"
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # 95% bootstrap percentile intervals
    x0: tuple[float, ...]  # reference scale(s) of the variable(s)
    n_points: int  # distinct x values (cells averaged over seeds)
    rmse: float
    verdict: str  # "supported" or the reason it is not
    p_flat: float | None = None  # p-value of the flat-line (no scaling) model
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def supported(self) -> bool:
        return self.verdict == "supported"

    def predict(self, *x: float | np.ndarray) -> np.ndarray:
        p = self.params
        if self.form == "joint":
            n, d = (np.asarray(v, dtype=float) for v in x)
            return p["E"] + p["A"] * (n / self.x0[0]) ** -p["alpha"] * \
                (d / self.x0[1]) ** -p["beta"]
        return p["E"] + p["A"] * (np.asarray(x[0], dtype=float) / self.x0[0]) ** -p["alpha"]

    def describe(self, exponent: str = "alpha") -> str:
        """One line for a report: the law with intervals, or why there is none."""
        if not self.supported:
            return f"not supported: {self.verdict}"
        show = ", ".join(f"{k} = {v:.3g} [{self.intervals[k][0]:.3g}, {self.intervals[k][1]:.3g}]"
                         for k, v in self.params.items())
        kind = {"pure": "pure power law (E = 0)", "saturating": "saturating power law",
                "joint": "joint law"}[self.form]
        return f"{kind}: {show} (rmse {self.rmse:.4f}, {self.n_points} points)"


# ----------------------------------------------------------------------------------------------
# Point fits.


def _solve_linear(features: np.ndarray, y: np.ndarray,
                  with_floor: bool) -> tuple[np.ndarray, float]:
    """Non-negative least squares for [E, A] (or [A] alone); returns (coefficients, sse)."""
    design = (np.column_stack([np.ones_like(features), features]) if with_floor
              else features[:, None])
    coef, residual_norm = nnls(design, y)
    return coef, float(residual_norm**2)


def _fit_single(x: np.ndarray, y: np.ndarray, with_floor: bool) -> dict[str, float]:
    scaled = x / x.min()

    def sse(alpha: float) -> float:
        return _solve_linear(scaled**-alpha, y, with_floor)[1]

    losses = [sse(a) for a in ALPHA_GRID]
    i = int(np.argmin(losses))
    lo, hi = ALPHA_GRID[max(0, i - 1)], ALPHA_GRID[min(len(ALPHA_GRID) - 1, i + 1)]
    alpha = float(minimize_scalar(sse, bounds=(lo, hi), method="bounded").x) if hi > lo \
        else float(ALPHA_GRID[i])
    if sse(alpha) > losses[i]:
        alpha = float(ALPHA_GRID[i])
    coef, _ = _solve_linear(scaled**-alpha, y, with_floor)
    e, a = (coef[0], coef[1]) if with_floor else (0.0, coef[0])
    return {"E": float(e), "A": float(a), "alpha": alpha}


def _fit_joint(n: np.ndarray, d: np.ndarray, y: np.ndarray) -> dict[str, float]:
    sn, sd = n / n.min(), d / d.min()

    def sse(ab: Sequence[float]) -> float:
        a, b = max(0.0, ab[0]), max(0.0, ab[1])
        return _solve_linear(sn**-a * sd**-b, y, True)[1]

    coarse = ALPHA_GRID[::3]
    best = min(((a, b) for a in coarse for b in coarse), key=sse)
    refined = minimize(sse, np.array(best), method="Nelder-Mead",
                       options={"xatol": 1e-4, "fatol": 1e-12})
    a, b = (max(0.0, v) for v in refined.x) if refined.fun <= sse(best) else best
    coef, _ = _solve_linear(sn**-a * sd**-b, y, True)
    return {"E": float(coef[0]), "A": float(coef[1]), "alpha": float(a), "beta": float(b)}


# ----------------------------------------------------------------------------------------------
# Fits with bootstrap intervals.


def _group(keys: Sequence, values: Sequence[float]) -> dict:
    groups: dict = {}
    for k, v in zip(keys, values):
        groups.setdefault(k, []).append(float(v))
    return groups


def _bootstrap(groups: dict, keys: list, fit, n_boot: int, seed: int) -> list[dict[str, float]]:
    """Refit on resampled means: for every point, its seeds drawn with replacement."""
    rng = np.random.default_rng(seed)
    return [fit(np.array([np.mean(rng.choice(groups[k], size=len(groups[k]))) for k in keys]))
            for _ in range(n_boot)]


def fit_power_law(x: Sequence[float], error: Sequence[float], *, n_boot: int = 1000,
                  seed: int = 0) -> Fit:
    """Fit error = E + A * (x/x0)^-alpha to per-seed observations (x repeats across seeds)."""
    groups = _group(list(map(float, x)), error)
    xs = np.array(sorted(groups))
    means = np.array([np.mean(groups[v]) for v in xs])
    n_points = len(xs)
    if n_points < 3:
        return Fit("saturating", {}, {}, (float(xs.min()) if n_points else 1.0,), n_points,
                   float("nan"), f"too few points ({n_points} distinct values; at least 3 needed)")
    form = "saturating" if n_points >= 4 else "pure"
    with_floor = form == "saturating"
    point = _fit_single(xs, means, with_floor)
    boots = _bootstrap(groups, list(xs), lambda y: _fit_single(xs, y, with_floor), n_boot, seed)
    rmse = _rmse(means, point, xs, None, form)
    return _finish(form, point, boots, (float(xs.min()),), n_points, rmse,
                   _flat_line_p(groups, list(xs), means, rmse, extra=len(point) - 1 -
                                (0 if with_floor else 1)))


def fit_joint_law(n: Sequence[float], d: Sequence[float], error: Sequence[float], *,
                  n_boot: int = 500, seed: int = 0) -> Fit:
    """Fit error = E + A * (N/N0)^-alpha * (D/D0)^-beta (per-seed observations)."""
    groups = _group(list(zip(map(float, n), map(float, d))), error)
    keys = sorted(groups)
    ns = np.array([k[0] for k in keys])
    ds = np.array([k[1] for k in keys])
    means = np.array([np.mean(groups[k]) for k in keys])
    x0 = (float(ns.min()) if keys else 1.0, float(ds.min()) if keys else 1.0)
    distinct_n, distinct_d = len(set(ns.tolist())), len(set(ds.tolist()))
    if len(keys) < 5 or distinct_n < 2 or distinct_d < 2:
        return Fit("joint", {}, {}, x0, len(keys), float("nan"),
                   f"too few points ({len(keys)} cells over {distinct_n} sizes and {distinct_d} "
                   "data sizes; at least 5 cells over 2 of each needed)")
    point = _fit_joint(ns, ds, means)
    boots = _bootstrap(groups, keys, lambda y: _fit_joint(ns, ds, y), n_boot, seed)
    rmse = _rmse(means, point, ns, ds, "joint")
    return _finish("joint", point, boots, x0, len(keys), rmse,
                   _flat_line_p(groups, keys, means, rmse, extra=3))


def _rmse(y: np.ndarray, p: Mapping[str, float], x: np.ndarray, d: np.ndarray | None,
          form: str) -> float:
    if form == "joint":
        pred = p["E"] + p["A"] * (x / x.min()) ** -p["alpha"] * (d / d.min()) ** -p["beta"]
    else:
        pred = p["E"] + p["A"] * (x / x.min()) ** -p["alpha"]
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def _flat_line_p(groups: dict, keys: list, means: np.ndarray, rmse: float,
                 extra: int) -> float | None:
    """p-value of "a flat line explains the means as well as the law", or None with one seed
    per point (no estimate of the noise)."""
    dof = sum(len(groups[k]) - 1 for k in keys)
    if dof == 0:
        return None
    pooled = sum(float(np.sum((np.array(groups[k]) - np.mean(groups[k])) ** 2))
                 for k in keys) / dof
    # Variance of one point's mean: the pooled seed variance over that point's seed count.
    mean_var = float(np.mean([pooled / len(groups[k]) for k in keys]))
    gain = float(np.sum((means - means.mean()) ** 2)) - len(keys) * rmse**2
    if mean_var <= 0:
        return 0.0 if gain > 0 else 1.0
    return float(chi2.sf(max(gain, 0.0) / mean_var, df=max(1, extra)))


def _finish(form: str, point: dict[str, float], boots: list[dict[str, float]],
            x0: tuple[float, ...], n_points: int, rmse: float, p_flat: float | None) -> Fit:
    samples = {k: np.array([b[k] for b in boots]) for k in point}
    intervals = {k: (float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5)))
                 for k, s in samples.items()}
    exponents = [k for k in ("alpha", "beta") if k in point]
    verdict = "supported"
    if p_flat is None:
        verdict = "one seed per point: no estimate of the noise, so no interval"
    elif p_flat >= 0.05:
        verdict = f"a flat line fits as well within the seed noise (p = {p_flat:.2f})"
    for k in exponents if verdict == "supported" else []:
        # The optimiser cannot go below 0; a lower bound at (or within a hair of) 0 means the
        # data are consistent with "no effect".
        if intervals[k][0] <= 1e-3:
            verdict = f"the interval of {k} reaches zero ({intervals[k][0]:.3g} to " \
                      f"{intervals[k][1]:.3g}): no measurable scaling along this axis"
            break
    if verdict == "supported" and intervals["A"][0] <= 1e-6:
        verdict = "the interval of A reaches zero: the error does not depend on this axis " \
                  "within the noise"
    return Fit(form, point, intervals, x0, n_points, rmse, verdict, p_flat, samples)
