"""The probe core: how mythos-probe attaches to a looped model and reduces what it sees.

`hooks` (the per-iteration hook points and the compiled-model check), `adapters` (our
`LoopedTransformer` and unmodified OpenMythos) and `spec_adapter` (any model a `LoopSpec`
describes) turn a model's forward into per-iteration events; `reductions` reduces them on the
device to one `LoopTrace` per forward; `recorder` is `attach()` and its `Recorder`;
`distributed` reads the rank family without communicating.

This package is not: the metric formulas (`mythos_probe.metrics`), the loop descriptions users
write (`mythos_probe.loopspec`, `mythos_probe.presets`), the analyses built on traces (`whatif`,
`interventions`, `frames`, `plots`) or OpenTelemetry and storage (`mythos_probe.collectors`).
"""
