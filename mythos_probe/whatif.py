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

The baseline is a full-depth forward, `exit="fixed"` (the demo runs one beside each served
request and tags it `kind="shadow"`): when any is given, only those are replayed, since a forward
that stopped early (ACT) makes "agreement with full depth" mean agreement with its own, shallower
output. Without one, the served forwards are replayed with a warning and every row says so in its
`baseline` column ("served", not "full depth"). A criterion that never
fires exits at the last executed iteration. Per position: exit iteration t_exit, iterations used
t_exit + 1, and agreement = `lens_top1_agree[t_exit]` (the lens argmax at the exit iteration equals
the full-depth output argmax). Iterations saved are relative to running every iteration the
forward executed (`LoopTrace.iterations`), summed over positions. FLOPs saved, as a share of the
replayed forwards' FLOPs (`flops`), the sampled positions standing for all:

    flops_saved = loop_share · iterations_saved − lens_cost,
    lens_cost   = lens_share · (1 − iterations_saved)  for the criteria in LENS_CRITERIA, else 0,

with loop_share = Σ loop_flops / Σ flops (what a compacted loop saves per iteration skipped) and
lens_share = Σ iterations · lens_flops / Σ flops (the cost probe's `lens_flops`: one coda-lens
readout of every position). A policy running `kl`, `entropy` or `argmax_stable` must read the
lens out on every running position at every iteration it runs, which can cost more than the
iterations it skips (then flops_saved < 0). NaN without the cost probe; NaN for the lens criteria
when a replayed forward has no `lens_flops` (a `LoopSpec` model), never a saving that leaves the
lens out. `recommend` ranks by FLOPs saved and never recommends a row that saves nothing.

`verify` runs a policy for real next to the replay's prediction: measured time, executed FLOPs
(counted at the dispatcher, `executed_flops.ExecutedFlops`) and agreement with a full-depth run of
the same inputs. The prediction counts the running positions only; the real run also computes the
keys and values of exited positions that later ones attend to, runs every position at the
iterations it does not compact and, under ACT, keeps updating halted positions while their row
still has a running one, so it saves less.

This module is not: an exit policy the model runs (`model/looped.py` has `exit="kl"/"latent"`)
nor the SQL form of the replay (`dashboards/whatif.py`, equal row for row). All criteria and
thresholds are evaluated at once with numpy over (thresholds × positions × iterations); numpy and
pandas only at import (`verify` imports torch when called).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import warnings

import numpy as np
import pandas as pd

from mythos_probe.records import LoopTrace
from mythos_probe.user_frame import outside

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
# Which way each criterion fires on its score: below τ, or at and above τ. The score is the INPUTS
# metric, except for entropy (its change since the previous iteration) and argmax_stable (how many
# iterations the argmax has stayed the same), which the numpy replay here and its SQL twin
# (`dashboards/whatif.py`) each derive; both read this one table for the direction.
FIRES = {"act": "at_least", "kl": "below", "rel_residual": "below", "cos_step": "below", "entropy": "below",
         "argmax_stable": "at_least"}
_LENS = ("lens_argmax", "lens_top1_agree")
# Criteria a policy can only run by reading the coda lens out at every iteration: they pay its FLOPs.
LENS_CRITERIA = ("kl", "entropy", "argmax_stable")

COLUMNS = ["criterion", "threshold", "mean_iterations", "iterations_saved", "flops_saved", "lens_cost", "agreement",
           "positions", "baseline"]

BASELINE = "fixed"  # the exit policy of a full-depth forward, the baseline the replay compares against
BASELINES = ("full depth", "served")  # the `baseline` column: full-depth forwards, or (none given) the served ones
NO_FULL_DEPTH = (
    "no full-depth forward (exit='fixed') among the traces: agreement is measured against the served forwards' own "
    "outputs, not full depth. Run a shadow forward at full depth beside each served one, e.g. model(ids, "
    "exit='fixed'), tagged kind='shadow'"
)

