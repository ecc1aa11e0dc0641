"""`SpecAdapter`: records any looped model described by `LoopSpec`s (one per loop), reading the
iteration boundaries the specs declare (see `loopspec.py` for the boundary model).

Per loop it keeps h_{t−1} (the previous end state) and completes iteration t when the next one
starts or the forward ends, because heads and routers may run between the end of one iteration
and the start of the next (Ouro's exit gate runs on the end state). Everything it reads is
detached, and it returns None from every hook, so outputs and gradients are untouched.

The first recorded forward is also a check of the declaration against what runs: shapes,
the step input against h_{t−1} and the declared injection, halting values declared as
probabilities, router outputs and the model's own expert choice, hooks that never fired. Each
mismatch raises (or warns, when nothing wrong was recorded) naming the `LoopSpec` field to fix.
Those checks read values on the host; later forwards add no host synchronisation.

This module is not: the declaration (`loopspec.py`), the presets (`presets.py`) or the
reductions (`collector.py`).
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from mythos_probe.probes.adapters import ForwardContext, IterationTensors, _Adapter, _args
from mythos_probe.loopspec import LoopSpec, resolve, select
from mythos_probe.metrics.cost import param_cost
from mythos_probe.metrics.halting import act_step


class _Wrapped:
    """A method replaced on one instance for the duration of `attach`; `remove` restores it.
    `on_end` gets the output, or None when the method raised (and the exception goes on)."""

    def __init__(self, owner: torch.nn.Module, name: str, on_start, on_end) -> None:
        self.owner, self.name = owner, name
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            on_start(args, kwargs)
            output = None
            try:
                output = original(*args, **kwargs)
            finally:
                on_end(output)
            return output

        setattr(owner, name, wrapper)

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding of the model's own arithmetic (host read: first forward only)."""
    if a.shape != b.shape:
        return False
    scale = b.detach().float().abs().amax().clamp_min(1.0)
    return bool(((a.float() - b.float()).abs().amax() <= 1e-4 * scale).item())


def _params(modules) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


