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
import warnings
import secrets
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from mythos_probe.probes.adapters import LoopedTransformerAdapter, OpenMythosAdapter, is_open_mythos
from mythos_probe.loopspec import LoopSpec
from mythos_probe.probes.spec_adapter import SpecAdapter
from mythos_probe.probes.reductions import DEFAULT_PROBES, PROBES, ForwardReducer, Pending
from mythos_probe.probes.hooks import refuse_compiled
from mythos_probe.probes.distributed import Where, job_run_id, where as distributed_where
from mythos_probe.records import LoopTrace, check_field
from mythos_probe.user_frame import outside

__all__ = ["attach", "LoopSpec", "Recorder"]  # Injection, Halting, Router: mythos_probe.loopspec

FRAME_KINDS = ("iterations", "positions", "experts", "forwards")


STREAMING_KEEP = 1000
"""Traces a recorder keeps by default while `on_trace` streams them elsewhere (its memory then
stays flat however long the run); without `on_trace` it keeps every one."""


class Recorder:
    """What `attach` yields. Traces are built lazily: the device-to-host copy of a forward's
    metrics happens when `traces` is read, not inside the model's forward.

    `keep`: how many of the most recent traces `traces` holds (None: all). Every trace still
    reaches every `on_trace` callback; `discarded_traces` counts those no longer held."""

    def __init__(self, on_trace: Iterable[Callable[[LoopTrace], None]] = (), where: Optional[Where] = None,
                 keep: Optional[int] = None) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be None (every trace) or a number of traces ≥ 0, got {keep!r}")
        self._pending: list[Pending] = []
        self._traces: list[LoopTrace] | deque[LoopTrace] = [] if keep is None else deque(maxlen=keep)
        self.discarded_traces = 0
        self._on_trace = list(on_trace)
        self._where = (where or Where()).fields()  # the rank family every trace is tagged with

    def _add(self, pending: Pending) -> None:
        pending.meta.update(self._where)
        self._pending.append(pending)
        if self._on_trace or len(self._pending) >= 256:  # bound device memory held
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        refused = None
        for p in pending:
            try:
                trace = p.materialize()
            except ValueError as err:  # a forward whose numbers cannot be right: the others still count
                refused = refused or err
                continue
            if isinstance(self._traces, deque) and len(self._traces) == self._traces.maxlen:
                self.discarded_traces += 1
            self._traces.append(trace)
            for callback in self._on_trace:
                callback(trace)
        if refused is not None:
            raise refused

    @property
    def traces(self) -> list[LoopTrace]:
        self._flush()
        return self._traces if isinstance(self._traces, list) else list(self._traces)

    def clear(self) -> None:
        self._pending.clear()
        self._traces.clear()

    def frame(self, kind: str):
        """pandas DataFrame of the traces: "iterations", "positions", "experts" or "forwards"."""
        from mythos_probe import frames

        if kind not in FRAME_KINDS:
            raise ValueError(f"frame kind must be one of {FRAME_KINDS}, got {kind!r}")
        if kind == "positions":  # never an empty frame that reads as "no positions ran"
            summary = sum(t.detail != "positions" for t in self.traces)
            if self.traces and summary == len(self.traces):
                raise ValueError("no trace was recorded with per-position metrics (detail='summary'): "
                                 "attach(model, detail='positions') to get the positions frame")
            if summary:
                warnings.warn(f"{summary} of {len(self.traces)} traces were recorded at detail='summary' and "
                              "are not in the positions frame", stacklevel=outside())
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

    def to_parquet(self, folder: str) -> list[str]:
        """Write the traces as one new file set of a Parquet store folder (created when missing;
        other writers may write the same folder); returns the files written."""
        from mythos_probe.collectors.parquet_store import ParquetStore

        with ParquetStore(folder) as store:
            store.write_traces(self.traces)
        return [str(p) for p in store.files]


def _model_id(model: torch.nn.Module) -> str:
    # FSDP2 swaps the class for a subclass torch makes (FSDP<Name>): name the model's own class
    name = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed")).__name__
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return name
    fields = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def _adapter_for(model: torch.nn.Module, spec: LoopSpec | Sequence[LoopSpec] | None, check_every: Optional[int] = 16):
    """A function collector factory → adapter: the built-in adapters take one collector, a
    `LoopSpec` model one per declared loop."""
    from mythos_probe import presets
    from mythos_probe.model.looped import LoopedTransformer

    refuse_compiled(model)  # before dispatch: a compiled wrapper would read as an unknown model
    if spec is None:
        if isinstance(model, LoopedTransformer):
            return lambda new: LoopedTransformerAdapter(model, new())
        if is_open_mythos(model):
            return lambda new: OpenMythosAdapter(model, new())
        spec = presets.find(model)
    if spec is None:
        raise TypeError(
            f"mythos_probe.attach does not know where the loop is in {type(model).__name__}. "
            "Describe it: attach(model, spec=LoopSpec(step='<submodule run once per iteration>', "
            "halting=Halting(...), routers=(Router(...),), readout=...)), starting from a preset in "
            f"mythos_probe.presets if one is close; supported without a spec: {', '.join(presets.names())}."
        )
    if isinstance(spec, (str, bytes)) or not (isinstance(spec, LoopSpec) or hasattr(spec, "__iter__")):
        raise TypeError(f"spec= takes a LoopSpec or a sequence of LoopSpecs (one per nested loop), got {spec!r}")
    specs = (spec,) if isinstance(spec, LoopSpec) else tuple(spec)
    if not specs or not all(isinstance(s, LoopSpec) for s in specs):
        raise TypeError("spec= takes a LoopSpec or a sequence of LoopSpecs (one per nested loop)")
    return lambda new: SpecAdapter(model, new, specs, check_every=check_every)


