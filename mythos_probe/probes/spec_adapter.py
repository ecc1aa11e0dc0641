"""`SpecAdapter`: records any looped model described by `LoopSpec`s (one per loop), reading the
iteration boundaries the specs declare (see `loopspec.py` for the boundary model).

Per loop it keeps h_{t−1} (the previous end state) and completes iteration t when the next one
starts or the forward ends, because heads and routers may run between the end of one iteration
and the start of the next (Ouro's exit gate runs on the end state). Everything it reads is
detached, and it returns None from every hook, so outputs and gradients are untouched.

Self-checks. The first recorded forward of an `attach` block, and one recorded forward in
`check_every` after it, is also a check of the declaration against what runs; each mismatch
raises (or warns, where nothing wrong is recorded) naming the `LoopSpec` field to fix:
- chain: each iteration starts from the previous recorded end state and the declared injection
  (every mode; with `Injection("added")` and no module, the added term may change only where
  another declared loop ran in between); the pre-loop state comes from before the loop;
- readout: where `readout_is_output`, the readout of each position's exit state (the last
  iteration's, without halting) equals the logits the model returned;
- counts: where the model keeps a position's previous state instead of the step's output (per-token
  depths), the metrics use the kept state and `position_iterations` counts the iterations kept;
  this one is not sampled: it reads the next iteration's input, which costs no host read;
- exit: a model's own exit decision (`Halting.exits`) is what the trace records; a sampled exit
  that is not declared is warned about;
- jacobian: computed only where re-running the step from h_{t−1} and the current e gives h_t and
  no other argument of the step changes between iterations (a second carried tensor);
- coverage: the loop's hooks firing outside any forward of the model (another method of it, such
  as an adaptive `generate`) warn once, naming the method;
plus shapes, halting values declared as probabilities, router outputs and the model's own expert
choice, hooks that never fired. Checks read values on the host; the forwards between them add no
host synchronisation.

This module is not: the declaration (`loopspec.py`), the presets (`presets.py`) or the
reductions (`collector.py`).
"""

from __future__ import annotations

import inspect
import secrets
import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from mythos_probe.probes.adapters import ForwardContext, IterationTensors, _Adapter, _args
from mythos_probe.loopspec import LoopSpec, check_threshold_value, logits_of, resolve, select
from mythos_probe.metrics.cost import param_cost
from mythos_probe.metrics.halting import act_step
from mythos_probe.user_frame import outside

EXACT_KEPT = (None, "argument", "concat")  # modes whose next input holds the kept state exactly


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
    """Equal up to float rounding of the model's own arithmetic (host read: checked forwards only)."""
    if a.shape != b.shape:
        return False
    scale = b.detach().float().abs().amax().clamp_min(1.0)
    return bool(((a.float() - b.float()).abs().amax() <= 1e-4 * scale).item())


def _close_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: a and b agree at each position up to float rounding (no host read)."""
    scale = b.detach().float().abs().amax(-1).clamp_min(1.0)
    return (a.float() - b.float()).abs().amax(-1) <= 1e-4 * scale


def _params(modules) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _user(field: str, fn, *args):
    """Call something the declaration supplied (a selector, callable init, injection fn, readout,
    threshold); an error inside it names the field it came from."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - re-raised with the field that supplied the code
        raise ValueError(f"LoopSpec.{field} raised {type(err).__name__}: {err}") from err


def _named_args(fn, args, kwargs) -> dict:
    """A call's arguments by name (positional ones bound to the signature where it can be read), the
    keyword arguments a `**` parameter took by their own names, whatever that parameter is called."""
    try:
        signature = inspect.signature(fn)
        named = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and parameter.name in named:
            named.update(named.pop(parameter.name))
    return named


