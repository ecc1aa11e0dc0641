"""`sweep(model, inputs, loops=range(1, 17))`: accuracy and agreement with full depth against the
number of loops, from one call: the "overthinking" curve (Loop, Think & Generalize; Ouro's
step-to-step answer agreement) of a model whose forward takes `n_loops`.

Each loop count runs the same inputs once at a fixed depth (`exit="fixed"` on our model, so the
count is the depth). Agreement compares each position's argmax with that of the deepest run;
accuracy (with `targets`) compares it with the target, over positions whose target is not
`ignore_index`. Rows come back in loop order with the counts behind each share.

Stored sweeps (`on_trace=[store_sink(path)]` from `mythos_probe.collectors.sinks`, or any callable): each
loop count's forward is recorded (`attach` with only the coda lens, at every position; `kind="shadow"`:
not served traffic) with the attributes `sweep` (one id per call), `sweep_loops` (its loop count)
and, with targets, `sweep_correct` and `sweep_positions`. The dashboard's Loop sweep page computes
agreement in SQL from those rows: each position's lens argmax at its last iteration against the
same batch row and position of the sweep's deepest forward. The sweep checks, as it records,
that this lens argmax is the model's own prediction, and raises where it is not (an exit policy
whose output mixes iterations), since the stored agreement would then be wrong.

This module is not: a probe (nothing is recorded per iteration) nor the what-if replay.
"""

from __future__ import annotations

import dataclasses
import secrets
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch


def sweep(model: torch.nn.Module, inputs: torch.Tensor, loops: Iterable[int] = range(1, 17),
          targets: Optional[torch.Tensor] = None, ignore_index: int = -100, *,
          on_trace: Iterable[Callable[[Any], None]] = (), sweep_id: Optional[str] = None,
          attributes: Optional[dict] = None, **forward_kwargs: Any):
    """pandas DataFrame, one row per loop count: `loops`, `positions` (compared), `agreement`
    (share whose argmax equals the deepest run's), and with `targets` (same shape as `inputs`)
    `correct` and `accuracy`; `best` marks the loop counts of the highest accuracy (else agreement).

    on_trace: callables receiving each loop count's recorded `LoopTrace` (e.g. a store's
        `store_sink(path)`); without them nothing is recorded. `sweep_id` names the sweep (default a
        fresh id), `attributes` add tags to every recorded forward."""
    import pandas as pd
    from mythos_probe.model.looped import LoopedTransformer

    counts = sorted(set(int(n) for n in loops))
    if not counts or counts[0] < 1:
        raise ValueError(f"loops must hold positive loop counts, got {list(loops)!r}")
    if targets is not None and targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}")
    if isinstance(model, LoopedTransformer):
        forward_kwargs.setdefault("exit", "fixed")
    on_trace = list(on_trace)
    keep = torch.ones_like(inputs, dtype=torch.bool) if targets is None else targets != ignore_index
    sweep_id = sweep_id or secrets.token_hex(6)
    predictions = {}
    with torch.no_grad():
        for n in counts:
            if not on_trace:
                predictions[n] = _predict(model, inputs, n, forward_kwargs)
                continue
            tags = {**(attributes or {}), "sweep": sweep_id, "sweep_loops": n}
            recorded = []
            with _attach_for_sweep(model, tags, recorded.append):
                predictions[n] = _predict(model, inputs, n, forward_kwargs)
            if targets is not None:
                # the counts behind the accuracy travel with the forward's tags
                recorded = [_tagged(t, sweep_correct=int((predictions[n] == targets)[keep].sum()),
                                    sweep_positions=int(keep.sum())) for t in recorded]
            _check_recorded(recorded, predictions[n], n)
            for trace in recorded:
                for callback in on_trace:
                    callback(trace)
    deepest = predictions[counts[-1]]
    rows = []
    for n in counts:
        pred = predictions[n]
        row = {"loops": n, "positions": int(keep.sum()),
               "agreement": float((pred == deepest)[keep].float().mean())}
        if targets is not None:
            row["correct"] = int((pred == targets)[keep].sum())
            row["accuracy"] = row["correct"] / max(row["positions"], 1)
        rows.append(row)
    frame = pd.DataFrame(rows)
    score = frame["accuracy"] if targets is not None else frame["agreement"]
    frame["best"] = score == score.max()
    return frame


