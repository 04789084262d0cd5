"""Time-activity curve figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .constants import LAMBDA_LU177_PER_H
from .tac import FitResult, evaluate_terms

__all__ = ["tac_plot"]

Array = np.ndarray

# --------------------------------------------------------------------------- plots

def tac_plot(path: str | Path, title: str, t_h: Sequence[float], a_mbq: Sequence[float],
             fit: FitResult | None = None, a_sd: Sequence[float] | None = None,
             lam_per_h: float = LAMBDA_LU177_PER_H) -> None:
    """PNG of a time–activity curve: measured points (± sd), the chosen fit and the trapezoid with its
    physical-decay tail (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(t_h, dtype=float)
    y = np.asarray(a_mbq, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.errorbar(t, y, yerr=None if a_sd is None else np.asarray(a_sd), fmt="o", color="k", label="measured")
    tmax = max(float(t.max()) * 1.5, 24.0)
    tt = np.linspace(0.0, tmax, 400)
    if fit is not None and fit.terms:
        ax.plot(tt, evaluate_terms(fit.terms, tt), "-", color="C0",
                label=f"{fit.model} fit, TIA {fit.tia_raw_mbq_h:.4g} MBq·h")
    tl = np.concatenate([[0.0], np.sort(t)])
    yl = np.concatenate([[0.0], y[np.argsort(t)]])
    ax.plot(tl, yl, "--", color="C1", lw=1, label="trapezoid")
    tail = np.linspace(float(t.max()), tmax, 50)
    ax.plot(tail, y[np.argmax(t)] * np.exp(-lam_per_h * (tail - t.max())), ":", color="C1", lw=1,
            label="physical-decay tail")
    ax.set_xlabel("time after injection (h)")
    ax.set_ylabel("activity (MBq)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    plt.close(fig)
