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
                     logits="logits", readout_is_output=False),)


def _raven_readout(model, state):
    return model.predict_from_latents(state).logits


def raven(model) -> tuple[LoopSpec, ...]:
    """Huginn / Raven (`RavenForCausalLM`, Geiping et al. 2025): one iteration is
    `core_block_forward(x, input_embeds, freqs_cis, mask, past_key_values, block_idx, step)`:
    adapter(cat[x, e]) then the core blocks; it returns (x, block_idx). The state starts from
    `initialize_state` (random). The lens is `predict_from_latents` (ln_f, coda, ln_f, head: the
    forward's own output path, so it is checked against the logits; the output's element 0 is a
    loss, the logits are read by name). `generate(criterion=…)` steps `iterate_one_step` without a
    forward: those iterations are not recorded, and the coverage check says so."""
    return (LoopSpec(method="core_block_forward", state=0, injection=Injection("argument", arg=1),
                     readout=_raven_readout, looped=("transformer.adapter", "transformer.core_block")),)


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def ouro(model) -> tuple[LoopSpec, ...]:
    """Ouro (`OuroForCausalLM`, ByteDance): every decoder layer then the final norm, repeated
    total_ut_steps times; `early_exit_gate` gives a logit per position. The model's exit, as its
    forward decides it per call: `exit_at_step=` (else `model.early_exit_step`, from the config)
    fixes the step for every position; else `exit_threshold=` (else `model.early_exit_threshold`)
    is reached by the cumulative exit distribution; else the last step. With labels or
    `use_weighted_exit` its logits are the expectation over steps: no exit, no readout check."""
    p = _prefix(model, "early_exit_gate")
    cfg = model.config
    steps = getattr(model.get_submodule(p[:-1]) if p else model, "total_ut_steps", None) or \
        getattr(cfg, "total_ut_steps", None)

    def exit_step(m, call):
        if call.get("labels") is not None:
            return None
        k = _first_set(call.get("exit_at_step"), getattr(m, "early_exit_step", getattr(cfg, "early_exit_step", None)))
        return k if k is not None and steps is not None and 0 <= k < steps else None

    def threshold(m, call):
        if call.get("labels") is not None or exit_step(m, call) is not None:
            return None
        return _first_set(call.get("exit_threshold"),
                          getattr(m, "early_exit_threshold", getattr(cfg, "early_exit_threshold", None)))

    def readout_is_output(m, call):  # the expectation over steps is no single state's readout
        weighted = call.get("use_weighted_exit") and exit_step(m, call) is None and threshold(m, call) is None
        return call.get("labels") is None and not weighted

    return (LoopSpec(first=f"{p}layers.0", last=f"{p}norm",
                     halting=Halting(f"{p}early_exit_gate", output="logit", rule="cumulative_exit",
                                     threshold=threshold, exit_step=exit_step),
                     readout=_head(model, "lm_head"), looped=(f"{p}layers", f"{p}norm"),
                     readout_is_output=readout_is_output),)


def ponder_transformer(model) -> tuple[LoopSpec, ...]:
    """PyPI `ponder-transformer` (PonderNet, Banino et al. 2021): `block` returns (state, halting
    logits); in eval the model samples its exit per sequence and returns (logits,
    halt_layer_indices): the record keeps the halting distribution's expectation (halt_prob,
    act_weight, cum_halt) and, as `position_iterations`, the exit the model sampled."""
    return (LoopSpec(step="block", state=0,
                     halting=Halting("block.to_halt_logits", output="logit", rule="ponder", exits=1),
                     readout="to_logits", logits=0),)


def dory(model) -> tuple[LoopSpec, ...]:
    """transformers `DoryForCausalLM` / `DoryModel`: input layers, then the recurrent layers
    repeated n_recurrent_loops times, then the output layers. Every pass starts from
    norm(h_{t−1}) + x0, where x0 = norm(h_{−1}) and h_{−1} is the input section's output (an
    `Injection("function")`); the pass is a run of `layers`, so its Jacobian re-runs those layers.
    Both `recurrent_kv_cache_mode`s run the same recurrence (they differ in what the cache keeps).
    The lens reads the pass state through the final norm and the head, skipping the output
    layers (they need the forward's masks): a partial lens, so `readout_is_output=False`."""
    p = _prefix(model, "rotary_emb")
    cfg = model.config
    start, n = cfg.n_input_layers, cfg.n_recurrent_layers
    norm = model.get_submodule(f"{p}norm")
    return (LoopSpec(first=f"{p}layers.{start}", last=f"{p}layers.{start + n - 1}",
                     init=f"{p}layers.{start - 1}" if start else f"{p}embed_tokens",
                     injection=Injection("function", fn=lambda m, h, e: norm(h) + norm(e)),
                     readout=_head(model, f"{p}norm", "lm_head"), readout_is_output=False),)


PRESETS: dict[str, tuple[Callable[[torch.nn.Module], tuple[LoopSpec, ...]], str]] = {
    "HrmTextForCausalLM": (hrm_text, "transformers HRM-Text: nested loops H and L"),
    "HrmTextModel": (hrm_text, "transformers HRM-Text (no head: no lens)"),
    "Inkling2LoopForCausalLM": (inkling2_loop, "transformers Inkling-2-Loop: passes over the loop layers, MoE routers"),
    "Inkling2LoopTextModel": (inkling2_loop, "transformers Inkling-2-Loop text model (no head: no lens)"),
    "RavenForCausalLM": (raven, "Huginn / Raven remote code: core_block_forward"),
    "OuroForCausalLM": (ouro, "Ouro remote code: all layers + norm per step, early-exit gate"),
    "PonderTransformer": (ponder_transformer, "PyPI ponder-transformer: PonderNet halting"),
    "DoryForCausalLM": (dory, "transformers Dory: recurrent layer section, norm(h) + x0 each loop"),
    "DoryModel": (dory, "transformers Dory (no head: no lens)"),
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
