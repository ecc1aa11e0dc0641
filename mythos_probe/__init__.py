"""mythos-probe: make the loop of a looped transformer visible.

Public names: `attach`, `LoopSpec` (with `Injection`, `Halting`, `Router`), `records.LoopTrace`,
`SCHEMA_VERSION`, `profiles` and `LoopProfiles` (loop profiles from evidence), `LoopBudget`. They are imported
lazily so that `mythos_probe.collectors` and `mythos_probe.dashboards` never import torch.
"""

from mythos_probe.records import SCHEMA_VERSION, LoopTrace

__all__ = ["attach", "LoopSpec", "Injection", "Halting", "Router", "Recorder", "LoopTrace", "SCHEMA_VERSION",
           "profiles", "LoopProfiles", "LoopBudget"]


def __getattr__(name: str):
    if name in ("attach", "Recorder"):
        from mythos_probe.probes import recorder

        return getattr(recorder, name)
    if name in ("LoopSpec", "Injection", "Halting", "Router"):
        from mythos_probe import loopspec

        return getattr(loopspec, name)
    if name in ("profiles", "LoopProfiles"):
        from mythos_probe import loop_profiles

        return getattr(loop_profiles, name)
    if name == "LoopBudget":
        from mythos_probe.model.budgets import LoopBudget

        return LoopBudget
    raise AttributeError(f"module 'mythos_probe' has no attribute {name!r}")