def _predict(model, inputs, n, forward_kwargs):
    out = model(inputs, n_loops=n, **forward_kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.argmax(-1)


@contextmanager
def _attach_for_sweep(model, tags, on_trace):
    from mythos_probe.probes.recorder import attach

    # the lens alone: what the stored agreement reads (with exit counts and depths); the default
    # probes at positions detail would cost the sweep about three times its forwards
    with attach(model, probes=["lens"], detail="positions", lens_positions="all",
                attributes=tags, kind="shadow", on_trace=[on_trace]) as rec:
        yield rec


def _tagged(trace, **tags):
    return dataclasses.replace(trace, attributes={**trace.attributes, **tags})


def _check_recorded(recorded, prediction: torch.Tensor, n: int) -> None:
    """The stored sweep is only right if one forward was recorded per loop count and its lens
    argmax at each position's last iteration is the model's prediction: raise naming what differs."""
    if len(recorded) != 1:
        raise RuntimeError(f"the sweep at {n} loops recorded {len(recorded)} forwards, expected 1: "
                           "does the model call its loop more than once per forward?")
    trace = recorded[0]
    argmax = trace.position_metrics.get("lens_argmax")
    if argmax is None or trace.position_iterations is None:
        raise RuntimeError("the recorded sweep forward has no per-position lens argmax: the stored agreement "
                           "needs a model with a coda lens (attach's 'lens' probe)")
    last = np.take_along_axis(argmax, trace.position_iterations[..., None] - 1, axis=-1)[..., 0]
    if not np.array_equal(last, prediction.cpu().numpy()):
        raise RuntimeError(f"at {n} loops the coda lens at each position's last iteration does not give the model's "
                           "output argmax (an exit policy mixing iterations?): run the sweep with "
                           "exit='fixed' or without on_trace")


def sweep_from_traces(traces) -> "pandas.DataFrame":  # noqa: F821
    """The sweep table of recorded sweep forwards (what the dashboard computes in SQL, here from
    the traces): per sweep and loop count, `positions`, `agreement` with the sweep's deepest
    forward, `correct` / `accuracy` where recorded, `best`."""
    import pandas as pd

    rows, finals = [], {}
    for t in traces:
        if "sweep" not in t.attributes:
            continue
        argmax = t.position_metrics["lens_argmax"]
        final = np.take_along_axis(argmax, t.position_iterations[..., None] - 1, axis=-1)[..., 0]
        finals[(t.attributes["sweep"], int(t.attributes["sweep_loops"]))] = final
    for (name, n), final in finals.items():
        deepest = finals[(name, max(k for s, k in finals if s == name))]
        ok = np.isfinite(final) & np.isfinite(deepest) & (final >= 0) & (deepest >= 0)
        rows.append({"sweep": name, "loops": n, "positions": int(ok.sum()),
                     "agreement": float((final == deepest)[ok].mean()) if ok.any() else np.nan})
    frame = pd.DataFrame(rows, columns=["sweep", "loops", "positions", "agreement"])
    correct = {(t.attributes["sweep"], int(t.attributes["sweep_loops"])): (t.attributes.get("sweep_correct"),
               t.attributes.get("sweep_positions")) for t in traces if "sweep" in t.attributes}
    frame["accuracy"] = [np.nan if correct[k][0] is None else correct[k][0] / max(correct[k][1], 1)
                         for k in zip(frame["sweep"], frame["loops"])]
    score = frame["accuracy"].where(frame["accuracy"].notna(), frame["agreement"])
    frame["best"] = score == score.groupby(frame["sweep"]).transform("max")
    return frame.sort_values(["sweep", "loops"]).reset_index(drop=True)
