"""`attach(model, ...)` and the `Recorder` it yields: the notebook entry point. A context manager
that hooks a looped model and yields a `Recorder` holding one `LoopTrace` per forward.

    with mythos_probe.attach(model, detail="positions", attributes={"endpoint": "chat"}) as rec:
        model(ids)
    rec.traces, rec.frame("iterations"), rec.plot.convergence_heatmap()

This module is not: the per-iteration plumbing (`adapters.py`), the reductions (`collector.py`),
the DataFrames (`frames.py`) or the figures (`plots.py`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from mythos_probe.adapters import (
    LoopSpec,
    LoopedTransformerAdapter,
    OpenMythosAdapter,
    SpecAdapter,
    is_open_mythos,
)
from mythos_probe.collector import DEFAULT_PROBES, PROBES, ForwardCollector, Pending
from mythos_probe.hooks import refuse_compiled
from mythos_probe.records import DETAIL_LEVELS, LoopTrace

__all__ = ["attach", "LoopSpec", "Recorder"]

FRAME_KINDS = ("iterations", "positions", "experts", "forwards")


class Recorder:
    """What `attach` yields. Traces are built lazily: the device-to-host copy of a forward's
    metrics happens when `traces` is read, not inside the model's forward."""

    def __init__(self, on_trace: Iterable[Callable[[LoopTrace], None]] = ()) -> None:
        self._pending: list[Pending] = []
        self._traces: list[LoopTrace] = []
        self._on_trace = list(on_trace)

    def _add(self, pending: Pending) -> None:
        self._pending.append(pending)
        if self._on_trace or len(self._pending) >= 256:  # bound device memory held
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for p in pending:
            trace = p.materialize()
            self._traces.append(trace)
            for callback in self._on_trace:
                callback(trace)

    @property
    def traces(self) -> list[LoopTrace]:
        self._flush()
        return self._traces

    def clear(self) -> None:
        self._pending.clear()
        self._traces.clear()

    def frame(self, kind: str):
        """pandas DataFrame of the traces: "iterations", "positions", "experts" or "forwards"."""
        from mythos_probe import frames

        if kind not in FRAME_KINDS:
            raise ValueError(f"frame kind must be one of {FRAME_KINDS}, got {kind!r}")
        return getattr(frames, kind)(self.traces)

    @property
    def plot(self):
        from mythos_probe.plots import Plots

        return Plots(self.traces)

    def to_duckdb(self, path: str) -> str:
        """Write the traces to a DuckDB store (created or migrated); returns the path."""
        from mythos_probe.collectors.store import Store

        with Store(path) as store:
            store.write_traces(self.traces)
        return str(path)


def _model_id(model: torch.nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return type(model).__name__
    fields = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{type(model).__name__}-{digest}"


def _adapter_for(model: torch.nn.Module, spec: Optional[LoopSpec]):
    from mythos_probe.model.looped import LoopedTransformer

    refuse_compiled(model)  # before dispatch: a compiled wrapper would read as an unknown model
    if spec is not None:
        return lambda collector: SpecAdapter(model, collector, spec)
    if isinstance(model, LoopedTransformer):
        return lambda collector: LoopedTransformerAdapter(model, collector)
    if is_open_mythos(model):
        return lambda collector: OpenMythosAdapter(model, collector)
    raise TypeError(
        f"mythos_probe.attach does not know where the loop is in {type(model).__name__}. "
        "Describe it: attach(model, spec=LoopSpec(step='<submodule run once per iteration>', "
        "halting=..., router=..., readout=...)); supported without a spec: "
        "mythos_probe.model.LoopedTransformer and open_mythos.main.OpenMythos."
    )


@contextmanager
def attach(
    model: torch.nn.Module,
    probes: Iterable[str] | None = None,
    detail: str = "summary",
    *,
    spec: Optional[LoopSpec] = None,
    attributes: Optional[dict[str, Any]] = None,
    sample_every: int = 1,
    lens_positions: str | list[int] = "last",
    run_id: Optional[str] = None,
    model_id: Optional[str] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    token_text: Optional[Callable[[int], str]] = None,
    on_trace: Iterable[Callable[[LoopTrace], None]] = (),
) -> Iterator[Recorder]:
    """Record every forward of `model` while the block runs.

    probes: names from `PROBES`; default `DEFAULT_PROBES`. "lens" (coda lens on
        `lens_positions`) and "jacobian" (σ_max of one step) are opt-in: they re-run parts of
        the model every iteration.
    detail: "summary" (per-iteration scalars) or "positions" (also batch × seq × iteration).
    attributes: tags on every trace (request id, endpoint, user…): str, int, float or bool.
    sample_every: record 1 forward in N; the others run with hooks that return at once.
    optimizer: in training, traces carry its step count (probes run on detached tensors and
        leave gradients bit-identical).
    token_text: token id → text, to label positions.
    on_trace: callbacks receiving each trace as soon as it is built (for exporters).
    """
    probes = tuple(DEFAULT_PROBES if probes is None else probes)
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; choose from {PROBES}")
    if detail not in DETAIL_LEVELS:
        raise ValueError(f"detail must be one of {DETAIL_LEVELS}, got {detail!r}")
    if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
        raise ValueError(f"sample_every must be a positive integer, got {sample_every!r}")
    if not (lens_positions in ("last", "all") or (isinstance(lens_positions, list) and lens_positions
                                                   and all(isinstance(p, int) for p in lens_positions))):
        raise ValueError("lens_positions must be 'last', 'all' or a non-empty list of position indices")
    attributes = dict(attributes or {})
    for key, value in attributes.items():
        if not isinstance(value, (str, bool, int, float)):
            raise TypeError(f"attribute {key!r} must be str, int, float or bool, got {type(value).__name__}")
    make_adapter = _adapter_for(model, spec)

    steps = {"n": 0}
    step_handle = None
    if optimizer is not None:
        step_handle = optimizer.register_step_post_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))

    recorder = Recorder(on_trace)
    collector = ForwardCollector(
        probes=probes, detail=detail, lens_positions=lens_positions, sample_every=sample_every,
        emit=recorder._add, attributes=attributes,
        run_id=run_id or time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2),
        model_id=model_id or _model_id(model),
        step_counter=(lambda: steps["n"]) if optimizer is not None else (lambda: None),
        token_text=token_text,
    )
    adapter = make_adapter(collector)
    try:
        yield recorder
    finally:
        adapter.detach()
        if step_handle is not None:
            step_handle.remove()
        recorder._flush()
