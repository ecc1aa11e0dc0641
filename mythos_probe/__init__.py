"""mythos-probe: make the loop of a looped transformer visible.

Public names: `attach`, `from_cache`, `sweep`, `LoopSpec` (with `Injection`, `Halting`, `Router`), `records.LoopTrace`,
`SCHEMA_VERSION`. They are imported
lazily so that `mythos_probe.collectors` and `mythos_probe.dashboards` never import torch.
"""

from mythos_probe.records import SCHEMA_VERSION, LoopTrace

__all__ = ["attach", "from_cache", "sweep", "LoopSpec", "Injection", "Halting", "Router", "Recorder", "LoopTrace", "SCHEMA_VERSION"]


def __getattr__(name: str):
    if name in ("attach", "Recorder"):
        from mythos_probe.probes import recorder

        return getattr(recorder, name)
    if name == "sweep":
        from mythos_probe.loop_sweep import sweep

        return sweep
    if name == "from_cache":
        from mythos_probe.probes.from_cache import from_cache

        return from_cache
    if name in ("LoopSpec", "Injection", "Halting", "Router"):
        from mythos_probe import loopspec

        return getattr(loopspec, name)
    raise AttributeError(f"module 'mythos_probe' has no attribute {name!r}")
