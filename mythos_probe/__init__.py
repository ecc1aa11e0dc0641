"""mythos-probe: make the loop of a looped transformer visible.

Public names: `attach`, `LoopSpec` (with `Injection`, `Halting`, `Router`), `records.LoopTrace`,
`SCHEMA_VERSION`. They are imported
lazily so that `mythos_probe.collectors` and `mythos_probe.dashboards` never import torch (the
`server` install has none); without torch, `mythos_probe.attach` raises one line naming the
`probe` extra.
"""

from mythos_probe.records import SCHEMA_VERSION, LoopTrace

__all__ = ["attach", "LoopSpec", "Injection", "Halting", "Router", "Recorder", "LoopTrace", "SCHEMA_VERSION"]


def __getattr__(name: str):
    try:
        if name in ("attach", "Recorder"):
            from mythos_probe.probes import recorder

            return getattr(recorder, name)
        if name in ("LoopSpec", "Injection", "Halting", "Router"):
            from mythos_probe import loopspec

            return getattr(loopspec, name)
    except ModuleNotFoundError as exc:  # torch in a server install: say which extra brings it
        from mythos_probe.extras import require

        raise require(exc) from None
    raise AttributeError(f"module 'mythos_probe' has no attribute {name!r}")