# The model's exit policies and the replay criterion each one runs.
POLICY_CRITERIA = {"act": "act", "kl": "kl", "latent": "rel_residual"}


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
        full = [t for t in traces if t.exit_policy == BASELINE and np.isfinite(t.position_metrics["lens_argmax"]).any()]
        self.baseline = BASELINES[0] if full else BASELINES[1]
        if full:
            traces = full
        else:
            warnings.warn(NO_FULL_DEPTH, stacklevel=outside())
        self.available = tuple(c for c in CRITERIA if all(INPUTS[c] in t.position_metrics for t in traces))
        width = max(t.iterations for t in traces)
        names = sorted({INPUTS[c] for c in self.available} | {"lens_top1_agree"})
        parts: dict[str, list[np.ndarray]] = {m: [] for m in names}
        n, keys, loop_flops, lens_flops, flops = [], [], [], [], []
        for t in traces:
            sampled = np.isfinite(t.position_metrics["lens_argmax"][..., 0])  # (B, T)
            b, p = np.nonzero(sampled)
            if b.size:
                loop_flops.append(t.forward_metrics.get("loop_flops", np.nan))
                lens_flops.append(t.iterations * t.forward_metrics.get("lens_flops", np.nan))  # a readout per iteration
                flops.append(t.forward_metrics.get("flops", np.nan))
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
        self.loop_share = float(np.sum(loop_flops) / np.sum(flops))  # NaN when the cost probe was off
        self.lens_share = float(np.sum(lens_flops) / np.sum(flops))  # NaN also when a forward has no lens_flops

    def fires(self, criterion: str, thresholds: np.ndarray) -> np.ndarray:
        """(K, P, I) bool: criterion fired at iteration t for threshold k (NaN never fires)."""
        score = self.metrics[INPUTS[criterion]]
        if criterion == "entropy":
            score = np.abs(np.diff(score, prepend=np.nan))  # its change along the iterations; NaN at t = 0
        elif criterion == "argmax_stable":
            score = _stable_run(score)
        th = thresholds[:, None, None]  # NaN compares False without a warning: it never fires
        return score[None] >= th if FIRES[criterion] == "at_least" else score[None] < th

    def exits(self, criterion: str, thresholds: np.ndarray) -> np.ndarray:
        """(K, P) exit iteration: the first firing one, else the last executed one."""
        width = self.metrics["lens_top1_agree"].shape[1]
        # `<=` would let iteration n fire, but it is NaN padding, which never fires (argmax_stable's run is 0 there: k ≤ 0 fires at 0 first)
        executed = np.arange(width) < self.n[:, None]  # pragma: no mutate (`<=` is equivalent, above)
        fired = self.fires(criterion, thresholds) & executed
        return np.where(fired.any(-1), fired.argmax(-1), self.n - 1)

    def agreement(self, exit_at: np.ndarray) -> np.ndarray:
        """(K, P) lens_top1_agree at the exit iteration."""
        agree = self.metrics["lens_top1_agree"]
        return np.take_along_axis(
            np.broadcast_to(agree, exit_at.shape + agree.shape[1:]), exit_at[..., None],
            -1,  # pragma: no mutate (numpy ≥ 2.3 defaults axis to -1, which 1.26 needs given)
        )[..., 0]


