"""Time-activity curves: sum-of-exponential fits, model selection, TIA and its uncertainty, single time point."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from .constants import LAMBDA_LU177_PER_H

__all__ = [
    "MODELS", "GOF_ALPHA", "FitResult", "aicc", "evaluate_terms", "fit_model", "fit_tac", "fit_uncertainty",
    "hanscheid_tia", "madsen_tia", "madsen_tia_sd", "model_terms", "select_fit", "trapezoid_tia",
]

Array = np.ndarray

# --------------------------------------------------------------------------- TAC models
#
# Every model is a sum of exponentials Σ c_i exp(−k_i t) (effective rates k_i ≥ 0), so integrals,
# tails and peaks are closed-form. Rates are ordered through non-negative increments, so the
# parameters are identifiable and bounds keep every integral finite.

def _terms_mono(p: Sequence[float]) -> list[tuple[float, float]]:
    a, k = p
    return [(a, k)]


def _terms_bi(p: Sequence[float]) -> list[tuple[float, float]]:
    a1, d1, a2, k2 = p
    return [(a1, k2 + d1), (a2, k2)]


def _terms_uw(p: Sequence[float]) -> list[tuple[float, float]]:
    a, kw, d = p
    return [(a, kw), (-a, kw + d)]


def _terms_tri(p: Sequence[float]) -> list[tuple[float, float]]:
    a1, d1, a2, k2, d3 = p
    k1 = k2 + d1
    return [(a1, k1), (a2, k2), (-(a1 + a2), k1 + d3)]


@dataclass(frozen=True)
class _Model:
    name: str
    params: tuple[str, ...]
    terms: Callable[[Sequence[float]], list[tuple[float, float]]]
    formula: str

    @property
    def k(self) -> int:
        return len(self.params)


_RATE_MAX = 50.0  # 1/h

#: TAC models (effective rates, t in h, A in MBq).
MODELS: dict[str, _Model] = {
    "mono": _Model("mono", ("a", "k"), _terms_mono, "a·e^(−k t)"),
    "bi": _Model("bi", ("a1", "dk1", "a2", "k2"), _terms_bi, "a1·e^(−(k2+dk1) t) + a2·e^(−k2 t)"),
    "uptake_washout": _Model("uptake_washout", ("a", "kw", "dku"), _terms_uw,
                             "a·(e^(−kw t) − e^(−(kw+dku) t))"),
    "tri": _Model("tri", ("a1", "dk1", "a2", "k2", "dk3"), _terms_tri,
                  "a1·e^(−k1 t) + a2·e^(−k2 t) − (a1+a2)·e^(−(k1+dk3) t), k1 = k2+dk1"),
}
_AMPLITUDE = {"a", "a1", "a2"}
#: Parameter holding each model's terminal (slowest) effective rate: constrained to ≥ λ_phys (no negative
#: biological clearance), as in NUKFIT.
_TERMINAL = {"mono": "k", "bi": "k2", "uptake_washout": "kw", "tri": "k2"}
#: Significance level of the χ² goodness-of-fit test used by :func:`select_fit`.
GOF_ALPHA: float = 0.05


def _bounds(model: str, lam_per_h: float) -> tuple[list[float], list[float]]:
    """Lower and upper parameter bounds: amplitudes ≥ 0, rate increments in [0, 50/h], terminal rate ≥ λ."""
    m = MODELS[model]
    lo = [lam_per_h if name == _TERMINAL[model] else 0.0 for name in m.params]
    hi = [np.inf if name in _AMPLITUDE else _RATE_MAX for name in m.params]
    return lo, hi


def model_terms(model: str, params: Sequence[float]) -> list[tuple[float, float]]:
    """(amplitude MBq, effective rate 1/h) terms of ``model`` with ``params``."""
    return MODELS[model].terms(params)


def evaluate_terms(terms: Sequence[tuple[float, float]], t_h: Array | float) -> Array:
    """Σ c·exp(−k t)."""
    t = np.asarray(t_h, dtype=float)
    return np.sum([c * np.exp(-k * t) for c, k in terms], axis=0)


def _integral(terms: Sequence[tuple[float, float]], t0: float = 0.0) -> float:
    """∫_t0^∞ Σ c e^(−k t) dt (inf for a zero rate with non-zero amplitude)."""
    s = 0.0
    for c, k in terms:
        if c == 0.0:
            continue
        if k <= 0.0:
            return math.copysign(math.inf, c)
        s += c * math.exp(-k * t0) / k
    return s


def aicc(wrss: float, n: int, k: int) -> float:
    """Corrected Akaike criterion n·ln(WRSS/n) + 2k + 2k(k+1)/(n−k−1); NaN when n ≤ k+1 (undefined).

    ``k`` is the number of model parameters (Glatting et al. 2007 count the variance as a parameter
    too, which only shifts every model by the same amount when n is fixed... except for the small-sample
    term; we follow the NUKFIT convention of model parameters only).
    """
    if n - k - 1 <= 0:
        return math.nan
    return n * math.log(wrss / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _aic(wrss: float, n: int, k: int) -> float:
    return n * math.log(wrss / n) + 2 * k


@dataclass
class FitResult:
    """One TAC model fitted to one region's time points.

    ``tia_mbq_h`` is NaN when the fit is unphysical (``flags`` says why); ``tia_raw_mbq_h`` keeps the
    number the fitted curve integrates to. ``tia_sd_mbq_h``: standard uncertainty by parametric sampling
    (:func:`fit_uncertainty`); ``param_sd`` from the covariance of the fit.
    """

    model: str
    n: int
    k: int
    params: dict[str, float]
    param_sd: dict[str, float]
    tia_raw_mbq_h: float
    tia_mbq_h: float
    tia_sd_mbq_h: float
    wrss: float
    r2: float
    aicc: float
    aic: float
    converged: bool
    physical: bool
    flags: list[str]
    terms: list[tuple[float, float]]
    score: float = math.nan
    criterion: str = ""
    chosen: bool = False
    chi2_red: float = math.nan
    gof_p: float = math.nan

    @property
    def terminal_rate_cv(self) -> float:
        """Relative standard uncertainty of the terminal effective rate (covariance of the fit), i.e. of
        the effective half-life a later single-time-point cycle borrows."""
        name = _TERMINAL.get(self.model)
        k = self.params.get(name, math.nan) if name else math.nan
        sd = self.param_sd.get(name, math.nan) if name else math.nan
        return sd / k if k and math.isfinite(k) and math.isfinite(sd) else math.nan

    @property
    def terminal_rate_per_h(self) -> float:
        """Slowest effective rate with a positive amplitude (1/h)."""
        ks = [k for c, k in self.terms if c > 0]
        return min(ks) if ks else math.nan

    def row(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "n_points": self.n, "n_params": self.k,
                             "tia_mbq_h": self.tia_mbq_h, "tia_sd_mbq_h": self.tia_sd_mbq_h,
                             "tia_raw_mbq_h": self.tia_raw_mbq_h, "wrss": self.wrss, "r2": self.r2,
                             "chi2_reduced": self.chi2_red, "gof_p": self.gof_p,
                             "aicc": self.aicc, "aic": self.aic, "score": self.score, "criterion": self.criterion,
                             "chosen": self.chosen, "converged": self.converged, "physical": self.physical,
                             "flags": "; ".join(self.flags),
                             "terminal_half_life_h": (math.log(2) / self.terminal_rate_per_h
                                                      if self.terminal_rate_per_h > 0 else math.nan)}
        for name, v in self.params.items():
            d[f"p_{name}"] = v
            d[f"p_{name}_sd"] = self.param_sd.get(name, math.nan)
        return d


def _sigma(y: Array, cv: float) -> Array:
    floor = 1e-3 * max(float(np.max(np.abs(y))), 1e-12)
    return cv * np.maximum(np.abs(y), floor)


def _starts(model: str, t: Array, y: Array, lam: float) -> list[list[float]]:
    """Initial guesses: a log-linear terminal slope plus a small grid of faster rates."""
    pos = y > 0
    if pos.sum() >= 2:
        tt, yy = t[pos][-2:], y[pos][-2:]
        kt = float(max((math.log(yy[0]) - math.log(yy[1])) / max(tt[1] - tt[0], 1e-9), lam * 0.5))
    else:
        kt = lam * 2.0
    kt = min(kt, 1.0)
    a0 = float(max(y.max(), 1e-9)) * math.exp(kt * float(t[int(np.argmax(y))]))
    fast = (0.05, 0.3, 1.0, 3.0)
    if model == "mono":
        return [[a0, kt]]
    if model == "uptake_washout":
        return [[a0 * 1.2, kt, f] for f in fast]
    if model == "bi":
        return [[a0 * 0.5, f, a0 * 0.5, kt] for f in fast]
    return [[a0 * 0.5, f, a0 * 0.7, kt, g] for f in (0.05, 0.5) for g in (0.3, 1.0, 3.0)]


def _model_function(model: str) -> Callable[..., Array]:
    """``f(t, *p)`` of ``model``, the form :func:`scipy.optimize.curve_fit` fits."""
    m = MODELS[model]

    def f(tt: Array, *p: float) -> Array:
        return evaluate_terms(m.terms(p), tt)

    return f


def _bounded_starts(model: str, t: Array, y: Array, lam_per_h: float, lo: Sequence[float],
                    hi: Sequence[float]) -> list[list[float]]:
    """The initial guesses of :func:`_starts` (in their order), each moved just inside the bounds."""
    return [[min(max(v, lw * 1.001 + 1e-9), h * 0.999 if math.isfinite(h) else v)
             for v, lw, h in zip(p0, lo, hi)] for p0 in _starts(model, t, y, lam_per_h)]


def _best_fit(model: str, t: Array, y: Array, sig: Array, lam_per_h: float
              ) -> tuple[float, Array, Array] | None:
    """Bounded weighted least squares from every start (trust-region reflective, tolerances 1e-14): the
    (WRSS, parameters, covariance) of the lowest WRSS, the first start winning ties; None when none
    converged."""
    f = _model_function(model)
    lo, hi = _bounds(model, lam_per_h)
    best: tuple[float, Array, Array] | None = None
    for p0 in _bounded_starts(model, t, y, lam_per_h, lo, hi):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, cov = optimize.curve_fit(f, t, y, p0=p0, sigma=sig, absolute_sigma=True, bounds=(lo, hi),
                                            method="trf", ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=4000)
        except (RuntimeError, ValueError, optimize.OptimizeWarning):
            continue
        w = float(np.sum(((f(t, *p) - y) / sig) ** 2))
        if best is None or w < best[0]:
            best = (w, p, cov)
    return best


def _unconverged(model: str, n: int) -> FitResult:
    """The result of a model no start converged for: every number NaN, flagged ``did not converge``."""
    m = MODELS[model]
    nanp = {k: math.nan for k in m.params}
    return FitResult(model, n, m.k, nanp, dict(nanp), math.nan, math.nan, math.nan, math.nan, math.nan,
                     math.nan, math.nan, False, False, ["did not converge"], [])


def _goodness(model: str, t: Array, y: Array, p: Array, cov: Array, wrss: float
              ) -> tuple[Array, float, float, float]:
    """Covariance (inflated by χ²_red when > 1, non-finite entries 0), R², reduced χ² and χ² p-value."""
    dof = len(t) - MODELS[model].k
    if dof > 0 and wrss / dof > 1.0:
        cov = cov * (wrss / dof)
    if not np.all(np.isfinite(cov)):
        cov = np.where(np.isfinite(cov), cov, 0.0)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    rss = float(np.sum((_model_function(model)(t, *p) - y) ** 2))
    r2 = 1.0 - rss / ss_tot if ss_tot > 0 else math.nan
    chi2_red = wrss / dof if dof > 0 else math.nan
    gof_p = float(stats.chi2.sf(wrss, dof)) if dof > 0 else math.nan
    return cov, r2, chi2_red, gof_p


def _terminal_rate_checks(terms: Sequence[tuple[float, float]], lam_per_h: float, gof_p: float,
                          flags: list[str], notes: list[str]) -> None:
    """Flag a terminal effective rate below λ (or held at λ by data decaying more slowly than 177Lu)."""
    kterm = min((k for c, k in terms if c > 0), default=math.nan)
    if not math.isfinite(kterm) or kterm < lam_per_h * (1.0 - 1e-3):
        flags.append(f"negative biological rate: terminal effective rate {kterm:.4g}/h < physical decay "
                     f"{lam_per_h:.4g}/h")
    elif kterm <= lam_per_h * (1.0 + 1e-4):
        # the fit is held at the constraint k ≥ λ: no biological clearance is physical (retention), data that
        # decay more slowly than 177Lu (a poor fit at the bound) are not
        if math.isfinite(gof_p) and gof_p < GOF_ALPHA:
            flags.append(f"negative biological rate: the data decay more slowly than 177Lu (terminal rate held "
                         f"at λ = {lam_per_h:.4g}/h, χ² p = {gof_p:.2g})")
        else:
            notes.append("terminal rate at the physical-decay bound (no biological clearance)")


def _physical_checks(terms: Sequence[tuple[float, float]], t: Array, y: Array, raw: float, gof_p: float,
                     lam_per_h: float, max_tail_fraction: float, injected_mbq: float | None
                     ) -> tuple[list[str], list[str]]:
    """(flags making the fit unphysical, notes): terminal rate, still rising, tail fraction, integral,
    injected activity; see :func:`fit_model`."""
    flags: list[str] = []
    notes: list[str] = []
    _terminal_rate_checks(terms, lam_per_h, gof_p, flags, notes)
    tl = float(t.max())
    slope = float(sum(-k * c * math.exp(-k * tl) for c, k in terms))
    if slope > 1e-9 * max(float(y.max()), 1e-12):
        flags.append(f"still rising at the last time point ({tl:.1f} h): uptake after the last point")
    if math.isfinite(raw) and raw > 0:
        tail = _integral(terms, tl) / raw
        if tail > max_tail_fraction:
            flags.append(f"tail fraction {tail:.2f} after the last point exceeds {max_tail_fraction:.2f}")
    else:
        flags.append(f"non-positive or infinite integral ({raw:.4g})")
    if injected_mbq is not None and math.isfinite(raw):
        tt = np.linspace(0.0, max(tl * 2.0, 1.0), 2001)
        ratio = evaluate_terms(terms, tt) / (injected_mbq * np.exp(-lam_per_h * tt))
        if float(ratio.max()) > 1.0:
            flags.append(f"exceeds injected activity (max {float(ratio.max()):.2f} × decayed injected)")
    return flags, notes


def fit_model(model: str, t_h: Sequence[float], a_mbq: Sequence[float], lam_per_h: float = LAMBDA_LU177_PER_H,
              activity_cv: float = 0.05, injected_mbq: float | None = None,
              max_tail_fraction: float = 0.8, uncertainty_samples: int = 0) -> FitResult:
    """Weighted least-squares fit of one TAC model (σ_i = cv·A_i), with checks of physical sense.

    Parameters
    ----------
    model
        Key of :data:`MODELS`.
    t_h, a_mbq
        Time points (h after injection) and activities at those times (MBq, not decay corrected).
    lam_per_h
        Physical decay constant: a terminal effective rate below it means a negative biological
        clearance rate.
    activity_cv
        Relative standard uncertainty of each activity; the covariance is computed with these σ as
        absolute and inflated by the reduced χ² when that exceeds 1 (more scatter than stated).
    injected_mbq
        When given, a curve exceeding the injected activity (decayed) at any time is unphysical.
    max_tail_fraction
        Unphysical when the extrapolated TIA after the last point exceeds this fraction of the TIA.
    uncertainty_samples
        Parametric-bootstrap refits for the TIA standard uncertainty (fixed seed; 0 = none, the
        default: :func:`fit_tac` samples the chosen fit only); unphysical fits are not sampled.

    Returns
    -------
    FitResult
        Flags (unphysical ones make ``tia_mbq_h`` NaN): ``negative biological rate`` (terminal
        effective rate < λ), ``still rising at the last time point`` (uptake after the last point),
        ``tail fraction ... exceeds`` the bound, ``exceeds injected activity``, ``did not converge``.
    """
    m = MODELS[model]
    t = np.asarray(t_h, dtype=float)
    y = np.asarray(a_mbq, dtype=float)
    n = len(t)
    if n < m.k:
        raise ValueError(f"{model}: {m.k} parameters need at least {m.k} time points, got {n}")
    sig = _sigma(y, activity_cv)
    best = _best_fit(model, t, y, sig, lam_per_h)
    if best is None:
        return _unconverged(model, n)
    wrss, p, cov = best
    terms = m.terms(p)
    cov, r2, chi2_red, gof_p = _goodness(model, t, y, p, cov, wrss)
    raw = _integral(terms)
    flags, notes = _physical_checks(terms, t, y, raw, gof_p, lam_per_h, max_tail_fraction, injected_mbq)
    physical = not flags
    flags += notes
    tia_sd = _bootstrap_tia_sd(model, t, y, p, sig, wrss, uncertainty_samples, lam_per_h) if physical else math.nan
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    score_aicc = aicc(max(wrss, _wrss_floor(n, activity_cv)), n, m.k)
    score_aic = _aic(max(wrss, _wrss_floor(n, activity_cv)), n, m.k)
    return FitResult(model, n, m.k, dict(zip(m.params, map(float, p))), dict(zip(m.params, map(float, sd))),
                     raw, raw if physical else math.nan, tia_sd if physical else math.nan, wrss, r2, score_aicc,
                     score_aic, True, physical, flags, [(float(c), float(k)) for c, k in terms],
                     chi2_red=chi2_red, gof_p=gof_p)


def _bootstrap_tia_sd(model: str, t: Array, y: Array, p: Array, sig: Array, wrss: float, samples: int,
                      lam_per_h: float = LAMBDA_LU177_PER_H) -> float:
    """TIA standard uncertainty by parametric sampling (a bootstrap of the data): the activities are
    redrawn with their standard uncertainty σ_i (inflated by √χ²_red when the residuals exceed it)
    and the model is refitted from the best parameters; the standard deviation of the refitted TIAs
    is returned (NaN with fewer than 8 successful refits or ``samples`` = 0). The linearised delta
    method is not used: it fails for weakly determined rates (a fast uptake rate has a huge variance
    but hardly changes the TIA)."""
    m = MODELS[model]
    n = len(t)
    dof = n - m.k
    if samples <= 0:
        return math.nan
    infl = math.sqrt(wrss / dof) if dof > 0 and wrss / dof > 1.0 else 1.0
    lo, hi = _bounds(model, lam_per_h)

    def f(tt: Array, *q: float) -> Array:
        return evaluate_terms(m.terms(q), tt)

    rng = np.random.default_rng(12345)
    boot: list[float] = []
    p0 = np.clip(p, np.asarray(lo) + 1e-12, np.asarray(hi) * 0.999999)
    for _ in range(samples):
        yb = y + rng.normal(size=n) * sig * infl
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pb, _ = optimize.curve_fit(f, t, yb, p0=p0, sigma=sig, absolute_sigma=True, bounds=(lo, hi),
                                           method="trf", ftol=1e-8, xtol=1e-8, gtol=1e-8, max_nfev=300)
        except (RuntimeError, ValueError):
            continue
        v = _integral(m.terms(pb))
        if math.isfinite(v):
            boot.append(v)
    return float(np.std(boot, ddof=1)) if len(boot) >= 8 else math.nan


def fit_uncertainty(fit: FitResult, t_h: Sequence[float], a_mbq: Sequence[float], activity_cv: float = 0.05,
                    samples: int = 64, lam_per_h: float = LAMBDA_LU177_PER_H) -> float:
    """Compute (and store in ``fit``) the TIA standard uncertainty of a fit made with
    ``uncertainty_samples=0``; see :func:`_bootstrap_tia_sd`. Unphysical fits get NaN."""
    if not (fit.converged and fit.physical):
        fit.tia_sd_mbq_h = math.nan
        return math.nan
    t = np.asarray(t_h, dtype=float)
    y = np.asarray(a_mbq, dtype=float)
    p = np.asarray([fit.params[k] for k in MODELS[fit.model].params])
    fit.tia_sd_mbq_h = _bootstrap_tia_sd(fit.model, t, y, p, _sigma(y, activity_cv), fit.wrss, samples, lam_per_h)
    return fit.tia_sd_mbq_h


def _wrss_floor(n: int, cv: float) -> float:
    """Fits within 1e-6 relative of every point are 'exact': their WRSS is floored so that exact fits of
    nested models tie and the parameter penalty decides (noise-free data)."""
    return n * (1e-6 / cv) ** 2


def select_fit(fits: Sequence[FitResult], alpha: float = GOF_ALPHA) -> FitResult | None:
    """Choose one of the converged, physical fits with a rule defined for every number of points n.

    1. **AICc** (Glatting et al., Med Phys 34 (2007) 4285) among the candidates for which it is defined
       (n ≥ k + 2, k model parameters): the lowest wins, when its fit passes the χ² goodness-of-fit test
       (WRSS against χ² with n − k degrees of freedom, p ≥ ``alpha``; σ_i = cv·A_i).
    2. Otherwise (no candidate has n ≥ k + 2, e.g. 3 points; or the AICc winner fails the test, e.g. a
       mono-exponential that cannot follow the uptake of a 4-point TAC) the **fixed rule**: the model with
       the fewest parameters whose fit passes the χ² test, models with n = k + 1 (one degree of freedom)
       included. Fewest parameters first is the parsimony AICc cannot judge at n = k + 1.
    3. When no fit passes, the lowest χ²/(n − k); the chosen fit is flagged ``no model passes``.

    ``criterion`` (the same on every fit of the set) says which step chose; ``score`` is the AICc (NaN
    where undefined). Fits with n = k (no degree of freedom) are never chosen. Returns None when no fit
    is physical.
    """
    ok = [f for f in fits if f.converged and f.physical and f.k < f.n]
    for f in fits:
        f.chosen = False
        f.score = f.aicc
    if not ok:
        return None
    defined = [f for f in ok if f.n >= f.k + 2]
    best_aicc = min(defined, key=lambda f: (f.aicc, f.k)) if defined else None
    passing = sorted((f for f in ok if f.gof_p >= alpha), key=lambda f: f.k)
    if best_aicc is not None and best_aicc.gof_p >= alpha:
        best = best_aicc
        criterion = "AICc" if len(defined) > 1 else "AICc (the only model with n ≥ k + 2; passes χ²)"
    elif passing:
        why = (f"AICc winner {best_aicc.model} fails χ² (p = {best_aicc.gof_p:.2g})" if best_aicc is not None
               else "AICc undefined (n < k + 2 for every model)")
        best, criterion = passing[0], f"fewest parameters passing χ² (p ≥ {alpha:g}); {why}"
    else:
        best = min(ok, key=lambda f: (f.chi2_red, f.k))
        criterion = f"lowest χ²/dof; no model passes χ² (p ≥ {alpha:g})"
        best.flags.append(f"no model passes the χ² test: χ²/dof {best.chi2_red:.2f} (activities scatter more "
                          "than activity_cv)")
    for f in fits:
        f.criterion = criterion
    best.chosen = True
    return best


def fit_tac(t_h: Sequence[float], a_mbq: Sequence[float], lam_per_h: float = LAMBDA_LU177_PER_H,
            models: Sequence[str] = ("mono", "bi", "uptake_washout", "tri"), activity_cv: float = 0.05,
            injected_mbq: float | None = None, max_tail_fraction: float = 0.8, uncertainty_samples: int = 64
            ) -> tuple[list[FitResult], FitResult | None]:
    """Fit every model with fewer parameters than points and choose one (:func:`select_fit`); the TIA
    uncertainty is sampled for the chosen fit only (the others report NaN)."""
    n = len(t_h)
    fits = [fit_model(mname, t_h, a_mbq, lam_per_h, activity_cv, injected_mbq, max_tail_fraction, 0)
            for mname in models if MODELS[mname].k < n]
    best = select_fit(fits)
    if best is not None:
        fit_uncertainty(best, t_h, a_mbq, activity_cv, uncertainty_samples, lam_per_h)
    return fits, best


def trapezoid_tia(t_h: Sequence[float], a_mbq: Sequence[float], lam_per_h: float = LAMBDA_LU177_PER_H,
                  start: str = "zero", activity_cv: float = 0.0) -> tuple[float, float]:
    """Trapezoid over the measured points plus a physical-decay tail (conservative: no biological
    clearance after the last point).

    ``start="zero"``: linear uptake from A(0) = 0 to the first point; ``"constant"``: A(0) = A(t1).
    Tail: A(t_last)/λ_phys. Returns (TIA MBq·h, standard uncertainty from ``activity_cv`` on each
    activity, propagated linearly).
    """
    t = np.asarray(t_h, dtype=float)
    y = np.asarray(a_mbq, dtype=float)
    order = np.argsort(t)
    t, y = t[order], y[order]
    y0 = 0.0 if start == "zero" else float(y[0])
    tt = np.concatenate([[0.0], t])
    dtt = np.diff(tt)
    # weight of each measured activity in trapezoid + tail (the TIA is linear in the activities)
    w = np.zeros(len(t))
    w += dtt / 2.0
    w[:-1] += dtt[1:] / 2.0
    w[-1] += 1.0 / lam_per_h
    if start == "constant":
        w[0] += dtt[0] / 2.0
    tia = float(np.dot(w, y))
    assert math.isclose(tia, float(np.trapezoid(np.concatenate([[y0], y]), tt)) + float(y[-1]) / lam_per_h,
                        rel_tol=1e-9, abs_tol=1e-12)
    sd = float(math.sqrt(np.sum((w * activity_cv * y) ** 2)))
    return tia, sd


def hanscheid_tia(a_mbq: float, t_h: float) -> float:
    """Single-time-point TIA of Hänscheid et al., J Nucl Med 59 (2018) 75–81: Ã ≈ A(t)·2t/ln2.

    Exact for a mono-exponential with effective half-life T_eff = t (x = ln2 below); for a mono-exponential
    with effective half-life T, the ratio to the true TIA is (2/ln2)·x·e^(−x), x = ln2·t/T: within
    [0.88, 1.06] for 0.75 ≤ t/T ≤ 2.5 (about the ±10 % accuracy reported for kidneys and tumours measured
    around 4 d after 177Lu-DOTATATE/-TOC).
    """
    return float(a_mbq) * 2.0 * float(t_h) / math.log(2.0)


def madsen_tia(a_mbq: float, t_h: float, effective_half_life_h: float) -> float:
    """Single-time-point TIA of Madsen et al., Med Phys 45 (2018) 2318–2324: Ã = A(t)·e^(λ t)/λ with
    λ = ln2 / T_eff a population (or prior-cycle) effective half-life. The estimate is first-order
    insensitive to an error in T_eff when t ≈ T_eff/ln2 (∂/∂λ of e^(λt)/λ vanishes at λ = 1/t)."""
    lam = math.log(2.0) / float(effective_half_life_h)
    return float(a_mbq) * math.exp(lam * float(t_h)) / lam


def madsen_tia_sd(a_mbq: float, t_h: float, effective_half_life_h: float, activity_cv: float,
                  half_life_cv: float) -> float:
    """Standard uncertainty of :func:`madsen_tia` from the activity (relative ``activity_cv``) and the
    assumed effective half-life (log-normal, relative ``half_life_cv``).

    The T_eff part is the root-mean-square difference between Ã(T) and Ã(T_assumed) over the log-normal T
    (9-point Gauss–Hermite quadrature), not the first-order delta method: Madsen's estimate is chosen where
    ∂Ã/∂λ vanishes (t ≈ 1/λ), so the first-order term understates it (on a seeded ensemble the delta
    method covered the truth in 63 % of trials instead of 68 %).
    """
    tia = madsen_tia(a_mbq, t_h, effective_half_life_h)
    x, w = np.polynomial.hermite_e.hermegauss(9)
    w = w / w.sum()
    alt = np.array([madsen_tia(a_mbq, t_h, effective_half_life_h * math.exp(half_life_cv * xi)) for xi in x])
    sd_t = float(math.sqrt(np.sum(w * (alt - tia) ** 2)))
    return math.sqrt((tia * activity_cv) ** 2 + sd_t ** 2)