class _Loop:
    """One declared loop: its hooks' state within the current forward."""

    def __init__(self, adapter: "SpecAdapter", spec: LoopSpec, collector) -> None:
        self.adapter, self.spec, self.collector = adapter, spec, collector
        model = adapter.model
        self.start_module = self.owner = None
        self.pass_layers: Optional[list[torch.nn.Module]] = None  # first … last in one ModuleList
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
            self.pass_layers = self._pass_layers(model)
        else:
            path, _, name = spec.method.rpartition(".")
            self.owner = resolve(model, path, "method")
            if not callable(getattr(self.owner, name, None)):
                raise ValueError(f"LoopSpec.method: {type(self.owner).__name__} has no method {name!r}")
            self.method_name = name
        inj = spec.injection
        self.mode = None if inj is None else inj.mode
        if self.mode == "added" and inj.module is None and spec.init is None:
            raise ValueError("LoopSpec.init is needed with Injection('added') and no module: the pre-loop state "
                             "cannot be told apart from e at t = 0 (declare init='path' or init=lambda model: tensor)")
        if self.mode == "function" and inj.module is None and spec.init is None:
            raise ValueError("LoopSpec.init is needed with Injection('function') and no module: e is the pre-loop "
                             "state (declare init='path' or init=lambda model: tensor)")
        if self.mode == "function" and spec.init is None:  # read from the first input, h_{−1} would be fn(h_{−1}, e)
            raise ValueError("LoopSpec.init is needed with Injection('function'): the first iteration's input is "
                             "fn(model, h_{−1}, e), not the pre-loop state h_{−1} (declare init='path' or "
                             "init=lambda model: tensor)")
        self.heads = {}
        if spec.halting is not None:
            self.heads["halt"] = (resolve(model, spec.halting.head, "halting.head"), "halting.head")
        for i, r in enumerate(spec.routers):
            self.heads[f"router{i}"] = (resolve(model, r.module, f"routers[{i}].module"), f"routers[{i}].module")
        if inj is not None and inj.module is not None:
            self.heads["e"] = (resolve(model, inj.module, "injection.module"), "injection.module")
        if isinstance(spec.init, str):
            self.heads["init"] = (resolve(model, spec.init, "init"), "init")
        self.readout_modules: list[torch.nn.Module] = []
        if isinstance(spec.readout, (str, tuple)):
            paths = (spec.readout,) if isinstance(spec.readout, str) else spec.readout
            self.readout_modules = [resolve(model, p, "readout") for p in paths]
        self.loop_params, self.looped_modules = self._looped(model)
        # freezing (per-token depths) is read from the next iteration's input, exactly, where the
        # mode keeps h_{t−1} in it; exits are the halting head's business
        self.track_kept = self.mode in EXACT_KEPT and spec.halting is None
        self.no_jacobian: Optional[str] = None  # why the Jacobian is left out, once found
        self.warned: set[str] = set()
        self.reset()

    def _pass_layers(self, model) -> Optional[list[torch.nn.Module]]:
        """The layers of a pass when first and last are entries of one ModuleList (the Jacobian
        re-runs them in order); None where the pass cannot be formed from the declaration."""
        spec = self.spec
        parent, _, first = spec.first.rpartition(".")
        lparent, _, last = spec.last.rpartition(".")
        container = resolve(model, parent, "first") if parent else model
        if parent != lparent or not isinstance(container, torch.nn.ModuleList) or not (first.isdigit() and last.isdigit()):
            return None
        if int(last) < int(first):
            raise ValueError(f"LoopSpec.last {spec.last!r} comes before first {spec.first!r} in their ModuleList")
        return list(container)[int(first): int(last) + 1]

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

    def reset(self, checking: bool = False) -> None:
        self.checking = checking
        self.parts: dict[str, Any] = {}
        self.pending = False
        self.prev: Optional[torch.Tensor] = None  # pragma: no mutate (read at t > 0 only; complete sets it at t = 0)
        self.first_input: Optional[torch.Tensor] = None  # pragma: no mutate (complete sets it at t = 0, before any read)
        self.init_state: Optional[torch.Tensor] = None
        self.h_init: Optional[torch.Tensor] = None  # pragma: no mutate (h_{−1}, as the loop's state: set at t = 0 before any read)
        self.t = 0
        self.fired: set[str] = set()
        self.halt_acc: dict[str, torch.Tensor] = {}
        self.call: Optional[tuple[tuple, dict]] = None  # pragma: no mutate (on_start sets it before an end can make pending, the only way to a read)
        self.frozen: Optional[torch.Tensor] = None  # (B, T) positions whose state the model stopped updating
        self.kept_count: Optional[torch.Tensor] = None  # (B, T) iterations each position kept, once compared
        self.kept_iters = 0  # iterations kept everywhere before any comparison was needed
        self.exit_at: Optional[torch.Tensor] = None  # (B, T) exit iteration (checked forwards)
        self.states: list[torch.Tensor] = []  # kept end states (checked forwards, for the readout check)
        self.e_seen: Optional[tuple[torch.Tensor, int]] = None  # (e, other loops' starts) of t − 1
        self.ctx: Optional[ForwardContext] = None  # pragma: no mutate (_pre sets it right after reset, before any hook can read it)
        self.call_args: dict = {}  # pragma: no mutate (_pre sets it right after reset, before any hook can read it)
        self.layer_calls: dict[int, tuple[tuple, dict]] = {}  # pass layer → its arguments this iteration

    def hooks(self):
        if self.owner is not None:
            yield _Wrapped(self.owner, self.method_name, self.on_start, self.on_end)
        else:
            yield self.start_module.register_forward_pre_hook(lambda m, a, k: self.on_start(a, k), with_kwargs=True)
            yield self.end_module.register_forward_hook(lambda m, a, out: self.on_end(out))
        for key, (module, _) in self.heads.items():
            yield module.register_forward_hook(self._keep(key))
        if self.track_kept and self.readout_modules:
            yield self.readout_modules[0].register_forward_pre_hook(self._after_loop)
        if self.pass_layers is not None and "jacobian" in getattr(self.collector, "probes", ()):
            for i, layer in enumerate(self.pass_layers):  # each layer's own arguments (masks differ per layer)
                yield layer.register_forward_pre_hook(self._layer_call(i), with_kwargs=True)

    def _live(self) -> bool:
        return self.adapter.active and not self.adapter.paused

    def _keep(self, key: str):
        def hook(module, args, output):
            if self._live():
                self.fired.add(key)
                if key == "init" and "start" in self.fired:
                    return  # h_{−1} is read before the loop: a later run of the module is not it
                self.parts[key] = output
        return hook

    def _layer_call(self, i: int):
        def hook(module, args, kwargs):
            if self._live():
                self.layer_calls[i] = (args, kwargs)
        return hook

    def _after_loop(self, module, args):
        """The readout's input after the last iteration ended: the state the model kept there."""
        if self._live() and self.pending and args and isinstance(args[0], torch.Tensor):
            self.parts["final_in"] = args[0].detach()

    # -- iteration boundaries ------------------------------------------------------------------

    def on_start(self, args, kwargs) -> None:
        if not self._live():
            if not self.adapter.in_forward and not self.adapter.paused:
                self._stray()
            return
        arg = self.spec.state_in
        try:
            h_in = kwargs[arg] if isinstance(arg, str) else args[arg]
        except (KeyError, IndexError):
            raise ValueError(f"LoopSpec.state_in={arg!r}: the start of loop {self.spec.name!r} was called with "
                             f"{len(args)} positional arguments and {sorted(kwargs)}; name the argument that "
                             "carries the state") from None
        if not isinstance(h_in, torch.Tensor):
            raise ValueError(f"LoopSpec.state_in={arg!r} picks a {type(h_in).__name__} from the start's inputs, "
                             "not the state tensor; name the argument that carries the state")
        h_in = h_in.detach()
        if self.pending:
            if self.checking:
                self._check_carried(args, kwargs)
            self.complete(last=False, next_in=h_in)
        self.adapter.starts[self.spec.name] = self.adapter.starts.get(self.spec.name, 0) + 1
        self.fired.add("start")
        if self.t == 0 and "init" in self.parts:  # h_{−1}: the init module's output before the loop
            self.init_state = select(self.parts["init"], None).detach()
        self.parts["in"] = h_in
        self.parts["others"] = sum(n for name, n in self.adapter.starts.items() if name != self.spec.name)
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
        h = _user("state", select, output, self.spec.state)
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError(f"LoopSpec.state selects a {type(h).__name__}"
                             f"{' of shape ' + str(tuple(h.shape)) if isinstance(h, torch.Tensor) else ''} from "
                             f"the iteration's end output ({type(output).__name__}); it must pick the (B, T, D) state")
        self.parts["out"] = h.detach()
        self.pending = True

    def _kept_from(self, next_in: torch.Tensor, width: int) -> torch.Tensor:
        """The state the model kept after an iteration, read from the next iteration's input."""
        return next_in[..., :width] if self.mode == "concat" else next_in

    def complete(self, last: bool, next_in: Optional[torch.Tensor] = None) -> None:
        parts, self.parts = self.parts, {k: v for k, v in self.parts.items() if k in ("e", "init")}
        self.pending = False
        spec, checking, t = self.spec, self.checking, self.t
        out, h_in = parts["out"], parts["in"]
        mode = self.mode
        e_module = parts.get("e_in")
        if e_module is not None:
            e_module = select(e_module, None).detach()
        elif self.spec.injection is not None and self.spec.injection.module is not None:
            raise ValueError(f"LoopSpec.injection.module: {self.spec.injection.module!r} had not run when iteration {t} "
                             f"of loop {spec.name!r} started; e must be the output of a module that runs before each "
                             "iteration (not inside the step)")
        h_prev = self.prev
        if t == 0:
            self.first_input = h_in
            h_prev = self.h_init = self._init(parts, h_in, e_module)
        if checking:
            self._check_state(out, h_prev, h_in, e_module, t)
        h = out
        if self.track_kept:
            h = self._kept(out, h_prev, next_in, parts.get("final_in"), last)
        e = None
        if mode == "added":
            e = e_module if e_module is not None else h_in - h_prev
            if checking and e_module is None:
                self._check_added_term(e, t, parts["others"])
        elif mode == "concat":
            e = h_in[..., h_prev.shape[-1]:]
        elif mode == "argument":
            e = parts.get("e_arg", e_module)
        elif mode == "restart":
            e = self.first_input
        elif mode == "function":
            e = e_module if e_module is not None else self.h_init
        if t == 0:  # the pre-loop state stands in for e where there is none (the Jacobian's argument)
            self.collector.encoded(e if e is not None else h_prev)
        if checking and self.ctx is not None and self.ctx.step_fn is not None and self.no_jacobian is None \
                and "jacobian" in getattr(self.collector, "probes", ()):
            self._check_step(h_prev, out, e, t)
        it = IterationTensors(state_in=h_prev, state_out=h, injection=e)
        if spec.halting is not None and "halt" in parts:
            self._halting(it, parts["halt"], out, last, checking)
        if spec.routers:
            self._routers(it, parts, checking)
        if checking:
            self.states.append(h)
        self.collector.iteration(it)
        self.prev = h
        self.t += 1

    def _init(self, parts, h_in, e_module) -> torch.Tensor:
        spec, mode = self.spec, self.mode
        shape = parts["out"].shape
        if isinstance(spec.init, str):
            if self.init_state is None:
                raise ValueError(f"LoopSpec.init: module {spec.init!r} did not run before the loop's first iteration "
                                 f"(loop {spec.name!r}); name the module whose output is the pre-loop state")
            init = self.init_state
        elif callable(spec.init):
            init = _user("init", spec.init, self.adapter.model)
            if not isinstance(init, torch.Tensor):
                raise TypeError(f"LoopSpec.init: the callable returned {type(init).__name__}, not the pre-loop state tensor")
            init = init.detach()
        elif mode == "added":
            return h_in - e_module
        elif mode == "concat":
            return h_in[..., : shape[-1]]
        else:
            return h_in
        try:
            return init.expand(shape).contiguous()
        except RuntimeError:
            raise ValueError(f"LoopSpec.init: loop {spec.name!r} declares a pre-loop state of shape {tuple(init.shape)}, "
                             f"which does not broadcast to the loop's state {tuple(shape)}; init must give the state "
                             "before iteration 0 (or one row of it)") from None

    def _expected_start(self, h_prev, e_module) -> Optional[torch.Tensor]:
        """The iteration input the declaration implies from h_{t−1} (None where it names no value)."""
        mode = self.mode
        if mode in (None, "argument"):
            return h_prev
        if mode == "restart":
            return self.first_input
        if mode == "added":
            return None if e_module is None else h_prev + e_module
        if mode == "function":
            e = e_module if e_module is not None else self.h_init
            with self.adapter.pause(), torch.no_grad():
                start = _user("injection.fn", self.spec.injection.fn, self.adapter.model, h_prev, e)
            if not isinstance(start, torch.Tensor):
                raise TypeError(f"LoopSpec.injection.fn returned {type(start).__name__}, not the iteration's input tensor")
            return start
        return None

    def _check_state(self, h, h_prev, h_in, e_module, t) -> None:
        spec, mode = self.spec, self.mode
        if h.shape != h_prev.shape:
            field = "init" if t == 0 and spec.init is not None else "state"
            raise ValueError(f"LoopSpec.{field}: loop {spec.name!r} iteration {t} ends with a state of shape "
                             f"{tuple(h.shape)} but the previous state has shape {tuple(h_prev.shape)}; "
                             "the end state must keep one shape (check state= / init=)")
        if t == 0 and spec.init is None:
            return  # h_{−1} was read from this very input
        if t > 0 and self.track_kept:
            return  # checked against the kept state when the next input arrived (_kept)
        if mode == "concat":
            ok = h_in.shape[-1] == 2 * h_prev.shape[-1] and _close(h_in[..., : h_prev.shape[-1]], h_prev)
        else:
            expected = self._expected_start(h_prev, e_module)
            ok = expected is None or _close(h_in, expected)
        if not ok:
            self._chain_error(t)

    def _chain_error(self, t: int, where: str = "") -> None:
        spec, mode = self.spec, self.mode
        what = {None: "the previous iteration's end state", "argument": "the previous iteration's end state",
                "restart": "the first iteration's input (Injection('restart'))",
                "added": "the previous end state plus the injection module's output",
                "concat": "cat[previous end state, e]",
                "function": "Injection.fn(model, previous end state, e)"}[mode]
        hint = ("Declare how the input is built (injection=Injection('added'|'concat'|'argument'|'restart'|"
                "'function', ...)), or fix state= / last= (the end state: the pass's last module) and state_in= "
                "(the argument carrying the state)")
        if t == 0 and spec.init is not None:
            hint = ("Either init= is not the pre-loop state (it must give what the model holds before iteration 0), "
                    "or " + hint[0].lower() + hint[1:])
        raise ValueError(f"LoopSpec.injection: loop {spec.name!r} iteration {t} starts from an input that is not "
                         f"{what}{where}. {hint}")

    def _kept(self, out, h_prev, next_in, final_in, last: bool) -> torch.Tensor:
        """The state the model kept after this iteration: the step's output where the model used
        it, h_{t−1} where it froze the position (per-token depths). Read from the next input (or,
        after the last iteration, the readout's input); no host read outside checked forwards."""
        seen = None
        if next_in is not None:
            seen = self._kept_from(next_in, out.shape[-1])
        elif final_in is not None and final_in.shape == out.shape:
            seen = final_in
        same = seen is not None and seen.data_ptr() == out.data_ptr() and seen.stride() == out.stride() \
            and seen.shape == out.shape
        if self.frozen is None and (seen is None or same):
            # the model passed the step's output on itself: nothing frozen, nothing to compare (the fast path)
            self.kept_iters += 1
            return out
        if self.frozen is None:  # the first input that is another tensor: compare from here on
            self.frozen = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
            self.kept_count = torch.full(out.shape[:2], self.kept_iters, dtype=torch.long, device=out.device)
        if seen is None or same or seen.shape != out.shape:
            frozen = self.frozen
        else:
            frozen = self.frozen | ((seen == h_prev).all(-1) & (seen != out).any(-1))
            if self.checking and next_in is not None:  # every position: the output, or a frozen h_{t−1}
                bad = ~frozen & ~_close_rows(seen, out)
                if bool(bad.any().item()):
                    self._chain_error(self.t + 1, f" at {int(bad.sum())} of {bad.numel()} positions (it is neither "
                                                  "the step's output nor a state kept from before it)")
        self.frozen = frozen
        self.kept_count += (~frozen).long()
        return torch.where(frozen[..., None], h_prev, out)

    def _check_added_term(self, e: torch.Tensor, t: int, others: int) -> None:
        """Injection('added') without a module: e is input − h_{t−1}, so it must be one term the
        model adds, which changes only where another declared loop started an iteration in between
        (HRM's z_H). `others`: other loops' iterations started before this one started."""
        if self.e_seen is not None:
            before, others_before = self.e_seen
            if others == others_before and not _close(e, before):
                raise ValueError(
                    f"LoopSpec.injection: loop {self.spec.name!r} declares Injection('added') without a module, but the "
                    f"added term (input − previous end state) changed between iterations {t - 1} and {t} with no "
                    "other declared loop running in between: the input is not h_{t−1} + e. Declare module= (where e "
                    "comes from), or Injection('function', fn=...) if the input is built another way")
        self.e_seen = (e, others)

    def _check_carried(self, args, kwargs) -> None:
        """A floating tensor argument of the step, other than the state and e, that changes between
        iterations is a second carried state: the Jacobian of h alone would hold it fixed."""
        if self.call is None or self.no_jacobian is not None:
            return
        if "jacobian" not in getattr(self.collector, "probes", ()):
            return
        prev_args, prev_kwargs = self.call
        skip = {self.spec.state_in}
        inj = self.spec.injection
        if inj is not None and inj.arg is not None:
            skip.add(inj.arg)
        B = self.parts.get("out", None)
        B = None if B is None else B.shape[0]
        pairs = [(i, a, b) for i, (a, b) in enumerate(zip(prev_args, args))]
        pairs += [(k, prev_kwargs[k], kwargs[k]) for k in kwargs if k in prev_kwargs]
        for key, before, now in pairs:
            if key in skip or not isinstance(now, torch.Tensor) or not now.is_floating_point() or now.dim() == 0:
                continue
            if B is not None and now.shape[0] != B:
                continue
            if before.shape != now.shape or not torch.equal(before, now):
                self._drop_jacobian(
                    f"LoopSpec.state: loop {self.spec.name!r}'s step takes another tensor that changes every iteration "
                    f"(argument {key!r}): a second carried state (a momentum beside h, say). jacobian_sigma_max would be "
                    "the derivative of h with it held fixed, not of the map the model iterates, so it is left out")
                return

    def _check_step(self, h_prev, h, e, t) -> None:
        """The Jacobian differentiates h ↦ step(h, e_t): it must give the recorded h_t."""
        try:
            with torch.no_grad():
                again = self.step_fn(e if e is not None else h_prev, t)(h_prev[:1])
        except Exception as err:  # noqa: BLE001 - any failure means the step cannot be re-run as declared
            self._drop_jacobian(f"LoopSpec: loop {self.spec.name!r}'s step cannot be re-run from the declared state and "
                                f"injection ({type(err).__name__}: {err}); jacobian_sigma_max is left out")
            return
        if not isinstance(again, torch.Tensor) or not _close(again, h[:1]):
            self._drop_jacobian(
                f"LoopSpec.injection: re-running loop {self.spec.name!r}'s step from h_{{t−1}} and the declared injection "
                f"does not give the recorded h_t (iteration {t}): the step is not a function of the declared state and "
                "injection alone (noise, another carried tensor, or an input built another way); jacobian_sigma_max "
                "is left out rather than the derivative of another map")

    def _drop_jacobian(self, message: str) -> None:
        self.no_jacobian = message
        self.warned.add("jacobian")  # said here: the next forwards' jacobian_possible() need not repeat it
        if self.ctx is not None:
            self.ctx.step_fn = None
        warnings.warn(message, stacklevel=outside())

    def _stray(self) -> None:
        """Hooks of the loop firing outside any forward of the model: another method runs the loop."""
        if "stray" in self.warned:
            return
        self.warned.add("stray")
        names = []
        frame = sys._getframe(1)  # pragma: no mutate (frames 1 and 2, on_start and its hook, are not the model's)
        while frame is not None:
            if frame.f_locals.get("self") is self.adapter.model and frame.f_code.co_name not in names:
                names.append(frame.f_code.co_name)
            frame = frame.f_back
        where = " ← ".join(names) if names else "code outside the model's forward"
        warnings.warn(f"LoopSpec: loop {self.spec.name!r} ran outside a forward of {type(self.adapter.model).__name__} "
                      f"(in {where}); its iterations are not recorded. Record a forward (model(...)), or describe the "
                      "method that runs the loop with LoopSpec(method=...)", stacklevel=outside())

    # -- halting and routing -------------------------------------------------------------------

    def _threshold(self) -> Optional[float]:
        spec = self.spec.halting
        if callable(spec.threshold):
            return check_threshold_value(_user("halting.threshold", spec.threshold, self.adapter.model, self.call_args),
                                         "LoopSpec.halting")
        return spec.threshold

    def _exit_step(self) -> Optional[int]:
        spec = self.spec.halting
        if spec.exit_step is None:
            return None
        k = _user("halting.exit_step", spec.exit_step, self.adapter.model, self.call_args)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"LoopSpec.halting.exit_step returned {k!r}; it must give a non-negative iteration or None")
        return k

    def _halting(self, it: IterationTensors, raw, h, last: bool, checking: bool) -> None:
        spec = self.spec.halting
        v = _user("halting.select", select, raw, spec.select)
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
            acc["threshold"], acc["exit_step"] = self._threshold(), self._exit_step()
        threshold, fixed = acc["threshold"], acc["exit_step"]
        never = threshold is None
        if spec.rule == "act":
            weight, acc["cum"], acc["halted"] = act_step(lam, acc["cum"], acc["halted"], threshold)
        elif spec.rule in ("cumulative_exit", "ponder"):
            # Ouro's exit distribution: p_t = λ_t Π(1 − λ_s), the last step takes what remains
            last_exit = last and spec.rule == "cumulative_exit"
            weight = acc["remaining"] if last_exit else lam * acc["remaining"]
            acc["remaining"] = acc["remaining"] * (1 - lam)
            acc["cum"] = acc["cum"] + weight
            if spec.rule == "cumulative_exit" and not never:
                acc["halted"] = acc["halted"] | (acc["cum"] >= threshold) | last_exit
        else:  # "threshold": exit at the first step whose λ reaches it
            was = acc["halted"]
            acc["halted"] = was | (lam >= threshold)
            weight = (acc["halted"] & ~was).to(lam.dtype)
            acc["cum"] = acc["halted"].to(lam.dtype)
        if fixed is not None:  # a fixed exit step overrides the rule (Ouro's exit_at_step)
            acc["halted"] = torch.full_like(acc["halted"], self.t >= fixed)
        if checking:
            if self.exit_at is None:
                self.exit_at = torch.full((B, T), -1, dtype=torch.long, device=lam.device)
            self.exit_at = torch.where(acc["halted"] & (self.exit_at < 0), self.t, self.exit_at)
        it.halt_prob, it.cum_halt, it.halted, it.act_weight = lam, acc["cum"], acc["halted"], weight

    def _routers(self, it: IterationTensors, parts, checking: bool) -> None:
        scores_all, idx_all = [], []
        for i, r in enumerate(self.spec.routers):
            if f"router{i}" not in parts:
                continue
            out = parts[f"router{i}"]
            module = self.heads[f"router{i}"][0]
            logits = select(out, r.select)
            k = getattr(module, r.top_k, None) if isinstance(r.top_k, str) else r.top_k
            if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"LoopSpec.routers[{i}].select picks "
                                 f"{type(logits).__name__} from the router {r.module!r} output "
                                 f"({type(out).__name__}); it must pick the (tokens, experts) logits "
                                 f"(and top_k must give an int, got {k!r})")
            if not 1 <= k <= logits.shape[-1]:
                raise ValueError(f"LoopSpec.routers[{i}].top_k: {k} is not between 1 and the router's "
                                 f"{logits.shape[-1]} experts")
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

    def used(self, output) -> Optional[torch.Tensor]:
        """(B, T) iterations each position used, where the model says (its own exits) or the kept
        states show (per-token depths); None: the reducer's halting bookkeeping decides."""
        halting = self.spec.halting
        if halting is not None and halting.exits is not None and self.t:
            try:
                exits = select(output, halting.exits)
            except (IndexError, KeyError, AttributeError, TypeError):
                exits = None
            B, T = self.first_input.shape[:2]
            if not isinstance(exits, torch.Tensor) or exits.numel() not in (B, B * T) or exits.is_floating_point():
                raise ValueError(f"LoopSpec.halting.exits picks {type(exits).__name__} from the model's output; it must "
                                 f"pick the exit iteration (integers) per sequence ({B},) or per position ({B}, {T})")
            exits = exits.detach().reshape(B, -1).expand(B, T).long()
            if self.checking and bool(((exits < 0) | (exits >= self.t)).any().item()):
                raise ValueError(f"LoopSpec.halting.exits: the model's exits lie outside the {self.t} iterations it ran")
            self.exit_at = exits
            return exits + 1
        if halting is not None and halting.rule == "ponder" and "ponder" not in self.warned:
            self.warned.add("ponder")
            warnings.warn(f"LoopSpec.halting.exits: loop {self.spec.name!r} samples its exit (rule 'ponder') but the "
                          "declaration does not say where the model returns it, so the trace records the halting "
                          "distribution's expectation only; declare Halting(..., exits=<selector of the sampled exit>)",
                          stacklevel=outside())
        if self.kept_count is not None and halting is None:
            return self.kept_count
        return None

    def _check_fired(self) -> None:
        spec = self.spec
        where = spec.step or spec.method or f"{spec.first} … {spec.last}"
        if "start" not in self.fired or "end" not in self.fired:
            field = "step" if spec.step else "method" if spec.method else "first/last"
            warnings.warn(f"LoopSpec.{field}: loop {spec.name!r} ({where}) never ran an iteration in this forward, "
                          "so no trace was recorded for it; check the path", stacklevel=outside())
            return
        for key, (_, field) in self.heads.items():
            if key not in self.fired:
                warnings.warn(f"LoopSpec.{field}: {getattr(spec, 'name')!r} declares a module that never ran "
                              "during the loop; its metrics are missing from the trace. Check the path",
                              stacklevel=outside())

    def check_readout(self, output) -> None:
        """Where the readout is the model's output path: the readout of each position's exit state
        (the last kept state without halting) must be the logits the model returned."""
        spec = self.spec
        if spec.readout is None or not self.states or self.ctx is None or self.ctx.past_len:
            return
        if spec.halting is not None and spec.halting.rule == "act":
            return  # ACT's output is the weighted mix of the states: no one state's readout is it
        covers = spec.readout_is_output
        if callable(covers) and not _user("readout_is_output", covers, self.adapter.model, self.call_args):
            return
        if not covers:
            return
        logits = logits_of(output, spec.logits)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            return
        B, T = self.states[-1].shape[:2]
        if logits.shape[:2] != (B, T):
            return  # logits of some positions only (logits_to_keep): nothing to line up
        exit_at = self.exit_at
        if exit_at is None:
            exit_at = torch.full((B, T), len(self.states) - 1, dtype=torch.long, device=logits.device)
        exit_at = torch.where(exit_at < 0, len(self.states) - 1, exit_at)
        bad = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
        with self.adapter.pause(), torch.no_grad():
            for k in exit_at.unique().tolist():
                mine = self._readout(self.states[k]).float()
                if mine.shape != logits.shape:
                    raise ValueError(f"LoopSpec.readout of loop {spec.name!r} gives logits of shape {tuple(mine.shape)}, "
                                     f"the model returns {tuple(logits.shape)}; readout= must end at the logits")
                at = exit_at == k
                bad |= at & ~_close_rows(mine, logits.detach())
        n = int(bad.sum())
        if n:
            exits = " at each position's recorded exit (halting=)" if spec.halting is not None else ""
            raise ValueError(
                f"LoopSpec.readout: loop {spec.name!r}'s readout of the end state{exits} differs from the logits the "
                f"model returned at {n} of {B * T} positions. Fix readout= (the path from the end state to the logits), "
                "state= or last= (the end state), halting= (the exit the model takes); or declare "
                "readout_is_output=False if the readout is a partial lens by design")

    # -- probes that re-run the model ----------------------------------------------------------

    def _readout(self, state: torch.Tensor) -> torch.Tensor:
        readout = self.spec.readout
        if callable(readout):  # a path or a tuple of paths is not
            logits = _user("readout", readout, self.adapter.model, state)
        else:
            logits = state
            for module in self.readout_modules:
                logits = _user("readout", module, logits)
        try:
            logits = logits_of(logits)
        except (IndexError, KeyError, AttributeError, TypeError):
            pass  # not logits (None, say): named below
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError(f"LoopSpec.readout of loop {self.spec.name!r} gives "
                             f"{type(logits).__name__}{'' if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}; "
                             "it must end at the (B, T, vocab) logits")
        return logits

    def lens(self, state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.adapter.pause():
            return F.log_softmax(self._readout(state)[:, positions].float(), dim=-1)

    def step_fn(self, e: torch.Tensor, t: int):
        """h ↦ h_{t+1} for one sequence, re-calling the step (or every layer of a pass) with the
        arguments it ran with at this iteration (batch sliced to the first sequence)."""
        args, kwargs = self.call
        calls = dict(self.layer_calls)  # this iteration's, kept: the next iteration overwrites the dict
        B = self.first_input.shape[0]
        mode = self.mode
        model = self.adapter.model

        def one(x):
            if hasattr(x, "get_seq_length"):  # a KV cache: never written by a probe (no past here: past_len is 0)
                return None
            if isinstance(x, torch.Tensor) and x.dim() == 0:
                return x.clone()  # a counter the step may bump in place (Raven's block_idx) stays the model's
            if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
                return type(x)(one(v) for v in x)  # (cos, sin) per sequence, as in generate
            return x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B else x

        def step(h):
            e1 = e[:1]
            if mode == "added":
                x = h + e1
            elif mode == "concat":
                x = torch.cat([h, e1], dim=-1)
            elif mode == "function":
                x = self.spec.injection.fn(model, h, e1)
            else:
                x = h
            a, k = [one(v) for v in args], {n: one(v) for n, v in kwargs.items()}
            arg = self.spec.state_in
            if isinstance(arg, str):
                k[arg] = x
            else:
                a[arg] = x
            if mode == "argument" and self.spec.injection.arg is not None:
                if isinstance(self.spec.injection.arg, str):
                    k[self.spec.injection.arg] = e1
                else:
                    a[self.spec.injection.arg] = e1
            with self.adapter.pause():
                if self.pass_layers is not None:
                    out = x
                    for i, layer in enumerate(self.pass_layers):
                        la, lk = calls.get(i, (args, kwargs))
                        la, lk = [one(v) for v in la], {n: one(v) for n, v in lk.items()}
                        la[0] = select(out, None)
                        out = layer(*la, **lk)
                    return select(out, self.spec.state)
                fn = self.start_module if self.owner is None else getattr(self.owner, self.method_name)
                return select(fn(*a, **k), self.spec.state)

        return step

    def jacobian_possible(self) -> Optional[str]:
        """None where the Jacobian can be formed from the declaration, else why not."""
        spec = self.spec
        if self.no_jacobian is not None:
            return self.no_jacobian
        if self.mode == "restart":
            return (f"LoopSpec.injection: loop {spec.name!r} restarts every pass from the pre-loop state "
                    "(Injection('restart')), so a pass is not a function of h_{t−1}; jacobian_sigma_max is left out")
        if spec.first is not None and (self.pass_layers is None or not isinstance(spec.state_in, int)
                                       or spec.state_in != 0):
            return (f"LoopSpec.first/last: loop {spec.name!r}'s pass ({spec.first} … {spec.last}) is not a run of "
                    "entries of one ModuleList taking the state first, so the pass cannot be re-run to differentiate "
                    "it; jacobian_sigma_max is left out (declare step= or method= for a module that runs one iteration)")
        return None


class SpecAdapter(_Adapter):
    """Records every loop of `specs` (nested loops: one trace each per forward, one trace id).
    `check_every`: after the first recorded forward, one recorded forward in this many is checked
    again (None: the first only)."""

    def __init__(self, model: torch.nn.Module, make_collector: Callable[[], Any], specs: tuple[LoopSpec, ...],
                 check_every: Optional[int] = 16) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"LoopSpec.name must differ between the loops of one model, got {names}")
        super().__init__(model, None)
        self.check_every = check_every
        self.in_forward = False  # inside a forward of the model, recorded or not
        self.starts: dict[str, int] = {}  # iterations started per loop in this forward
        self.recorded = 0
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

    def _checking(self) -> bool:
        n = self.recorded
        return n == 0 or (self.check_every is not None and n % self.check_every == 0)

    def _pre(self, module, args, kwargs):
        if self.paused or self.active or self.in_forward:
            return None
        ids = _args(args, kwargs, 0, "input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("LoopSpec models must take (batch, seq) token ids as their first argument or input_ids=")
        self.in_forward = True
        self.starts = {}
        cache = _cache_of(kwargs)
        past_len = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        B, T = ids.shape
        contexts, began = [], []
        checking = self._checking()
        call_args = _named_args(self.model.forward, args, kwargs)
        for i, loop in enumerate(self.loops):
            loop.reset(checking)
            loop.call_args = call_args
            spec = loop.spec
            rule = spec.halting.rule if spec.halting is not None else "unknown"
            loop_params = loop.loop_params
            # the Jacobian re-calls the step: only where the declaration lets it be formed
            jacobian_ok = loop.jacobian_possible() is None
            other = self.other_params if i == 0 else 0  # the non-looped parts are counted once, in the first loop
            ctx = ForwardContext(
                token_ids=ids, n_loops=0, exit_policy=rule, cfg=None, past_len=past_len,
                cache_id=None if cache is None else id(cache), loop_name=spec.name,
                lens=loop.lens if spec.readout is not None else None,
                step_fn=loop.step_fn if jacobian_ok and past_len == 0 else None,
                cost_fn=(lambda n, used, lp=loop_params, o=other: param_cost(B * T, n, lp, o, used)) if loop_params else None,
            )
            loop.ctx = ctx
            contexts.append(ctx)
            began.append(loop.collector.begin(ctx))
            if not jacobian_ok and "jacobian" in getattr(loop.collector, "probes", ()) and "jacobian" not in loop.warned:
                loop.warned.add("jacobian")
                warnings.warn(loop.jacobian_possible(), stacklevel=outside())
        self.active = any(began)
        if self.active:
            self.recorded += 1
        else:
            for loop in self.loops:
                loop.checking = False
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
        if self.paused:
            return None
        self.in_forward = False
        if not self.active:
            return None
        self.active = False
        if output is None:  # the forward raised: nothing half-built is kept
            for loop in self.loops:
                loop.collector.abort()
            return None
        logits = None
        try:
            logits = logits_of(output, self.loops[0].spec.logits)
        except (IndexError, KeyError, AttributeError, TypeError):
            pass
        logits = logits.detach() if isinstance(logits, torch.Tensor) else None  # its shape: checked by the lens
        try:
            finished = []
            for loop in self.loops:
                loop.finish()
                used = loop.used(output)
                if loop.checking:
                    loop.check_readout(output)
                finished.append(used)
        except Exception:
            for other in self.loops:
                other.collector.abort()
            raise
        for loop, used in zip(self.loops, finished):
            loop.collector.end(logits, used=used)
            loop.states = []  # pragma: no mutate (frees the states; reset() gives a fresh list before a forward reads it)
        return None


def _cache_of(kwargs) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))
