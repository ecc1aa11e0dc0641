"""mythos-probe: make the loop of a looped transformer visible.

Public names: `attach`, `LoopSpec` (with `Injection`, `Halting`, `Router`), `records.LoopTrace`,
`SCHEMA_VERSION`, `from_cache` (a `run_with_cache` cache as a `LoopTrace`), `sweep` (accuracy and
agreement against the number of loops), `profiles` and `LoopProfiles` (loop profiles from
evidence) and `LoopBudget` (per-request budgets). They are imported lazily so that
`mythos_probe.collectors` and `mythos_probe.dashboards` never import torch (the `server` install
has none); without torch, `mythos_probe.attach` raises one line naming the `probe` extra.
"""

from importlib import import_module

from mythos_probe.records import SCHEMA_VERSION, LoopTrace

# public name → the module that defines it, imported on first use
_LAZY = {
    "attach": "mythos_probe.probes.recorder",
    "Recorder": "mythos_probe.probes.recorder",
    "LoopSpec": "mythos_probe.loopspec",
    "Injection": "mythos_probe.loopspec",
    "Halting": "mythos_probe.loopspec",
    "Router": "mythos_probe.loopspec",
    "from_cache": "mythos_probe.probes.from_cache",
    "sweep": "mythos_probe.loop_sweep",
    "profiles": "mythos_probe.loop_profiles",
    "LoopProfiles": "mythos_probe.loop_profiles",
    "LoopBudget": "mythos_probe.model.budgets",
}

__all__ = [*_LAZY, "LoopTrace", "SCHEMA_VERSION"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mythos_probe' has no attribute {name!r}")
    try:
        return getattr(import_module(_LAZY[name]), name)
    except ModuleNotFoundError as exc:  # torch in a server install: say which extra brings it
        from mythos_probe.extras import require

        raise require(exc) from None