def _stable_run(argmax: np.ndarray) -> np.ndarray:
    """(P, I) → (P, I): for how many iterations before t the argmax has equalled argmax[t]
    (0 at t = 0 and after every change). Vectorized with a running max of the last change."""
    steps = np.arange(argmax.shape[1])
    changed = np.ones(argmax.shape, dtype=bool)  # pragma: no mutate (float ones: the same truth values below)
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
    """One row per (criterion, threshold) over the full-depth (`exit="fixed"`) traces, the others
    left out (none given: all, with a warning; see `baseline`): mean_iterations used per position, iterations_saved (share of the executed
    iterations, summed over positions), flops_saved (share of the forwards' FLOPs, net of the
    lens readouts the lens criteria need), lens_cost (the share of the forwards' FLOPs those
    readouts take: 0 for the other criteria), agreement (share of positions whose prediction at
    exit equals the baseline's), positions replayed and baseline ("full depth", or "served" when
    no full-depth forward was given). flops_saved and lens_cost are NaN where the cost probe's
    `loop_flops`/`flops` are missing, and for the lens criteria where `lens_flops` is (module
    docstring).

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
        saved = 1.0 - used.sum(1) / total  # (K, P): axis 1 is the positions
        lens_cost = pos.lens_share * (1.0 - saved) if criterion in LENS_CRITERIA else np.zeros_like(saved)
        rows.append(pd.DataFrame({
            "criterion": criterion, "threshold": th, "mean_iterations": used.mean(1),
            "iterations_saved": saved, "flops_saved": saved * pos.loop_share - lens_cost, "lens_cost": lens_cost,
            "agreement": pos.agreement(exit_at).mean(1), "positions": used.shape[1], "baseline": pos.baseline,
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)


def exits(traces: Sequence[LoopTrace], criterion: str, threshold: float) -> pd.DataFrame:
    """Per lens-sampled position: trace_id, span_id, batch_index, position, exit_iteration,
    iterations_used, iterations_run and agrees (prediction at exit == full-depth prediction)."""
    pos = _Positions(traces)
    if criterion not in pos.available:
        raise ValueError(f"criterion {criterion!r} is not available in these traces; available: {pos.available}")
    exit_at = pos.exits(criterion, np.array([float(threshold)]))
    return pos.keys.assign(
        exit_iteration=exit_at[0], iterations_used=exit_at[0] + 1, iterations_run=pos.n,
        agrees=pos.agreement(exit_at)[0] == 1.0,
    )


def recommend(table: pd.DataFrame, min_agreement: float = 0.99) -> pd.Series:
    """The (criterion, threshold) row that saves the most compute with agreement ≥ min_agreement:
    ranked by flops_saved where it is known, then (only where no such row saves anything) by
    iterations_saved among the rows whose FLOPs are unknown (no cost probe, or a lens criterion
    without `lens_flops`); ties: higher agreement first. A row that saves nothing (flops_saved ≤ 0,
    or unknown and iterations_saved ≤ 0) is never recommended. Raises ValueError saying how close
    the best row came when none keeps the agreement, and that exit='fixed' is the answer when the
    rows that keep it save no compute."""
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
    known = ok["flops_saved"].notna()
    # FLOPs first: a row of unknown cost (a lens criterion whose lens cost was not recorded) may
    # cost more than it saves, so it is only chosen when no row of known cost saves anything.
    ranked = pd.concat([
        ok[known].sort_values(kind="stable", by=["flops_saved", "agreement"],  # pragma: no mutate (2 columns: stable, any kind)
                              ascending=False),
        ok[~known].sort_values(kind="stable", by=["iterations_saved", "agreement"],  # pragma: no mutate (likewise)
                               ascending=False),
    ])
    saves = ranked[ranked["flops_saved"].gt(0) | (ranked["flops_saved"].isna() & ranked["iterations_saved"].gt(0))]
    if saves.empty:
        best = ranked.iloc[0]
        raise ValueError(
            f"no exit criterion with agreement ≥ {min_agreement:g} saves compute: the best, {best['criterion']} at "
            f"threshold {best['threshold']:g}, {_saving(best)}. Keep exit='fixed' (full depth costs less), or lower "
            "min_agreement."
        )
    return saves.iloc[0]


def _saving(row: pd.Series) -> str:
    """What a row saves, in words: FLOPs where known (with the lens readouts where they count)."""
    text = f"saves {row['iterations_saved']:.1%} of loop iterations"
    if np.isnan(row["flops_saved"]):
        if row["criterion"] in LENS_CRITERIA:
            return text + " (FLOPs saved unknown: no recorded cost for the loop or the coda lens it reads every iteration)"
        return text
    text += f" ({row['flops_saved']:.1%} of the forward's FLOPs"
    if row["criterion"] in LENS_CRITERIA:
        text += f", net of {row['lens_cost']:.1%} spent reading the coda lens every iteration"
    return text + ")"


def describe(best: pd.Series) -> str:
    """The one sentence the demo, the dashboard and the notebooks print for a `recommend`ed row,
    naming the baseline it was measured against and, for a criterion that reads the coda lens,
    what the readouts cost."""
    return (
        f"exit on {best['criterion']} at threshold {best['threshold']:.3g}: {_saving(best)} and keeps the "
        f"baseline's prediction on {best['agreement']:.1%} of {int(best['positions']):,} positions "
        f"({_BASELINE_TEXT[best['baseline']]})"
    )


_BASELINE_TEXT = {
    "full depth": "baseline: full-depth shadow forwards, exit='fixed'",
    "served": "baseline: the served forwards' own outputs, NOT full depth: record exit='fixed' shadow forwards",
}


def _axis(table: pd.DataFrame) -> tuple[str, str]:
    """The saving the figure plots: FLOPs when every row knows them (what `recommend` ranks by),
    else loop iterations; with its axis title."""
    if len(table) and table["flops_saved"].notna().all():
        return "flops_saved", "FLOPs saved (share of the forward's FLOPs, lens readouts paid)"
    return "iterations_saved", "loop iterations saved (share of executed iterations)"


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both the saving (FLOPs when every row knows them, else
    iterations) and agreement, by increasing saving."""
    saved = _axis(table)[0]
    ranked = table.sort_values(kind="stable", by=[saved, "agreement"],  # pragma: no mutate (2 columns: stable, any kind)
                               ascending=[False, False])
    best_so_far = ranked["agreement"].cummax().shift(fill_value=-np.inf)
    return ranked[ranked["agreement"] > best_so_far].iloc[::-1]