class _Loop:
    """One declared loop: its hooks' state within the current forward."""

    def __init__(self, adapter: "SpecAdapter", spec: LoopSpec, collector) -> None:
        self.adapter, self.spec, self.collector = adapter, spec, collector
        model = adapter.model
        self.start_module = self.owner = None
        if spec.step is not None:
            self.start_module = self.end_module = resolve(model, spec.step, "step")
            if isinstance(self.start_module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                n = len(self.start_module)
                raise ValueError(
                    f"LoopSpec.step {spec.step!r} is a {type(self.start_module).__name__}, which is never called "
                    f"itself, so nothing would be recorded; declare the pass instead: "
                    f"first='{spec.step}.0', last='{spec.step}.{n - 1}'")
        elif spec.first is not None:
            self.start_module = resolve(model, spec.first, "first")
            self.end_module = resolve(model, spec.last, "last")
        else:
            path, _, name = spec.method.rpartition(".")
            self.owner = resolve(model, path, "method")
            if not callable(getattr(self.owner, name, None)):
                raise ValueError(f"LoopSpec.method: {type(self.owner).__name__} has no method {name!r}")
            self.method_name = name
        if spec.injection is not None and spec.injection.mode == "added" and spec.injection.module is None \
                and spec.init is None:
            raise ValueError("LoopSpec.init is needed with Injection('added') and no module: the pre-loop state "
                             "cannot be told apart from e at t = 0 (declare init='path' or init=lambda model: tensor)")
        self.heads = {}
        if spec.halting is not None:
            self.heads["halt"] = (resolve(model, spec.halting.head, "halting.head"), "halting.head")
        for i, r in enumerate(spec.routers):
            self.heads[f"router{i}"] = (resolve(model, r.module, f"routers[{i}].module"), f"routers[{i}].module")
        if spec.injection is not None and spec.injection.module is not None:
            self.heads["e"] = (resolve(model, spec.injection.module, "injection.module"), "injection.module")
        if isinstance(spec.init, str):
            self.heads["init"] = (resolve(model, spec.init, "init"), "init")
        if isinstance(spec.readout, (str, tuple)):
            paths = (spec.readout,) if isinstance(spec.readout, str) else spec.readout
            self.readout_modules = [resolve(model, p, "readout") for p in paths]
        self.loop_params, self.looped_modules = self._looped(model)
        self.checking = True  # until a forward has passed the checks
        self.reset()

    def _looped(self, model) -> tuple[int, list[torch.nn.Module]]:
        """Parameters run once per iteration, for FLOPs without a config: `looped` when declared,
        else the step module, the modules of a pass (siblings in one ModuleList from first to
        last, and last), or the method's module unless it is the model itself."""
        spec = self.spec
        if spec.looped:
            modules = [resolve(model, path, "looped") for path in spec.looped]
        elif spec.step is not None:
            modules = [self.start_module]
        elif spec.first is not None:
            parent, _, first = spec.first.rpartition(".")
            modules = [self.end_module]
            container = resolve(model, parent, "first") if parent else model
            if isinstance(container, torch.nn.ModuleList) and first.isdigit():
                lparent, _, last = spec.last.rpartition(".")
                end = int(last) + 1 if lparent == parent and last.isdigit() else len(container)
                modules += list(container)[int(first):end]
        else:
            modules = [self.owner] if self.owner is not model else []
        return _params(modules), modules

    def reset(self) -> None:
        self.parts: dict[str, Any] = {}
        self.pending = False
        self.prev: Optional[torch.Tensor] = None
        self.first_input: Optional[torch.Tensor] = None
        self.t = 0
        self.fired: set[str] = set()
        self.halt_acc: dict[str, torch.Tensor] = {}
        self.call: Optional[tuple[tuple, dict]] = None

    def hooks(self):
        if self.owner is not None:
            yield _Wrapped(self.owner, self.method_name, self.on_start, self.on_end)
        else:
            yield self.start_module.register_forward_pre_hook(lambda m, a, k: self.on_start(a, k), with_kwargs=True)
            yield self.end_module.register_forward_hook(lambda m, a, out: self.on_end(out))
        for key, (module, _) in self.heads.items():
            yield module.register_forward_hook(self._keep(key))

    def _live(self) -> bool:
        return self.adapter.active and not self.adapter.paused

    def _keep(self, key: str):
        def hook(module, args, output):
            if self._live():
                self.fired.add(key)
                self.parts[key] = output
        return hook

    # -- iteration boundaries ------------------------------------------------------------------

    def on_start(self, args, kwargs) -> None:
        if not self._live():
            return
        if self.pending:
            self.complete(last=False)
        self.fired.add("start")
        arg = self.spec.state_in
        h_in = kwargs[arg] if isinstance(arg, str) else args[arg]
        if not isinstance(h_in, torch.Tensor):
            raise ValueError(f"LoopSpec.state_in={arg!r} picks a {type(h_in).__name__} from the start's inputs, "
                             "not the state tensor; name the argument that carries the state")
        self.parts["in"] = h_in.detach()
        if "e" in self.parts:  # the injection entering this iteration; the module may run again before it completes
            self.parts["e_in"] = self.parts["e"]
        inj = self.spec.injection
        if inj is not None and inj.mode == "argument" and inj.arg is not None:
            self.parts["e_arg"] = (kwargs[inj.arg] if isinstance(inj.arg, str) else args[inj.arg]).detach()
        self.call = (args, kwargs)

    def on_end(self, output) -> None:
        if output is None or not self._live() or "in" not in self.parts:
            return
        self.fired.add("end")
        h = select(output, self.spec.state)
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError(f"LoopSpec.state selects a {type(h).__name__}"
                             f"{' of shape ' + str(tuple(h.shape)) if isinstance(h, torch.Tensor) else ''} from "
                             f"the iteration's end output ({type(output).__name__}); it must pick the (B, T, D) state")
        self.parts["out"] = h.detach()
        self.pending = True

    def complete(self, last: bool) -> None:
        parts, self.parts = self.parts, {k: v for k, v in self.parts.items() if k in ("e", "init")}
        self.pending = False
        spec, checking, t = self.spec, self.checking, self.t
        h, h_in = parts["out"], parts["in"]
        inj = spec.injection
        mode = None if inj is None else inj.mode
        e_module = parts.get("e_in")
        if e_module is not None:
            e_module = select(e_module, None).detach()
        h_prev = self.prev
        if t == 0:
            self.first_input = h_in
            h_prev = self._init(parts, h_in, e_module)
        if checking:
            self._check_state(h, h_prev, h_in, e_module, t)
        e = None
        if mode == "added":
            e = e_module if e_module is not None else h_in - h_prev
        elif mode == "concat":
            e = h_in[..., h_prev.shape[-1]:]
        elif mode == "argument":
            e = parts.get("e_arg", e_module)
        elif mode == "restart":
            e = self.first_input
        if t == 0:  # the Jacobian probe's e; the pre-loop state stands in where there is none
            self.collector.encoded(e if e is not None else h_prev)
        it = IterationTensors(state_in=h_prev, state_out=h, injection=e)
        if spec.halting is not None and "halt" in parts:
            self._halting(it, parts["halt"], h, last, checking)
        if spec.routers:
            self._routers(it, parts, checking)
        self.collector.iteration(it)
        self.prev = h
        self.t += 1

    def _init(self, parts, h_in, e_module) -> torch.Tensor:
        spec, mode = self.spec, None if self.spec.injection is None else self.spec.injection.mode
        if isinstance(spec.init, str):
            if "init" not in parts:
                raise ValueError(f"LoopSpec.init: module {spec.init!r} did not run before the loop's first iteration")
            return select(parts["init"], None).detach().expand_as(parts["out"]).contiguous()
        if callable(spec.init):
            return spec.init(self.adapter.model).detach().expand_as(parts["out"]).contiguous()
        if mode == "added":
            return h_in - e_module
        if mode == "concat":
            return h_in[..., : parts["out"].shape[-1]]
        return h_in

    def _check_state(self, h, h_prev, h_in, e_module, t) -> None:
        spec = self.spec
        if h.shape != h_prev.shape:
            field = "init" if t == 0 and spec.init is not None else "state"
            raise ValueError(f"LoopSpec.{field}: loop {spec.name!r} iteration {t} ends with a state of shape "
                             f"{tuple(h.shape)} but the previous state has shape {tuple(h_prev.shape)}; "
                             "the end state must keep one shape (check state= / init=)")
        if t == 0 and spec.init is None:
            return  # h_{−1} was read from this very input
        mode = None if spec.injection is None else spec.injection.mode
        expected = {None: h_prev, "argument": h_prev, "restart": self.first_input,
                    "added": None if e_module is None else h_prev + e_module}.get(mode)
        if mode == "concat":
            ok = h_in.shape[-1] == 2 * h_prev.shape[-1] and _close(h_in[..., : h_prev.shape[-1]], h_prev)
        else:
            ok = expected is None or _close(h_in, expected)
        if not ok:
            what = {None: "the previous iteration's end state", "argument": "the previous iteration's end state",
                    "restart": "the first iteration's input (Injection('restart'))",
                    "added": "the previous end state plus the injection module's output",
                    "concat": "cat[previous end state, e]"}[mode]
            raise ValueError(
                f"LoopSpec.injection: loop {spec.name!r} iteration {t} starts from an input that is not {what}. "
                "Declare how the input is built (injection=Injection('added'|'concat'|'argument'|'restart', ...)), "
                "or fix state= (the end state) and state_in= (the argument carrying the state)")

    # -- halting and routing -------------------------------------------------------------------

    def _halting(self, it: IterationTensors, raw, h, last: bool, checking: bool) -> None:
        spec = self.spec.halting
        v = select(raw, spec.select)
        B, T = h.shape[:2]
        if not isinstance(v, torch.Tensor) or v.numel() not in (B * T, B):
            raise ValueError(f"LoopSpec.halting.select: the head {spec.head!r} gives "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}; "
                             f"it must select one value per position ({B}, {T}) or per sequence ({B},)")
        v = v.detach().float().reshape(B, -1).expand(B, T)
        if spec.output == "probability" and checking and bool(((v < 0) | (v > 1)).any().item()):
            raise ValueError(f"LoopSpec.halting.output: the head {spec.head!r} gives values in "
                             f"[{v.min().item():.3g}, {v.max().item():.3g}], outside [0, 1], but they are declared "
                             "probabilities; declare Halting(..., output='logit') if the model applies a sigmoid")
        lam = torch.sigmoid(v) if spec.output == "logit" else v
        acc = self.halt_acc
        if not acc:
            acc["cum"] = torch.zeros_like(lam)
            acc["halted"] = torch.zeros_like(lam, dtype=torch.bool)
            acc["remaining"] = torch.ones_like(lam)
        never = spec.threshold is None
        if spec.rule == "act":
            weight, acc["cum"], acc["halted"] = act_step(lam, acc["cum"], acc["halted"], spec.threshold)
        elif spec.rule in ("cumulative_exit", "ponder"):
            # Ouro's exit distribution: p_t = λ_t Π(1 − λ_s), the last step takes what remains
            last_exit = last and spec.rule == "cumulative_exit"
            weight = acc["remaining"] if last_exit else lam * acc["remaining"]
            acc["remaining"] = acc["remaining"] * (1 - lam)
            acc["cum"] = acc["cum"] + weight
            if spec.rule == "cumulative_exit" and not never:
                acc["halted"] = acc["halted"] | (acc["cum"] >= spec.threshold) | last_exit
        else:  # "threshold": exit at the first step whose λ reaches it
            was = acc["halted"]
            acc["halted"] = was | (lam >= spec.threshold)
            weight = (acc["halted"] & ~was).to(lam.dtype)
            acc["cum"] = acc["halted"].to(lam.dtype)
        it.halt_prob, it.cum_halt, it.halted, it.act_weight = lam, acc["cum"], acc["halted"], weight

    def _routers(self, it: IterationTensors, parts, checking: bool) -> None:
        scores_all, idx_all = [], []
        for i, r in enumerate(self.spec.routers):
            if f"router{i}" not in parts:
                continue
            out = parts[f"router{i}"]
            module = self.heads[f"router{i}"][0]
            logits = select(out, r.select)
            k = getattr(module, r.top_k) if isinstance(r.top_k, str) else r.top_k
            if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not isinstance(k, int):
                raise ValueError(f"LoopSpec.routers[{i}].select picks "
                                 f"{type(logits).__name__} from the router {r.module!r} output "
                                 f"({type(out).__name__}); it must pick the (tokens, experts) logits "
                                 f"(and top_k must give an int, got {k!r})")
            logits = logits.detach().float().reshape(-1, logits.shape[-1])
            scores = logits.softmax(-1) if r.scoring == "softmax" else torch.sigmoid(logits)
            choice = scores
            if r.bias is not None:
                bias = getattr(module, r.bias, None)
                if not isinstance(bias, torch.Tensor) or bias.shape[-1] != logits.shape[-1]:
                    raise ValueError(f"LoopSpec.routers[{i}].bias: {type(module).__name__} has no tensor "
                                     f"{r.bias!r} with one value per expert ({logits.shape[-1]})")
                choice = scores + bias.detach().float()
            idx = choice.topk(k, dim=-1).indices
            if checking and r.indices is not None:
                theirs = select(out, r.indices)
                if not isinstance(theirs, torch.Tensor) or theirs.reshape(-1, k).shape != idx.shape or \
                        not torch.equal(theirs.reshape(-1, k).sort(-1).values, idx.sort(-1).values):
                    raise ValueError(f"LoopSpec.routers[{i}]: the experts re-derived from the declared scoring "
                                     f"({r.scoring!r}), bias ({r.bias!r}) and top_k ({k}) are not the ones the router "
                                     "chose; fix scoring=, bias= or top_k= (or indices= if it selects something else)")
            # the collector's entropy is over softmax(router_logits): log-scores make that the
            # normalised sigmoid scores, and leave the unbiased top-k unchanged
            scores_all.append(logits if r.scoring == "softmax" else F.logsigmoid(logits))
            idx_all.append(idx)
        if idx_all:
            if len({s.shape[-1] for s in scores_all}) > 1:
                raise ValueError("LoopSpec.routers: the routers of one loop must have the same number of experts")
            it.router_logits, it.topk_idx = torch.cat(scores_all), torch.cat(idx_all)

    # -- end of forward ------------------------------------------------------------------------

    def finish(self) -> None:
        """Complete the last iteration, then warn about declared hooks that never fired."""
        if self.pending:
            self.complete(last=True)
        if self.checking:
            self._check_fired()
            self.checking = False

    def _check_fired(self) -> None:
        spec = self.spec
        where = spec.step or spec.method or f"{spec.first} … {spec.last}"
        if "start" not in self.fired or "end" not in self.fired:
            field = "step" if spec.step else "method" if spec.method else "first/last"
            warnings.warn(f"LoopSpec.{field}: loop {spec.name!r} ({where}) never ran an iteration in this forward, "
                          "so no trace was recorded for it; check the path", stacklevel=3)
            return
        for key, (_, field) in self.heads.items():
            if key not in self.fired:
                warnings.warn(f"LoopSpec.{field}: {getattr(spec, 'name')!r} declares a module that never ran "
                              "during the loop; its metrics are missing from the trace. Check the path", stacklevel=3)

    # -- probes that re-run the model ----------------------------------------------------------

    def lens(self, state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.adapter.pause():
            readout = self.spec.readout
            if callable(readout) and not isinstance(readout, (str, tuple)):
                logits = readout(self.adapter.model, state)
            else:
                logits = state
                for module in self.readout_modules:
                    logits = module(logits)
            return F.log_softmax(select(logits, None)[:, positions].float(), dim=-1)

    def step_fn(self, e: torch.Tensor, t: int):
        """h ↦ h_{t+1} for one sequence, re-calling the step with the arguments it ran with
        (batch sliced to the first sequence); only where the step is a function of the state."""
        args, kwargs = self.call
        B = self.first_input.shape[0]
        mode = None if self.spec.injection is None else self.spec.injection.mode

        def one(x):
            if hasattr(x, "get_seq_length"):  # a KV cache: never written by a probe (no past here: past_len is 0)
                return None
            return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B else x

        def step(h):
            x = {None: h, "argument": h, "added": h + e[:1] if mode == "added" else h,
                 "concat": torch.cat([h, e[:1]], dim=-1) if mode == "concat" else h}[mode]
            a, k = [one(v) for v in args], {n: one(v) for n, v in kwargs.items()}
            arg = self.spec.state_in
            if isinstance(arg, str):
                k[arg] = x
            else:
                a[arg] = x
            if mode == "argument" and self.spec.injection.arg is not None:
                if isinstance(self.spec.injection.arg, str):
                    k[self.spec.injection.arg] = e[:1]
                else:
                    a[self.spec.injection.arg] = e[:1]
            with self.adapter.pause():
                fn = self.start_module if self.owner is None else getattr(self.owner, self.method_name)
                return select(fn(*a, **k), self.spec.state)

        return step


def _cache_of(kwargs) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


class SpecAdapter(_Adapter):
    """Records every loop of `specs` (nested loops: one trace each per forward, one trace id)."""

    def __init__(self, model: torch.nn.Module, make_collector: Callable[[], Any], specs: tuple[LoopSpec, ...]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"LoopSpec.name must differ between the loops of one model, got {names}")
        super().__init__(model, None)
        self.loops = [_Loop(self, spec, make_collector()) for spec in specs]
        self.collector = self.loops[0].collector
        try:
            for loop in self.loops:
                for handle in loop.hooks():
                    self.hooks.add(handle)
        except Exception:
            self.hooks.remove()
            raise
        self.generation: Optional[list] = None  # [trace id, forwards so far] inside a generate() call
        if callable(getattr(model, "generate", None)):
            self.hooks.add(_Wrapped(model, "generate", self._generate_start, self._generate_end))
        self.hooks.add(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.hooks.add(model.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        looped = [m for loop in self.loops for m in loop.looped_modules]
        self.other_params = _params([model]) - _params(embeddings) - _params(looped)

    def _generate_start(self, args, kwargs) -> None:
        """The forwards of one `generate` call are its decode steps: one trace id, steps 0, 1, …
        (with or without a KV cache)."""
        self.generation = [secrets.token_hex(16), 0]

    def _generate_end(self, output) -> None:
        self.generation = None

    def _pre(self, module, args, kwargs):
        if self.paused or self.active:
            return None
        ids = _args(args, kwargs, 0, "input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("LoopSpec models must take (batch, seq) token ids as their first argument or input_ids=")
        cache = _cache_of(kwargs)
        past_len = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        B, T = ids.shape
        contexts, began = [], []
        for i, loop in enumerate(self.loops):
            loop.reset()
            spec = loop.spec
            rule = spec.halting.rule if spec.halting is not None else "unknown"
            loop_params = loop.loop_params
            # the Jacobian re-calls the step; a pass restarting from e is not a function of h_{t−1}
            jacobian_ok = (spec.step or spec.method) and (spec.injection is None or spec.injection.mode != "restart")
            other = self.other_params if i == 0 else 0  # the non-looped parts are counted once, in the first loop
            ctx = ForwardContext(
                token_ids=ids, n_loops=0, exit_policy=rule, cfg=None, past_len=past_len,
                cache_id=None if cache is None else id(cache), loop_name=spec.name,
                lens=loop.lens if spec.readout is not None else None,
                step_fn=loop.step_fn if jacobian_ok and past_len == 0 else None,
                cost_fn=(lambda n, used, lp=loop_params, o=other: param_cost(B * T, n, lp, o, used)) if loop_params else None,
            )
            contexts.append(ctx)
            began.append(loop.collector.begin(ctx))
        self.active = any(began)
        if self.active and self.generation is not None:
            trace_id, step = self.generation
            self.generation[1] += 1
        elif self.active and len(self.loops) > 1:
            trace_id, step = self.loops[0].collector._identity(contexts[0])
        else:
            return None
        for ctx in contexts:
            ctx.trace_id, ctx.step = trace_id, step
        return None

    def _post(self, module, args, kwargs, output):
        if not self.active or self.paused:
            return None
        self.active = False
        if output is None:  # the forward raised: nothing half-built is kept
            for loop in self.loops:
                loop.collector.abort()
            return None
        logits = None
        try:
            logits = select(output, self.loops[0].spec.logits)
        except (IndexError, KeyError, AttributeError, TypeError):
            pass
        logits = logits.detach() if isinstance(logits, torch.Tensor) else None
        for loop in self.loops:
            try:
                loop.finish()
            except Exception:
                for other in self.loops:
                    other.collector.abort()
                raise
            loop.collector.end(logits)
        return None