@contextmanager
def attach(
    model: torch.nn.Module,
    probes: Iterable[str] | None = None,
    detail: str = "summary",
    *,
    spec: LoopSpec | Sequence[LoopSpec] | None = None,
    attributes: Optional[dict[str, Any]] = None,
    sample_every: int = 1,
    lens_positions: str | list[int] = "last",
    run_id: Optional[str] = None,
    model_id: Optional[str] = None,
    kind: Optional[str] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    token_text: Optional[Callable[[int], str]] = None,
    on_trace: Iterable[Callable[[LoopTrace], None]] = (),
    keep: Optional[int] = None,
    check_every: Optional[int] = 16,
) -> Iterator[Recorder]:
    """Record every forward of `model` while the block runs.

    probes: names from `PROBES`; default `DEFAULT_PROBES`. "lens" (coda lens on
        `lens_positions`) and "jacobian" (σ_max of one step) are opt-in: they re-run parts of
        the model every iteration. "trajectory" (opt-in, detail="positions" only): each
        position's states projected on their own 3 principal directions, and its fixed point
        (`metrics/trajectory.py`); it keeps every state of the loop on the device until the
        loop ends.
    detail: "summary" (per-iteration scalars) or "positions" (also batch × seq × iteration).
    attributes: tags on every trace (request id, endpoint, user…): str, int, float or bool.
    sample_every: record 1 forward in N; the others run with hooks that return at once.
    run_id: default `run-<job id>` under a launcher (torchrun, SLURM…), the same on every rank of
        the job; else a fresh id. Traces carry the rank family read from `mythos_probe.probes.distributed`.
    optimizer: in training, traces carry its step count (probes run on detached tensors and
        leave gradients bit-identical).
    kind: the forward kind stored with each trace (`FORWARD_KINDS`); by default "training" for
        a forward run in training mode with gradients enabled, else "served". Full-depth
        comparison forwards pass "shadow", so that dashboards can leave them out of served traffic.
    token_text: token id → text, to label positions.
    on_trace: callbacks receiving each trace as soon as it is built (for exporters).
    keep: how many of the most recent traces `rec.traces` holds. Default: every trace, or the last
        `STREAMING_KEEP` (1,000) when `on_trace` streams them elsewhere, so that a long streamed run
        holds bounded memory; `rec.discarded_traces` counts the others (they reached `on_trace`).
    check_every: `LoopSpec` models only. The first recorded forward checks the declaration
        against what runs (see `spec_adapter.py`: chain, readout, counts, exit, Jacobian,
        coverage); after it, one recorded forward in `check_every` is checked again. None turns
        the sampled checks off (the first forward is always checked).
    """
    if isinstance(probes, str):
        raise TypeError(f"probes takes a list of probe names, not one string (did you mean probes=[{probes!r}]?)")
    probes = tuple(DEFAULT_PROBES if probes is None else probes)
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; choose from {PROBES}")
    check_field("detail", detail)
    if "trajectory" in probes and detail != "positions":
        raise ValueError("the trajectory probe records a path per position: attach(model, "
                         "probes=[*DEFAULT_PROBES, 'trajectory'], detail='positions')")
    if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
        raise ValueError(f"sample_every must be a positive integer, got {sample_every!r}")
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be a positive integer or None (first forward only), got {check_every!r}")
    if token_text is not None and not callable(token_text):
        raise TypeError(f"token_text must be a callable token id → text, got {token_text!r}")
    on_trace = list(on_trace)
    if not all(callable(c) for c in on_trace):
        raise TypeError("on_trace takes callables receiving each LoopTrace")
    if optimizer is not None and not hasattr(optimizer, "register_step_post_hook"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach takes a torch.nn.Module, got {type(model).__name__}")
    if not (lens_positions in ("last", "all") or (isinstance(lens_positions, list) and lens_positions
                                                   and all(isinstance(p, int) for p in lens_positions))):
        raise ValueError("lens_positions must be 'last', 'all' or a non-empty list of position indices")
    # The record's own checks, here rather than at the first forward: a bad option fails where it
    # is passed, naming it, never inside a forward or a store write.
    attributes = check_field("attributes", attributes or {})
    for name, value in (("run_id", run_id), ("model_id", model_id), ("kind", kind)):
        if value is not None:
            check_field(name, value)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # DDP runs the wrapped module's forward; FSDP2 shards in place
    make_adapter = _adapter_for(model, spec, check_every)

    where = distributed_where()
    if keep is None and on_trace:
        keep = STREAMING_KEEP
    recorder = Recorder(on_trace, where, keep)

    steps = {"n": 0}
    step_handle = None
    if optimizer is not None:
        step_handle = optimizer.register_step_post_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))

    run_id = run_id or job_run_id(where) or time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    model_id = model_id or _model_id(model)

    def emit(pending: Pending) -> None:
        # Emitted from the model's forward hook, so the mode and grad state are the forward's own.
        pending.meta["kind"] = kind or ("training" if model.training and torch.is_grad_enabled() else "served")
        recorder._add(pending)

    def new_collector() -> ForwardReducer:
        return ForwardReducer(
            probes=probes, detail=detail, lens_positions=lens_positions, sample_every=sample_every,
            emit=emit, attributes=attributes, run_id=run_id, model_id=model_id,
            step_counter=(lambda: steps["n"]) if optimizer is not None else (lambda: None),
            token_text=token_text,
        )

    try:
        adapter = make_adapter(new_collector)
    except BaseException:
        if step_handle is not None:
            step_handle.remove()
        raise
    try:
        yield recorder
    finally:
        adapter.detach()
        if step_handle is not None:
            step_handle.remove()
        recorder._flush()