def pareto_figure(table: pd.DataFrame, min_agreement: float | None = 0.99):
    """Compute saved (FLOPs when every row knows them, else loop iterations) against agreement,
    one marker series per criterion, the Pareto front as a line and, when one qualifies, the
    `recommend`ed row starred."""
    import plotly.graph_objects as go

    if table.empty:
        raise ValueError("the what-if table is empty: no criterion could be evaluated")
    saved, title = _axis(table)
    fig = go.Figure()
    for criterion, rows in table.groupby("criterion", sort=False):  # pragma: no mutate (pandas reads sort=None as False)
        fig.add_trace(go.Scatter(
            x=rows[saved], y=rows["agreement"], mode="markers", name=criterion,
            customdata=rows[["threshold", "mean_iterations"]].to_numpy(),
            hovertemplate=f"{criterion} τ=%{{customdata[0]:.3g}}<br>saved %{{x:.1%}}, agreement %{{y:.1%}}"
                          "<br>mean iterations %{customdata[1]:.2f}<extra></extra>",
        ))
    front = pareto_front(table)
    fig.add_trace(go.Scatter(x=front[saved], y=front["agreement"], mode="lines",
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
                x=[best[saved]], y=[best["agreement"]], mode="markers",
                marker=dict(symbol="star", size=16, color="gold", line=dict(color="black", width=1)),
                name=f"recommended: {best['criterion']} τ={best['threshold']:.3g}",
            ))
    fig.update_layout(title="Early-exit what-if: compute saved vs agreement with full depth",
                      legend_title_text="criterion")
    fig.update_xaxes(title_text=title, tickformat=".0%")
    fig.update_yaxes(title_text="top-1 agreement with the full-depth prediction (share of positions)", tickformat=".0%")
    return fig


