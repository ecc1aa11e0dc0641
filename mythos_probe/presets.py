"""Built-in loop descriptions, found by model class so that `attach(model)` needs no spec.

Each preset is a function model → tuple of `LoopSpec`s (one per loop; HRM has two). Paths are
found in the model, so the same preset serves a `…ForCausalLM` and its bare `…Model`. To describe a
variant, start from one: `presets.find(model)` returns the specs, and `dataclasses.replace` changes
a field. Our `LoopedTransformer` and `open_mythos.main.OpenMythos` have dedicated adapters
(`adapters.py`) and are listed here for completeness.

This module is not: the declaration and its boundary model (`loopspec.py`) or the hooks
(`spec_adapter.py`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mythos_probe.loopspec import SCORINGS, Halting, Injection, LoopSpec, Router


def _prefix(model: torch.nn.Module, attribute: str) -> str:
    """Path (with a trailing dot, or "") of the first submodule that has `attribute`."""
    for name, module in model.named_modules():
        if hasattr(module, attribute) and not isinstance(getattr(type(module), attribute, None), property):
            return f"{name}." if name else ""
    raise ValueError(f"{type(model).__name__}: no submodule has {attribute!r}; this preset does not fit, "
                     "describe the loop with LoopSpec")


def _head(model: torch.nn.Module, *paths: str) -> Optional[tuple[str, ...]]:
    return paths if hasattr(model, "lm_head") else None


def hrm_text(model) -> tuple[LoopSpec, ...]:
    """transformers `HrmText*` (Sapient HRM): H_cycles × (L_cycles low-level steps, one high-level
    step). Low level: z_L ← L(z_L + z_H), from `z_L_init`; high level: z_H ← H(z_H + z_L), from the
    scaled input embeddings. Two loops, "H" and "L"; the L loop runs on across H cycles, as z_L does."""
    p = _prefix(model, "z_L_init")
    base = p[:-1]
    return (
        LoopSpec(name="H", step=f"{p}H_module", injection=Injection("added", module=f"{p}L_module"),
                 readout=_head(model, "lm_head")),
        LoopSpec(name="L", step=f"{p}L_module", injection=Injection("added"),
                 init=lambda m: m.get_submodule(base).z_L_init),
    )


def inkling2_loop(model) -> tuple[LoopSpec, ...]:
    """transformers `Inkling2Loop*`: a pass is layers loop_layer_index_start … end − 1, repeated
    loop_num_passes times; every pass restarts from the pre-loop state and receives messages from
    the previous pass. Each loop layer's MoE router scores with `scoring_func` and adds
    `e_score_correction_bias` for the top-k only. The lens reads the pass state through the final
    norm, head and softcap (the block-attention residual needs the whole forward's block states)."""
    p = _prefix(model, "message_input")
    cfg = model.get_submodule(p[:-1]).config if p else model.config
    if cfg.scoring_func not in SCORINGS:
        raise ValueError(f"Inkling2Loop scoring_func {cfg.scoring_func!r} is not one of {SCORINGS}")
    start, end = cfg.loop_layer_index_start, cfg.loop_layer_index_end
    routers = tuple(Router(f"{p}layers.{i}.mlp.gate", top_k="top_k", scoring=cfg.scoring_func, select=0,
                           bias="e_score_correction_bias", indices=2) for i in range(start, end))
    return (LoopSpec(first=f"{p}layers.{start}", last=f"{p}layers.{end - 1}", injection=Injection("restart"),
                     routers=routers, readout=_head(model, f"{p}norm", "lm_head", "logit_softcap"),
                     logits="logits"),)


def raven(model) -> tuple[LoopSpec, ...]:
    """Huginn / Raven (`RavenForCausalLM`, Geiping et al. 2025): one iteration is
    `core_block_forward(x, input_embeds, …)`: adapter(cat[x, e]) then the core blocks; it returns
    (x, block_idx). The state starts from `initialize_state` (random). The lens reads through
    `ln_f` and the head (the coda needs the forward's rotary table and mask)."""
    return (LoopSpec(method="core_block_forward", state=0, injection=Injection("argument", arg=1),
                     readout=("transformer.ln_f", "lm_head"),
                     looped=("transformer.adapter", "transformer.core_block")),)


def ouro(model) -> tuple[LoopSpec, ...]:
    """Ouro (`OuroForCausalLM`, ByteDance): every decoder layer then the final norm, repeated
    total_ut_steps times; `early_exit_gate` gives a logit per position, and the exit is the first
    step where the cumulative exit distribution reaches config.early_exit_threshold (none: the
    last step). A per-call `exit_threshold=` overrides the config in the model but not here."""
    p = _prefix(model, "early_exit_gate")
    cfg = model.config
    return (LoopSpec(first=f"{p}layers.0", last=f"{p}norm",
                     halting=Halting(f"{p}early_exit_gate", output="logit", rule="cumulative_exit",
                                     threshold=getattr(cfg, "early_exit_threshold", None)),
                     readout=_head(model, "lm_head"), looped=(f"{p}layers", f"{p}norm")),)


def ponder_transformer(model) -> tuple[LoopSpec, ...]:
    """PyPI `ponder-transformer` (PonderNet, Banino et al. 2021): `block` returns (state, halting
    logits); the model samples its exit; the record keeps the halting distribution's expectation."""
    return (LoopSpec(step="block", state=0, halting=Halting("block.to_halt_logits", output="logit", rule="ponder"),
                     readout="to_logits", logits=0),)


PRESETS: dict[str, tuple[Callable[[torch.nn.Module], tuple[LoopSpec, ...]], str]] = {
    "HrmTextForCausalLM": (hrm_text, "transformers HRM-Text: nested loops H and L"),
    "HrmTextModel": (hrm_text, "transformers HRM-Text (no head: no lens)"),
    "Inkling2LoopForCausalLM": (inkling2_loop, "transformers Inkling-2-Loop: passes over the loop layers, MoE routers"),
    "Inkling2LoopTextModel": (inkling2_loop, "transformers Inkling-2-Loop text model (no head: no lens)"),
    "RavenForCausalLM": (raven, "Huginn / Raven remote code: core_block_forward"),
    "OuroForCausalLM": (ouro, "Ouro remote code: all layers + norm per step, early-exit gate"),
    "PonderTransformer": (ponder_transformer, "PyPI ponder-transformer: PonderNet halting"),
}
BUILT_IN = {
    "LoopedTransformer": "mythos_probe.model: dedicated adapter (hook points)",
    "OpenMythos": "open_mythos.main: dedicated adapter (module hooks)",
}


def names() -> list[str]:
    """Every model class `attach` knows without a spec."""
    return [*BUILT_IN, *PRESETS]


def find(model: torch.nn.Module) -> Optional[tuple[LoopSpec, ...]]:
    """The preset's specs for this model's class (or a base class), or None when it has none.
    Raises ValueError for a model with a dedicated adapter (`BUILT_IN`): it has no spec to start
    from, and needs none."""
    for cls in type(model).__mro__:
        if cls.__name__ in PRESETS:
            return PRESETS[cls.__name__][0](model)
        if cls.__name__ in BUILT_IN:
            raise ValueError(
                f"{cls.__name__} has no LoopSpec preset: attach(model) reads it through its dedicated adapter "
                f"({BUILT_IN[cls.__name__]}) and needs no spec. Presets describe third-party models "
                f"({', '.join(PRESETS)}); for another model write a LoopSpec (README, 'Your looped model')."
            )
    return None
