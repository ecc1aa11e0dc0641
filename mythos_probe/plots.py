"""Notebook figures of recorded `LoopTrace`s: `rec.plot.<figure>()` returns a plotly `go.Figure`,
which Jupyter renders inline.

Figures: `convergence_heatmap` (a metric per position and iteration, with each position's halting
step), `convergence` (per-iteration residual, forwards overlaid), `halting_curves`,
`expert_heatmap`, `spectral`, `coda_lens`, `whatif` (the early-exit Pareto plot of
`mythos_probe.whatif`), `exit_steps` (split by an attribute, with counts), `depth_profile`
(positions still running per iteration), `sweep` (accuracy or agreement against loops, the
overthinking drop) and `compare` (two forwards, metric by metric). Iterations are 0-based loop indices t, as in the records.

This module is not: the metric formulas (`mythos_probe.metrics`), the DataFrames (`frames.py`)
or the dashboard (`dashboards/`, which reads the store and never imports this). It only reads
trace arrays; nothing here re-computes a metric.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mythos_probe.records import LoopTrace

_LOG_METRICS = {"rel_residual", "cos_step", "lens_kl_final", "lens_kl_prev", "state_norm"}
_UNITS = {
    "rel_residual": "‖h_t − h_{t−1}‖ / ‖h_t‖ (ratio)",
    "cos_step": "1 − cos(h_t, h_{t−1})",
    "state_norm": "‖h_t‖ (L2 norm)",
    "halt_prob": "halting probability p_t",
    "cum_halt": "cumulative halting probability",
    "act_weight": "ACT weight of h_t",
    "lens_kl_final": "KL(p_T ‖ p_t) (nats)",
    "lens_kl_prev": "KL(p_t ‖ p_{t−1}) (nats)",
    "lens_entropy": "lens entropy (nats)",
    "lens_argmax": "lens argmax (token id)",
    "lens_top1_agree": "lens top-1 = final (0/1)",
}
_ITERATION_AXIS = "loop iteration t (0-based)"


class Plots:
    """Figures over a list of traces (what `Recorder.plot` returns)."""

    def __init__(self, traces: Sequence[LoopTrace]) -> None:
        if not traces:
            raise ValueError("no traces to plot: run the model inside `with attach(model) as rec:` first")
        self.traces = list(traces)

    def _trace(self, index: int) -> LoopTrace:
        try:
            return self.traces[index]
        except IndexError:
            raise IndexError(f"trace {index} out of range: {len(self.traces)} traces recorded") from None

    def _iteration_metric(self, trace: LoopTrace, name: str, probe: str) -> np.ndarray:
        values = trace.iteration_metrics.get(name)
        if values is None or not np.isfinite(values).any():
            raise ValueError(f"trace has no {name!r}: attach with probes including {probe!r}, e.g. "
                             f"attach(model, probes=[*DEFAULT_PROBES, {probe!r}]) with DEFAULT_PROBES from "
                             "mythos_probe.probes.reductions")
        return values

    # -- convergence ---------------------------------------------------------------------------

    def convergence_heatmap(self, trace: int = -1, metric: str = "rel_residual", batch_index: int = 0) -> go.Figure:
        """`metric` per position (rows) and iteration (columns) for one sequence of one forward;
        a log colour scale for residual-like metrics; ✕ marks each position's last iteration
        (`position_iterations` − 1, where it halted)."""
        tr = self._trace(trace)
        if tr.detail != "positions":
            raise ValueError(
                "the convergence heatmap needs per-position metrics: attach(model, detail='positions')"
            )
        if metric not in tr.position_metrics:
            raise ValueError(f"no position metric {metric!r} in this trace; recorded: {sorted(tr.position_metrics)}")
        if not 0 <= batch_index < tr.batch:
            raise IndexError(f"batch_index {batch_index} out of range for batch {tr.batch}")
        z = tr.position_metrics[metric][batch_index].astype(np.float64)  # (T, I)
        log = metric in _LOG_METRICS
        positions = np.arange(tr.seq_len)
        labels = [str(p) for p in positions]
        if tr.token_text is not None:
            labels = [f"{p}: {text!r}" for p, text in zip(positions, tr.token_text[batch_index])]
        elif tr.token_ids is not None:
            labels = [f"{p}: #{tok}" for p, tok in zip(positions, tr.token_ids[batch_index])]
        unit = _UNITS.get(metric, metric)
        colour = z
        colorbar = dict(title=unit)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                colour = np.where(z > 0, np.log10(z), np.nan)
            finite = colour[np.isfinite(colour)]
            if finite.size:
                ticks = np.arange(np.floor(finite.min()), np.ceil(finite.max()) + 1)
                colorbar.update(title=f"{unit}, log scale", tickvals=ticks, ticktext=[f"1e{int(k)}" for k in ticks])
        fig = go.Figure(go.Heatmap(
            z=colour, x=np.arange(tr.iterations), y=labels, customdata=z, colorscale="Viridis",
            colorbar=colorbar, hovertemplate="position %{y}<br>t=%{x}<br>" + metric + "=%{customdata:.3g}<extra></extra>",
        ))
        if tr.position_iterations is not None:
            last = tr.position_iterations[batch_index] - 1
            fig.add_trace(go.Scatter(
                x=last, y=labels, mode="markers", name="halting step",
                marker=dict(symbol="x", size=9, color="crimson", line=dict(width=1, color="white")),
                hovertemplate="position %{y}<br>last iteration %{x}<extra></extra>",
            ))
        fig.update_layout(title=f"{metric} by position and iteration (step {tr.step}, batch index {batch_index})",
                          legend=dict(orientation="h", y=-0.15))
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1)
        fig.update_yaxes(title_text="position (token index)", autorange="reversed", type="category")
        return fig

    def convergence(self, metric: str = "rel_residual") -> go.Figure:
        """Per-iteration `metric` (mean over positions), one line per recorded forward."""
        fig = go.Figure()
        for i, tr in enumerate(self.traces):
            values = tr.iteration_metrics.get(metric)
            if values is None:
                continue
            fig.add_trace(go.Scatter(x=np.arange(tr.iterations), y=values, mode="lines+markers",
                                     name=f"forward {i} (step {tr.step})"))
        if not fig.data:
            raise ValueError(f"no trace has {metric!r}: attach with probes including 'convergence'")
        fig.update_layout(title=f"{metric} per iteration", showlegend=len(fig.data) <= 20)
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1)
        fig.update_yaxes(title_text=_UNITS.get(metric, metric) + ", mean over positions",
                         type="log" if metric in _LOG_METRICS else "linear")
        return fig

    # -- halting -------------------------------------------------------------------------------

    def halting_curves(self) -> go.Figure:
        """Left: share of positions finished after iteration t (from `exit_count`, all forwards
        pooled) and the mean cumulative halting probability. Right: histogram of iterations used."""
        width = max(tr.iterations for tr in self.traces)
        exits = np.zeros(width)
        cum, cum_tokens = np.zeros(width), np.zeros(width)
        for tr in self.traces:
            count = tr.iteration_metrics.get("exit_count")
            if count is not None:
                exits[: tr.iterations] += count
            halt = tr.iteration_metrics.get("cum_halt")
            if halt is not None:
                tokens = tr.batch * tr.seq_len
                cum[: tr.iterations] += np.nan_to_num(halt) * tokens
                cum_tokens[: tr.iterations] += tokens
        if exits.sum() == 0:
            raise ValueError("no trace has exit counts: record forwards with attach(model)")
        fig = make_subplots(rows=1, cols=2, subplot_titles=("halting by iteration", "iterations used per position"))
        t = np.arange(width)
        fig.add_trace(go.Scatter(x=t, y=np.cumsum(exits) / exits.sum(), mode="lines+markers",
                                 name="finished (share of positions)"), row=1, col=1)
        if cum_tokens.any():
            with np.errstate(invalid="ignore"):
                fig.add_trace(go.Scatter(x=t, y=cum / cum_tokens, mode="lines+markers", line=dict(dash="dash"),
                                         name="mean cumulative halting probability"), row=1, col=1)
        fig.add_trace(go.Bar(x=t + 1, y=exits, name="positions", showlegend=False), row=1, col=2)
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1, row=1, col=1)
        fig.update_yaxes(title_text="share of positions / probability", range=[0, 1.05], row=1, col=1)
        fig.update_xaxes(title_text="iterations used (count)", dtick=1, row=1, col=2)
        fig.update_yaxes(title_text="positions (count)", row=1, col=2)
        fig.update_layout(title=f"Halting over {len(self.traces)} forward(s)", legend=dict(orientation="h", y=-0.2))
        return fig

    # -- experts -------------------------------------------------------------------------------

    def expert_heatmap(self, trace: int = -1) -> go.Figure:
        """Tokens routed to each expert (rows) at each iteration (columns) of one forward."""
        tr = self._trace(trace)
        if tr.expert_load is None:
            raise ValueError("trace has no expert loads: attach with probes including 'experts' on a MoE model")
        load = tr.expert_load.T  # (E, I)
        fig = go.Figure(go.Heatmap(
            z=load, x=np.arange(tr.iterations), y=np.arange(tr.n_experts), colorscale="Blues",
            colorbar=dict(title="tokens routed (count)"),
            hovertemplate="expert %{y}<br>t=%{x}<br>%{z} tokens<extra></extra>",
        ))
        fig.update_layout(title=f"Expert load by iteration (step {tr.step})")
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1)
        fig.update_yaxes(title_text="routed expert (index)", dtick=1)
        return fig

    # -- spectral ------------------------------------------------------------------------------

    def spectral(self, trace: int = -1) -> go.Figure:
        """Per iteration of one forward: ‖h_t‖ and the growth ratio ‖h_t‖/‖h_{t−1}‖, with ρ(Ā) and
        1 as references. With several forwards, a second row follows ρ(Ā), the last state norm and
        the largest growth ratio over the recorded steps."""
        tr = self._trace(trace)
        norm = self._iteration_metric(tr, "state_norm", "spectral")
        growth = self._iteration_metric(tr, "growth_ratio", "spectral")
        rho = tr.forward_metrics.get("rho_A")
        several = len(self.traces) > 1
        fig = make_subplots(rows=2 if several else 1, cols=2, subplot_titles=(
            "state norm per iteration", "growth ratio per iteration",
            *(("ρ(Ā) and growth over forwards", "state norm over forwards") if several else ())))
        t = np.arange(tr.iterations)
        fig.add_trace(go.Scatter(x=t, y=norm, mode="lines+markers", name="‖h_t‖"), row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=growth, mode="lines+markers", name="‖h_t‖/‖h_{t−1}‖"), row=1, col=2)
        fig.add_hline(y=1.0, line=dict(color="grey", dash="dot", width=1), row=1, col=2)
        if rho is not None and np.isfinite(rho):
            fig.add_hline(y=rho, line=dict(color="firebrick", dash="dash", width=1), row=1, col=2,
                          annotation_text=f"ρ(Ā) = {rho:.3f}")
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1, row=1)
        fig.update_yaxes(title_text="‖h_t‖ (L2 norm, mean over positions)", row=1, col=1)
        fig.update_yaxes(title_text="growth ratio (× per iteration)", row=1, col=2)
        if several:
            steps = np.array([other.step for other in self.traces])
            x, label = (steps, "step") if np.all(np.diff(steps) > 0) else (np.arange(len(steps)), "forward (recorded order)")

            def series(fn):
                return np.array([fn(other) for other in self.traces], dtype=np.float64)

            nan = np.full(1, np.nan)
            fig.add_trace(go.Scatter(x=x, y=series(lambda o: o.forward_metrics.get("rho_A", np.nan)),
                                     mode="lines+markers", name="ρ(Ā)"), row=2, col=1)
            fig.add_trace(go.Scatter(
                x=x, y=series(lambda o: np.nanmax(o.iteration_metrics.get("growth_ratio", nan))),
                mode="lines+markers", name="max growth ratio"), row=2, col=1)
            fig.add_trace(go.Scatter(x=x, y=series(lambda o: o.iteration_metrics.get("state_norm", nan)[-1]),
                                     mode="lines+markers", name="last ‖h_t‖"), row=2, col=2)
            fig.update_xaxes(title_text=label, row=2)
            fig.update_yaxes(title_text="ratio (spectral radius / growth)", row=2, col=1)
            fig.update_yaxes(title_text="‖h_T‖ (L2 norm)", row=2, col=2)
        fig.update_layout(title="Spectral stability of the loop", legend=dict(orientation="h", y=-0.15))
        return fig

    # -- coda lens -----------------------------------------------------------------------------

    def coda_lens(self, trace: int = -1) -> go.Figure:
        """Coda lens over iterations of one forward: KL(p_T ‖ p_t) to the output distribution (log
        scale) and the share of sampled positions whose lens argmax is already the final one."""
        tr = self._trace(trace)
        kl = self._iteration_metric(tr, "lens_kl_final", "lens")
        agree = self._iteration_metric(tr, "lens_top1_agree", "lens")
        t = np.arange(tr.iterations)
        fig = make_subplots(rows=1, cols=2, subplot_titles=("KL to the final distribution", "top-1 agreement"))
        fig.add_trace(go.Scatter(x=t, y=kl, mode="lines+markers", name="KL(p_T ‖ p_t)"), row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=agree, mode="lines+markers", name="top-1 = final"), row=1, col=2)
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1)
        fig.update_yaxes(title_text="KL (nats, log scale)", type="log", row=1, col=1)
        fig.update_yaxes(title_text="share of lens positions", range=[0, 1.05], tickformat=".0%", row=1, col=2)
        fig.update_layout(title=f"Coda lens (step {tr.step})", legend=dict(orientation="h", y=-0.2))
        return fig

    # -- early exit ----------------------------------------------------------------------------

    def whatif(self, thresholds: Mapping[str, Iterable[float]] | None = None, min_agreement: float = 0.99) -> go.Figure:
        """The early-exit what-if of these traces (`mythos_probe.whatif.evaluate`) as a Pareto plot."""
        from mythos_probe import whatif

        return whatif.pareto_figure(whatif.evaluate(self.traces, thresholds), min_agreement)

    # -- issue 25: the looped-model papers' views ----------------------------------------------

    def _group_of(self, trace: LoopTrace, by: str | None) -> str:
        if by is None:
            return "all"
        if by in trace.attributes:
            return str(trace.attributes[by])
        if by in _TRACE_GROUPS:
            return str(getattr(trace, by))
        return "(unset)"

    def exit_steps(self, by: str | None = None, share: bool = False) -> go.Figure:
        """Tokens by exit step (iterations used, from `exit_count`), one bar series per value of
        `by` (an attribute key such as "task" or "endpoint", or `model_id`, `run_id`, `kind`,
        `loop_name`, `exit_policy`); each bar labelled with its count. With `share`, each group's
        bars are its share of the group's tokens (groups of different sizes side by side)."""
        if by is not None and by not in _TRACE_GROUPS and not any(by in t.attributes for t in self.traces):
            keys = sorted({k for t in self.traces for k in t.attributes})
            raise ValueError(f"no trace has attribute {by!r}; attributes: {keys}, or one of {list(_TRACE_GROUPS)}")
        counts: dict[str, np.ndarray] = {}
        forwards: dict[str, int] = {}
        for tr in self.traces:
            exits = tr.iteration_metrics.get("exit_count")
            if exits is None:
                continue
            group = self._group_of(tr, by)
            total = counts.setdefault(group, np.zeros(0))
            if len(total) < len(exits):
                total = np.r_[total, np.zeros(len(exits) - len(total))]
            total[: len(exits)] += np.nan_to_num(exits)
            counts[group] = total
            forwards[group] = forwards.get(group, 0) + 1
        if not counts:
            raise ValueError("no trace has exit counts: record forwards with attach(model) (the 'halting' probe)")
        fig = go.Figure()
        for group in sorted(counts):
            total = counts[group]
            used = np.flatnonzero(total) + 1
            tokens = total[used - 1]
            y = tokens / tokens.sum() if share else tokens
            fig.add_trace(go.Bar(x=used, y=y, name=f"{group} ({int(tokens.sum()):,} tokens, {forwards[group]} forwards)",
                                 text=[f"{int(n):,}" for n in tokens], textposition="outside", customdata=tokens,
                                 hovertemplate="exit step %{x}<br>%{customdata:,} tokens<extra>%{fullData.name}</extra>"))
        fig.update_layout(barmode="group", title="Exit steps" + (f" by {by}" if by else ""),
                          legend=dict(orientation="h", y=-0.2))
        fig.update_xaxes(title_text="exit step (iterations used)", dtick=1)
        fig.update_yaxes(title_text="share of the group's tokens" if share else "tokens (count)",
                         tickformat=".0%" if share else None)
        return fig

    def depth_profile(self, by: str | None = None) -> go.Figure:
        """Positions still running at each iteration t (their `position_iterations` > t), summed
        over the forwards of each group (left), and as the share of the group's positions (right):
        Mixture-of-Recursions' active tokens per depth. Needs per-token depths."""
        active: dict[str, np.ndarray] = {}
        positions: dict[str, int] = {}
        for tr in self.traces:
            if tr.position_iterations is None:
                continue
            group = self._group_of(tr, by)
            used = tr.position_iterations.ravel()
            running = (used[:, None] > np.arange(tr.iterations)).sum(axis=0).astype(float)
            total = active.get(group, np.zeros(0))
            if len(total) < len(running):
                total = np.r_[total, np.zeros(len(running) - len(total))]
            total[: len(running)] += running
            active[group] = total
            positions[group] = positions.get(group, 0) + used.size
        if not active:
            raise ValueError("no trace has per-position depths (position_iterations): the depth profile needs a model "
                             "whose positions stop at their own iteration (ACT, early exit, a recursion router)")
        fig = make_subplots(rows=1, cols=2, subplot_titles=("active positions (count)", "share still running"))
        for group in sorted(active):
            t = np.arange(len(active[group]))
            fig.add_trace(go.Bar(x=t, y=active[group], name=f"{group}", legendgroup=group, text=active[group].astype(int),
                                 textposition="outside"), row=1, col=1)
            fig.add_trace(go.Scatter(x=t, y=active[group] / positions[group], mode="lines+markers", legendgroup=group,
                                     name=f"{group} (share of {positions[group]:,} positions)"), row=1, col=2)
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1)
        fig.update_yaxes(title_text="positions still running (count)", row=1, col=1)
        fig.update_yaxes(title_text="share of positions", range=[0, 1.05], tickformat=".0%", row=1, col=2)
        fig.update_layout(title="Depth profile: positions still running per iteration", barmode="group",
                          legend=dict(orientation="h", y=-0.2))
        return fig

    def sweep(self, frame=None) -> go.Figure:
        """Accuracy (else agreement with the deepest run) against the number of loops, from a
        `mythos_probe.sweep` result `frame` or, without one, from the sweep forwards recorded here
        (`sweep(..., on_trace=[...])`). ★ marks the best loop count; ✕ loop counts past it that
        score lower: where extra loops hurt."""
        from mythos_probe.loop_sweep import sweep_from_traces

        if frame is None:
            frame = sweep_from_traces(self.traces)
            if frame.empty:
                raise ValueError("no sweep forwards recorded: pass the frame mythos_probe.sweep returned, or record "
                                 "the sweep with sweep(model, inputs, on_trace=[...])")
        frame = frame.copy()
        if "sweep" not in frame:
            frame["sweep"] = "sweep"
        accuracy = frame["accuracy"] if "accuracy" in frame else None
        has_accuracy = accuracy is not None and accuracy.notna().any()
        frame["score"] = accuracy.where(accuracy.notna(), frame["agreement"]) if accuracy is not None else frame["agreement"]
        fig = go.Figure()
        for name, part in frame.groupby("sweep", sort=False):
            part = part.sort_values("loops")
            best = part["score"].max()
            first_best = part.loc[part["score"] == best, "loops"].min()
            hurts = part[(part["loops"] > first_best) & (part["score"] < best)]
            fig.add_trace(go.Scatter(x=part["loops"], y=part["score"], mode="lines+markers", name=str(name)))
            if has_accuracy:
                fig.add_trace(go.Scatter(x=part["loops"], y=part["agreement"], mode="lines", line=dict(dash="dot"),
                                         name=f"{name}: agreement with the deepest run"))
            fig.add_trace(go.Scatter(x=part.loc[part["score"] == best, "loops"], y=np.full((part["score"] == best).sum(), best),
                                     mode="markers", marker=dict(symbol="star", size=13, color="#f59e0b"),
                                     name=f"{name}: best ({best:.1%})"))
            if len(hurts):
                fig.add_trace(go.Scatter(x=hurts["loops"], y=hurts["score"], mode="markers",
                                         marker=dict(symbol="x", size=10, color="crimson"),
                                         name=f"{name}: extra loops hurt (down to {hurts['score'].min():.1%})"))
        fig.update_xaxes(title_text="loops (fixed depth)", dtick=1)
        fig.update_yaxes(title_text="accuracy" if has_accuracy else "agreement with the deepest run", tickformat=".0%")
        fig.update_layout(title="Accuracy against loops" if has_accuracy else "Agreement with full depth against loops",
                          legend=dict(orientation="h", y=-0.2))
        return fig

    def compare(self, a: int = -2, b: int = -1,
                metrics: Sequence[str] = ("rel_residual", "state_norm", "halted_fraction", "lens_kl_final")) -> go.Figure:
        """Two recorded forwards side by side: each of `metrics` per iteration, A and B overlaid,
        and a table of their per-forward metrics with B − A."""
        first, second = self._trace(a), self._trace(b)
        shown = [m for m in metrics if m in first.iteration_metrics or m in second.iteration_metrics]
        if not shown:
            raise ValueError(f"neither forward has any of {list(metrics)}; recorded: {sorted(first.iteration_metrics)}")
        fig = make_subplots(rows=len(shown) + 1, cols=1, subplot_titles=[*shown, "per-forward metrics"],
                            specs=[[{"type": "xy"}]] * len(shown) + [[{"type": "table"}]], vertical_spacing=0.05)
        for label, tr, colour in (("A", first, "#2563eb"), ("B", second, "crimson")):
            for row, metric in enumerate(shown, start=1):
                values = tr.iteration_metrics.get(metric)
                if values is None:
                    continue
                fig.add_trace(go.Scatter(x=np.arange(tr.iterations), y=values, mode="lines+markers", legendgroup=label,
                                         name=f"{label}: forward {a if label == 'A' else b} (step {tr.step})",
                                         showlegend=row == 1, line=dict(color=colour)), row=row, col=1)
        names = sorted(set(first.forward_metrics) | set(second.forward_metrics))
        va = np.array([first.forward_metrics.get(n, np.nan) for n in names], dtype=float)
        vb = np.array([second.forward_metrics.get(n, np.nan) for n in names], dtype=float)
        cells = [["iterations", *names], [first.iterations, *np.round(va, 6)], [second.iterations, *np.round(vb, 6)],
                 [second.iterations - first.iterations, *np.round(vb - va, 6)]]
        fig.add_trace(go.Table(header=dict(values=["metric", "A", "B", "B − A"]), cells=dict(values=cells)),
                      row=len(shown) + 1, col=1)
        fig.update_xaxes(title_text=_ITERATION_AXIS, dtick=1, row=len(shown), col=1)
        fig.update_layout(title="Two forwards, metric by metric", height=260 * len(shown) + 420)
        return fig

    # -- latent trajectories (issue 25) ------------------------------------------------------------

    def trajectories(self, trace: int = -1, batch_index: int = 0, positions: Sequence[int] | None = None,
                     components: tuple[int, int] = (1, 2)) -> go.Figure:
        """Huginn's latent trajectories: for each position, its states h_0 … h_{I−1} projected on
        that position's own principal directions `components` (PCA over its iterations, centred:
        `traj_pc1` … `traj_pc3`), one path per position with a marker per iteration; ○ marks
        iteration 0 and ★ the fixed point (the first iteration with `traj_fixed`, from which the
        state stops moving). Axes are per-position coordinates: two paths share a plot, not a basis.
        The legend gives each position's share of variance on the two directions."""
        tr = self._trace(trace)
        names = [f"traj_pc{c}" for c in components]
        if len(components) != 2 or not all(c in (1, 2, 3) for c in components):
            raise ValueError(f"components takes two of 1, 2, 3 (the principal directions kept), got {components!r}")
        if tr.detail != "positions" or any(n not in tr.position_metrics for n in names):
            raise ValueError("this trace has no trajectories: attach(model, probes=[*DEFAULT_PROBES, 'trajectory'], "
                             "detail='positions') with DEFAULT_PROBES from mythos_probe.probes.reductions")
        if not 0 <= batch_index < tr.batch:
            raise IndexError(f"batch_index {batch_index} out of range for batch {tr.batch}")
        chosen = list(range(tr.seq_len)) if positions is None else [int(p) for p in positions]
        bad = [p for p in chosen if not 0 <= p < tr.seq_len]
        if bad:
            raise IndexError(f"positions {bad} out of range for a sequence of {tr.seq_len} tokens")
        x, y = (tr.position_metrics[n][batch_index] for n in names)  # (T, I)
        shares = [tr.position_metrics[f"{n}_share"][batch_index, :, 0] for n in names]
        fixed = tr.position_metrics.get("traj_fixed")
        t = np.arange(tr.iterations)
        fig = go.Figure()
        for p in chosen:
            label = str(p)
            if tr.token_text is not None:
                label = f"{p}: {tr.token_text[batch_index][p]!r}"
            elif tr.token_ids is not None:
                label = f"{p}: #{tr.token_ids[batch_index][p]}"
            share = " + ".join(f"{s[p]:.0%}" if np.isfinite(s[p]) else "–" for s in shares)
            fig.add_trace(go.Scatter(
                x=x[p], y=y[p], mode="lines+markers", name=f"{label} ({share})", legendgroup=str(p),
                customdata=t, marker=dict(size=5),
                hovertemplate=f"position {label}<br>t=%{{customdata}}<br>PC{components[0]}=%{{x:.3g}}"
                              f"<br>PC{components[1]}=%{{y:.3g}}<extra></extra>",
            ))
            fig.add_trace(go.Scatter(x=x[p, :1], y=y[p, :1], mode="markers", legendgroup=str(p), showlegend=False,
                                     marker=dict(symbol="circle-open", size=11, color="black"),
                                     hovertemplate=f"position {label}: t=0<extra></extra>"))
            if fixed is not None and fixed[batch_index, p].any():
                at = int(np.argmax(fixed[batch_index, p] > 0))
                fig.add_trace(go.Scatter(
                    x=x[p, at:at + 1], y=y[p, at:at + 1], mode="markers", legendgroup=str(p), showlegend=False,
                    name="fixed point", marker=dict(symbol="star", size=14, color="gold", line=dict(width=1, color="black")),
                    hovertemplate=f"position {label}: fixed point from t={at}<extra></extra>"))
        fig.update_layout(title=f"Latent trajectories (step {tr.step}, batch index {batch_index}): ○ t=0, ★ fixed point",
                          legend=dict(title="position (variance share)"))
        fig.update_xaxes(title_text=f"PC{components[0]} of the position's own states (projection, L2 units)")
        fig.update_yaxes(title_text=f"PC{components[1]} (projection, L2 units)")
        return fig


_TRACE_GROUPS = ("model_id", "run_id", "kind", "loop_name", "exit_policy")