def verify(model, inputs, policy: str, threshold: float | None = None, n_loops: int | None = None,
           repeats: int = 3) -> pd.Series:
    """Run exit `policy` at `threshold` for real on `inputs` (a (B, T) token batch) beside a
    full-depth run, and set it next to the replay's prediction for the same forward.

    model: a `mythos_probe.model.LoopedTransformer` in eval mode (it runs the policies). policy: "kl",
    "latent" (replayed as `rel_residual`) or "act" (threshold: the config's `act_threshold`).
    Runs alternate (policy, then full depth) `repeats` times; a saving is 1 − the median of the
    paired ratios policy / full depth, so that a slow spell of the machine, which hits both runs
    of a pair, cancels out (time_fixed_s and time_policy_s: the fastest run of each). Wall time
    is what a caller waits; CPU time (this process, all threads) is what the forward cost, and
    barely moves with others' load. The timed runs are under `torch.inference_mode()`, as a
    server runs a model (on the shipped model at batch 1-16 a forward under `no_grad` took 9-17 %
    longer, and saved a few points less).
    Returns predicted_{iterations_saved, flops_saved, agreement} from a probed full-depth forward
    (coda lens on every position) and the measured iterations_saved (positions × iterations,
    from the policy's exits), flops_saved (1 − the FLOPs the policy's forward executed over the
    full-depth forward's, both counted at the dispatcher on one more untimed run each:
    `ExecutedFlops`), time_saved, agreement (output argmax equal to full depth's, every
    position), with time_fixed_s and time_policy_s, and cpu_time_saved. The predicted FLOPs
    count the loop and, for `kl`, a lens readout, per position-iteration used; the executed ones
    also hold what the model runs beyond that (keys and values of exited positions, queries
    attended and dropped, masked iterations before the loop compacts, and under ACT halted
    positions of rows still running), so they save less.
    """
    import time

    import torch

    from mythos_probe import attach
    from mythos_probe.model.looped import LoopedTransformer, watched
    from mythos_probe.executed_flops import ExecutedFlops

    if not isinstance(model, LoopedTransformer):
        raise TypeError(f"verify runs exit policies of a mythos_probe.model.LoopedTransformer, got {type(model).__name__}")
    if policy not in POLICY_CRITERIA:
        raise ValueError(f"policy must be one of {tuple(POLICY_CRITERIA)}, got {policy!r}")
    if policy == "act" and threshold is not None:
        raise ValueError("policy 'act' halts at model.cfg.act_threshold: pass threshold=None")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if model.training:  # a training-mode forward never skips exited positions, and dropout changes outputs
        raise ValueError("verify measures the model as served, but it is in training mode (exited positions "
                         "would still be computed, and dropout would move the agreement): call model.eval() first")
    if watched(model):  # a watched loop runs every position, and a probe adds its own time
        raise ValueError("verify measures the model as served, but forward hooks are attached to it (an open "
                         "attach(...) recorder, model.hooks(...) or a module hook): the loop then computes every "
                         "position, and verify's runs would land in your recording; call verify outside that context")
    n_loops = model.cfg.max_loop_iters if n_loops is None else n_loops
    criterion = POLICY_CRITERIA[policy]
    replay_threshold = model.cfg.act_threshold if policy == "act" else threshold
    run = dict(n_loops=n_loops, exit=policy, exit_threshold=threshold)
    B, T = inputs.shape
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)

    def timed(kwargs) -> tuple[float, float, torch.Tensor]:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        out = model(inputs, **kwargs)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu, out

    with torch.no_grad():
        model(inputs, **run)  # validates the options before anything is recorded (and warms up)
        with attach(model, probes=["convergence", "halting", "cost", "lens"], detail="positions",
                    lens_positions="all") as rec:
            model(inputs, n_loops=n_loops, exit=BASELINE)
        predicted = evaluate(rec.traces, {criterion: [replay_threshold]}).iloc[0]
        _, cache = model.run_with_cache(inputs, names_filter="recurrent.hook_halted", **run)
        halted = cache.stack("recurrent.hook_halted")  # (I, B, T); a hooked forward exits the same positions
        used = torch.where(halted.any(0), halted.float().argmax(0) + 1, halted.shape[0]).sum().item()
        executed = {}
        for name, kwargs in (("policy", run), ("fixed", dict(n_loops=n_loops, exit=BASELINE))):
            with ExecutedFlops() as counted:  # untimed: counting costs Python per operator
                model(inputs, **kwargs)
            executed[name] = counted.total
        fixed_times, policy_times = [], []
        with torch.inference_mode():  # as a server runs a model (no_grad keeps autograd's per-operator bookkeeping)
            for _ in range(repeats):
                policy_times.append(timed(run))
                fixed_times.append(timed(dict(n_loops=n_loops, exit=BASELINE)))
    out, full = policy_times[-1][2], fixed_times[-1][2]
    t_fixed, t_policy = min(t[0] for t in fixed_times), min(t[0] for t in policy_times)
    ratio = [float(np.median([p[i] / f[i] for p, f in zip(policy_times, fixed_times)])) for i in (0, 1)]
    return pd.Series({
        "policy": policy, "threshold": replay_threshold, "criterion": criterion,
        "predicted_iterations_saved": float(predicted["iterations_saved"]),
        "predicted_flops_saved": float(predicted["flops_saved"]),
        "predicted_agreement": float(predicted["agreement"]),
        "iterations_saved": 1.0 - used / (B * T * n_loops),
        "flops_saved": 1.0 - executed["policy"] / executed["fixed"],
        "time_saved": 1.0 - ratio[0],
        "cpu_time_saved": 1.0 - ratio[1],
        "agreement": float((out.argmax(-1) == full.argmax(-1)).float().mean()),
        "time_fixed_s": t_fixed, "time_policy_s": t_policy,
    })
