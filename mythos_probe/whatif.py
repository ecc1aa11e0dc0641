"""Early-exit what-if: replay recorded forwards offline as if each position had stopped looping at
the first iteration where an exit criterion fired, and report what that would have saved and how
often the prediction at that iteration still matches the full-depth one.

Input: `LoopTrace`s recorded with `attach(model, probes=[..., "lens"], detail="positions")`. Each
position the coda lens sampled (`lens_positions`) is one replayed position; the others carry NaN in
the lens metrics and are left out. Criteria, each evaluated over a range of thresholds:

- `act`: first iteration with cumulative halting probability ≥ τ (Graves 2016, "Adaptive
  Computation Time for Recurrent Neural Networks", §2);
- `kl`: KL(p_t ‖ p_{t−1}) between successive coda-lens distributions < τ (Geiping et al. 2025,
  "Scaling up Test-Time Compute with Latent Reasoning" (Huginn), §7);
- `rel_residual`: ‖h_t − h_{t−1}‖ / ‖h_t‖ < τ and `cos_step`: 1 − cos(h_t, h_{t−1}) < τ, the
  hidden-state saturation measure of confidence-based exit (Schuster et al. 2022, "Confident
  Adaptive Language Modeling" (CALM), local confidence measures; Geiping et al. 2025 §6 for the
  residual);
- `entropy`: |H(p_t) − H(p_{t−1})| < τ, the prediction's confidence settling (CALM's
  confidence-based exit with the entropy of the lens distribution as the confidence, as in
  Xin et al. 2020, "DeeBERT");
- `argmax_stable`: the lens argmax unchanged over the last k iterations, k = 1..4 (prediction
  consistency; the "patience" criterion of Zhou et al. 2020, "BERT Loses Patience").

A criterion that never fires exits at the last executed iteration. Per position: exit iteration
t_exit, iterations used t_exit + 1, and agreement = `lens_top1_agree[t_exit]` (the lens argmax at
the exit iteration equals the model's actual output argmax). Iterations saved are relative to
running every iteration the forward executed (`LoopTrace.iterations`), summed over positions.

This module is not: an exit policy the model runs (`model/looped.py` has `exit="kl"/"latent"`)
nor the forward-level SQL approximation of the dashboard (`dashboards/whatif.py`). All criteria
and thresholds are evaluated at once with numpy over (thresholds × positions × iterations).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mythos_probe.records import LoopTrace

CRITERIA = ("act", "kl", "rel_residual", "cos_step", "entropy", "argmax_stable")

DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "act": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    "kl": tuple(float(x) for x in np.logspace(-5, 0, 11)),  # nats
    "rel_residual": tuple(float(x) for x in np.logspace(-4, 0, 9)),
    "cos_step": tuple(float(x) for x in np.logspace(-6, 0, 13)),
    "entropy": tuple(float(x) for x in np.logspace(-4, 0, 9)),  # nats
    "argmax_stable": (1, 2, 3, 4),  # k iterations
}

INPUTS = {
    "act": "cum_halt", "kl": "lens_kl_prev", "rel_residual": "rel_residual", "cos_step": "cos_step",
    "entropy": "lens_entropy", "argmax_stable": "lens_argmax",
}
_LENS = ("lens_argmax", "lens_top1_agree")

COLUMNS = ["criterion", "threshold", "mean_iterations", "iterations_saved", "agreement", "positions"]


class _Positions:
    """Every lens-sampled position of the traces, padded to the longest forward:
    metric → (P, I) float arrays (NaN past a forward's last iteration), `n` (P,) iterations run."""

    def __init__(self, traces: Sequence[LoopTrace]) -> None:
        if not traces:
            raise ValueError("no traces: record forwards with attach(model, probes=[..., 'lens'], detail='positions')")
        for t in traces:
            if t.detail != "positions" or any(m not in t.position_metrics for m in _LENS):
                raise ValueError(
                    "the early-exit what-if needs per-position lens metrics: attach with "
                    "detail='positions' and probes including 'lens' (e.g. lens_positions='all'); "
                    f"trace {t.span_id} has detail={t.detail!r} and position metrics "
                    f"{sorted(t.position_metrics)}"
                )
        self.available = tuple(c for c in CRITERIA if all(INPUTS[c] in t.position_metrics for t in traces))
        width = max(t.iterations for t in traces)
        names = sorted({INPUTS[c] for c in self.available} | {"lens_top1_agree"})
        parts: dict[str, list[np.ndarray]] = {m: [] for m in names}
        n, keys = [], []
        for t in traces:
            sampled = np.isfinite(t.position_metrics["lens_argmax"][..., 0])  # (B, T)
            b, p = np.nonzero(sampled)
            for m in names:
                values = t.position_metrics[m][b, p].astype(np.float64)  # (P_t, I_t)
                parts[m].append(np.pad(values, ((0, 0), (0, width - t.iterations)), constant_values=np.nan))
            n.append(np.full(b.size, t.iterations))
            keys.append(pd.DataFrame({"trace_id": t.trace_id, "span_id": t.span_id, "batch_index": b, "position": p}))
        self.metrics = {m: np.concatenate(v) for m, v in parts.items()}
        self.n = np.concatenate(n)
        self.keys = pd.concat(keys, ignore_index=True)
        if self.n.size == 0:
            raise ValueError("the lens sampled no positions in these traces")

    def fires(self, criterion: str, thresholds: np.ndarray) -> np.ndarray:
        """(K, P, I) bool: criterion fired at iteration t for threshold k (NaN never fires)."""
        x = self.metrics[INPUTS[criterion]]
        th = thresholds[:, None, None]
        with np.errstate(invalid="ignore"):
            if criterion == "act":
                return x[None] >= th
            if criterion == "entropy":
                change = np.abs(np.diff(x, axis=1, prepend=np.nan))  # NaN at t = 0
                return change[None] < th
            if criterion == "argmax_stable":
                return _stable_run(x)[None] >= th
            return x[None] < th

    def exits(self, criterion: str, thresholds: np.ndarray) -> np.ndarray:
        """(K, P) exit iteration: the first firing one, else the last executed one."""
        fired = self.fires(criterion, thresholds) & (np.arange(self.metrics["lens_top1_agree"].shape[1]) < self.n[:, None])
        return np.where(fired.any(-1), fired.argmax(-1), self.n - 1)

    def agreement(self, exit_at: np.ndarray) -> np.ndarray:
        """(K, P) lens_top1_agree at the exit iteration."""
        agree = self.metrics["lens_top1_agree"]
        return np.take_along_axis(np.broadcast_to(agree, exit_at.shape + agree.shape[1:]), exit_at[..., None], -1)[..., 0]


def _stable_run(argmax: np.ndarray) -> np.ndarray:
    """(P, I) → (P, I): for how many iterations before t the argmax has equalled argmax[t]
    (0 at t = 0 and after every change). Vectorized with a running max of the last change."""
    steps = np.arange(argmax.shape[1])
    changed = np.ones(argmax.shape, dtype=bool)
    changed[:, 1:] = argmax[:, 1:] != argmax[:, :-1]  # NaN padding counts as a change
    last_change = np.maximum.accumulate(np.where(changed, steps, 0), axis=1)
    return steps - last_change


def _thresholds(criteria: Iterable[str], thresholds: Mapping[str, Iterable[float]] | None) -> dict[str, np.ndarray]:
    chosen = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    unknown = sorted(set(chosen) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown exit criteria {unknown}; choose from {CRITERIA}")
    return {c: np.asarray(list(chosen[c]), dtype=np.float64) for c in criteria if c in chosen}


def evaluate(traces: Sequence[LoopTrace], thresholds: Mapping[str, Iterable[float]] | None = None) -> pd.DataFrame:
    """One row per (criterion, threshold): mean_iterations used per position, iterations_saved
    (share of the executed iterations, summed over positions), agreement (share of positions whose
    prediction at exit equals the full-depth one), positions replayed.

    thresholds: criterion → values (for `argmax_stable`, k); default `DEFAULT_THRESHOLDS`.
    Criteria whose input metric was not recorded (`act` needs the "halting" probe, `rel_residual`
    and `cos_step` need "convergence") are left out of the default; asking for them raises.
    """
    pos = _Positions(traces)
    if thresholds is not None:
        missing = sorted(set(thresholds) & set(CRITERIA) - set(pos.available))
        if missing:
            raise ValueError(
                f"criteria {missing} need position metrics {[INPUTS[c] for c in missing]}, which these traces "
                "lack: attach with the 'convergence' and 'halting' probes and detail='positions'"
            )
    rows = []
    total = pos.n.sum()
    for criterion, th in _thresholds(pos.available, thresholds).items():
        exit_at = pos.exits(criterion, th)  # (K, P)
        used = exit_at + 1
        rows.append(pd.DataFrame({
            "criterion": criterion, "threshold": th, "mean_iterations": used.mean(-1),
            "iterations_saved": 1.0 - used.sum(-1) / total, "agreement": pos.agreement(exit_at).mean(-1),
            "positions": used.shape[1],
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)


def exits(traces: Sequence[LoopTrace], criterion: str, threshold: float) -> pd.DataFrame:
    """Per lens-sampled position: trace_id, span_id, batch_index, position, exit_iteration,
    iterations_used, iterations_run and agrees (prediction at exit == full-depth prediction)."""
    pos = _Positions(traces)
    if criterion not in pos.available:
        raise ValueError(f"criterion {criterion!r} is not available in these traces; available: {pos.available}")
    exit_at = pos.exits(criterion, np.array([threshold], dtype=np.float64))
    return pos.keys.assign(
        exit_iteration=exit_at[0], iterations_used=exit_at[0] + 1, iterations_run=pos.n,
        agrees=pos.agreement(exit_at)[0] == 1.0,
    )


def recommend(table: pd.DataFrame, min_agreement: float = 0.99) -> pd.Series:
    """The (criterion, threshold) row saving the most iterations with agreement ≥ min_agreement
    (ties: higher agreement first). Raises ValueError saying how close the best one came when
    none qualifies."""
    if table.empty:
        raise ValueError("the what-if table is empty: no criterion could be evaluated")
    ok = table[table["agreement"] >= min_agreement]
    if ok.empty:
        best = table.loc[table["agreement"].idxmax()]
        raise ValueError(
            f"no exit criterion keeps agreement ≥ {min_agreement:g} with the full-depth prediction; the best, "
            f"{best['criterion']} at threshold {best['threshold']:g}, agrees on {best['agreement']:.1%} of "
            f"{int(best['positions'])} positions. Lower min_agreement or record more forwards."
        )
    return ok.sort_values(["iterations_saved", "agreement"], ascending=False, kind="stable").iloc[0]


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both iterations_saved and agreement, by increasing saving."""
    ranked = table.sort_values(["iterations_saved", "agreement"], ascending=[False, False], kind="stable")
    best_so_far = ranked["agreement"].cummax().shift(fill_value=-np.inf)
    return ranked[ranked["agreement"] > best_so_far].iloc[::-1]


def pareto_figure(table: pd.DataFrame, min_agreement: float | None = 0.99):
    """Compute saved against agreement, one marker series per criterion, the Pareto front as a
    line and, when one qualifies, the `recommend`ed row starred."""
    import plotly.graph_objects as go

    if table.empty:
        raise ValueError("the what-if table is empty: no criterion could be evaluated")
    fig = go.Figure()
    for criterion, rows in table.groupby("criterion", sort=False):
        fig.add_trace(go.Scatter(
            x=rows["iterations_saved"], y=rows["agreement"], mode="markers", name=criterion,
            customdata=rows[["threshold", "mean_iterations"]].to_numpy(),
            hovertemplate=f"{criterion} τ=%{{customdata[0]:.3g}}<br>saved %{{x:.1%}}, agreement %{{y:.1%}}"
                          "<br>mean iterations %{customdata[1]:.2f}<extra></extra>",
        ))
    front = pareto_front(table)
    fig.add_trace(go.Scatter(x=front["iterations_saved"], y=front["agreement"], mode="lines",
                             name="Pareto front", line=dict(color="grey", dash="dot"), hoverinfo="skip"))
    if min_agreement is not None:
        fig.add_hline(y=min_agreement, line=dict(color="firebrick", dash="dash", width=1),
                      annotation_text=f"agreement {min_agreement:.0%}")
        try:
            best = recommend(table, min_agreement)
        except ValueError:
            best = None
        if best is not None:
            fig.add_trace(go.Scatter(
                x=[best["iterations_saved"]], y=[best["agreement"]], mode="markers",
                marker=dict(symbol="star", size=16, color="gold", line=dict(color="black", width=1)),
                name=f"recommended: {best['criterion']} τ={best['threshold']:.3g}",
            ))
    fig.update_layout(title="Early-exit what-if: compute saved vs agreement with full depth",
                      legend_title_text="criterion")
    fig.update_xaxes(title_text="loop iterations saved (share of executed iterations)", tickformat=".0%")
    fig.update_yaxes(title_text="top-1 agreement with the full-depth prediction (share of positions)", tickformat=".0%")
    return fig
