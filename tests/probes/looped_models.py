"""Small Huginn- and Ouro-shaped models for the spec tests, and the reference metrics every spec
test compares against.

The public code of Huginn (seal-rg/recurrent-pretraining, `recpre/raven_modeling_minimal.py`) and
of Ouro (ByteDance `modeling_ouro.py`) is not on PyPI, so these models are written here from that
code's public interfaces (read, not copied): the same module names, method signatures, output
types, per-call options and config options, and the same recurrence; the blocks are stand-ins.
- `RavenForCausalLM`: `transformer.{wte, prelude, adapter, core_block, coda, ln_f}` and `lm_head`;
  `forward` returns `CausalLMOutputRecurrentLatents` with `loss=tensor(0.)` filled (element 0 is
  not the logits); `core_block_forward(x, input_embeds, freqs_cis, mask, past_key_values,
  block_idx, current_step)`; `iterate_one_step`, `predict_from_latents`, and `generate(criterion=…)`
  stepping the loop without a forward.
- `OuroForCausalLM`: `model.{embed_tokens, layers, norm, early_exit_gate}` and `lm_head`; each of
  `total_ut_steps` steps runs every layer then the norm; the exit distribution
  p_t = λ_t Π(1 − λ_s) (the last step takes the remainder) picks, per position, the first step whose
  cumulative mass reaches the threshold; `early_exit_step` / `exit_at_step=` fix the exit step,
  `exit_threshold=` overrides the threshold per call.
Also: `MomentumLoop` (a step carrying a second tensor), `PerTokenDepth` (positions frozen after
their own number of iterations) and `KLExitLoop` (an adaptive loop in a method other than forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP with residuals (a stand-in for both models' blocks)."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, *unused):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.out(a)
        return x + self.mlp(self.norm2(x))


@dataclass
class CausalLMOutputRecurrentLatents(ModelOutput):
    """Raven's output type: `loss` is always filled (tensor(0.) without labels), so element 0 is a
    scalar and the logits must be read by name."""

    loss: Optional[torch.Tensor] = None
    log_ppl: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[torch.Tensor] = None
    latent_states: Optional[torch.Tensor] = None
    stats: Optional[dict] = None


class RavenForCausalLM(nn.Module):
    """Raven's public interface: `forward(input_ids, …, num_steps=…)` returning
    `CausalLMOutputRecurrentLatents(loss=tensor(0.), …)`; `iterate_forward` starting from
    `initialize_state` (random) and calling `core_block_forward(x, input_embeds, freqs_cis, mask,
    past_key_values, block_idx, current_step)` (adapter(cat[x, e]) then the core blocks, bumping
    the block counter tensor in place); `iterate_one_step`, `predict_from_latents` (ln_f, coda,
    ln_f, head: the forward's own output path) and `embed_inputs`; `generate(criterion=…)`
    dispatching to an adaptive loop that steps `iterate_one_step` without calling forward."""

    def __init__(self, vocab=64, dim=32, prelude=1, core=2, coda=1, num_steps=4):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim),
            prelude=nn.ModuleList([Block(dim) for _ in range(prelude)]),
            adapter=nn.Linear(2 * dim, dim, bias=False),
            core_block=nn.ModuleList([Block(dim) for _ in range(core)]),
            coda=nn.ModuleList([Block(dim) for _ in range(coda)]),
            ln_f=nn.RMSNorm(dim),
        ))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.config = SimpleNamespace(mean_recurrence=num_steps, padded_vocab_size=vocab)
        self.register_buffer("freqs_cis", torch.arange(256.0)[None, :, None], persistent=False)

    def initialize_state(self, input_embeds, scale: float = 1.0):
        return torch.randn_like(input_embeds) * 0.4 * scale

    def embed_inputs(self, input_ids, **unused):
        e = self.transformer.wte(input_ids)
        block_idx = torch.tensor(-1, dtype=torch.long)
        for block in self.transformer.prelude:
            block_idx += 1
            e = block(e)
        return e, block_idx

    def core_block_forward(self, x, input_embeds, freqs_cis, mask, past_key_values, block_idx, current_step):
        x = self.transformer.adapter(torch.cat([x, input_embeds], dim=-1))
        for block in self.transformer.core_block:
            block_idx += 1  # in place, as upstream: the counter is the caller's tensor
            x = block(x, freqs_cis, block_idx, mask, past_key_values)
        return x, block_idx

    def iterate_forward(self, input_embeds, input_states, freqs_cis, block_idx, mask, past_key_values=None,
                        num_steps=None, init_scale=1.0):
        x = xk = self.initialize_state(input_embeds, init_scale) if input_states is None else input_states.clone()
        steps = self.config.mean_recurrence if num_steps is None else int(num_steps)
        for step in range(steps):
            xk = x
            x, block_idx = self.core_block_forward(xk, input_embeds, freqs_cis, mask, past_key_values, block_idx, step)
        return self.transformer.ln_f(x), steps, 0, xk.detach(), block_idx

    @torch.no_grad()
    def iterate_one_step(self, input_embeds, input_states, position_ids=None, cache_position=None,
                         block_idx=torch.tensor(0, dtype=torch.long), attention_mask=None, past_key_values=None,
                         current_step=0):
        freqs_cis = self.freqs_cis[:, : input_embeds.shape[1]]
        x, block_idx = self.core_block_forward(input_states, input_embeds, freqs_cis, attention_mask,
                                               past_key_values, block_idx, current_step)
        return x, block_idx, current_step + 1

    def predict_from_latents(self, latents, attention_mask=None, position_ids=None, cache_position=None,
                             past_key_values=None):
        x = self.transformer.ln_f(latents)
        for block in self.transformer.coda:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x)).float()
        return CausalLMOutputRecurrentLatents(loss=torch.as_tensor(0.0), log_ppl=torch.as_tensor(0.0), logits=logits,
                                              past_key_values=past_key_values, latent_states=x)

    def forward(self, input_ids, input_embeds=None, input_states=None, attention_mask=None, position_ids=None,
                labels=None, num_steps=None, past_key_values=None, output_details=None, use_cache=False,
                cache_position=None, init_scale=1.0, **kwargs):
        freqs_cis = self.freqs_cis[:, : input_ids.shape[1]]
        if input_embeds is None:
            input_embeds = self.transformer.wte(input_ids)
        block_idx = torch.tensor(-1, dtype=torch.long)
        for block in self.transformer.prelude:
            block_idx += 1
            input_embeds = block(input_embeds)
        x, *_ = self.iterate_forward(input_embeds, input_states, freqs_cis, block_idx, None, past_key_values,
                                     num_steps, init_scale)
        latent_states = x.clone().detach()
        for block in self.transformer.coda:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) if labels is not None else torch.as_tensor(0.0)
        return CausalLMOutputRecurrentLatents(loss=loss, log_ppl=loss.detach().exp(), logits=logits,
                                              past_key_values=past_key_values, latent_states=latent_states)

    @torch.no_grad()
    def generate(self, input_ids, *args, **kwargs):
        """Upstream's dispatcher: an exit criterion selects the adaptive loop (no forward call)."""
        if any(k in kwargs for k in ("criterion", "exit_threshold")):
            return self.generate_with_adaptive_compute(input_ids, **kwargs)
        for _ in range(kwargs.get("max_new_tokens", 1)):
            next_token = self(input_ids).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
        return input_ids

    @torch.no_grad()
    def generate_with_adaptive_compute(self, input_ids, criterion="latent-diff", exit_threshold=0.03,
                                       max_new_tokens=1, num_steps=None, **unused):
        """Steps `iterate_one_step` until the relative latent change falls below the threshold."""
        for _ in range(max_new_tokens):
            embedded, block_idx = self.embed_inputs(input_ids)
            latents = self.initialize_state(embedded)
            for step in range(num_steps or self.config.mean_recurrence):
                previous = latents
                latents, block_idx, _ = self.iterate_one_step(embedded, latents, block_idx=block_idx, current_step=step)
                if ((latents - previous).norm(dim=-1) / latents.norm(dim=-1)).mean() < float(exit_threshold):
                    break
            next_token = self.predict_from_latents(latents).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
        return input_ids


class OuroDecoderLayer(Block):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, use_cache=None,
                cache_position=None, position_embeddings=None, current_ut=0, **kwargs):
        return super().forward(hidden_states)


class OuroModel(nn.Module):
    """Ouro's `OuroModel`: every decoder layer then the norm, `total_ut_steps` times; returns
    (BaseModelOutputWithPast, hidden_states_list, gate_list) with `early_exit_gate` logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([OuroDecoderLayer(config.hidden_size) for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.total_ut_steps = config.total_ut_steps

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache_position=None, use_early_exit_gate=True, **kwargs):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states_list, gate_list = [], []
        for current_ut in range(self.total_ut_steps):
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask=None, position_ids=position_ids,
                                      past_key_value=past_key_values, use_cache=use_cache, current_ut=current_ut)
            hidden_states = self.norm(hidden_states)
            if use_early_exit_gate:
                hidden_states_list.append(hidden_states)
                gate_list.append(self.early_exit_gate(hidden_states))
        return BaseModelOutputWithPast(last_hidden_state=hidden_states), hidden_states_list, gate_list


class OuroForCausalLM(nn.Module):
    """Ouro's `OuroForCausalLM`: `early_exit_step` and `early_exit_threshold` are read from the
    config when built; `forward(…, exit_at_step=, exit_threshold=, use_weighted_exit=)` overrides
    them per call. A fixed exit step wins over the threshold; with neither, the last step (or the
    expectation over the exit distribution with `use_weighted_exit`, or with labels)."""

    def __init__(self, vocab=64, dim=32, layers=2, total_ut_steps=4, early_exit_threshold=0.6, early_exit_step=None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                                      total_ut_steps=total_ut_steps, early_exit_threshold=early_exit_threshold,
                                      early_exit_step=early_exit_step)
        self.model = OuroModel(self.config)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.early_exit_step = getattr(self.config, "early_exit_step", None)
        self.early_exit_threshold = getattr(self.config, "early_exit_threshold", None)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                use_early_exit_gate=True, use_weighted_exit=False, exit_at_step=None, exit_threshold=None, **kwargs):
        exit_at_step = exit_at_step if exit_at_step is not None else self.early_exit_step
        exit_threshold = exit_threshold if exit_threshold is not None else self.early_exit_threshold
        outputs, states, gates = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds)
        remaining, pdf = torch.ones_like(gates[0].squeeze(-1)), []
        for i, gate in enumerate(gates):
            lam = torch.sigmoid(gate.squeeze(-1))
            pdf.append(lam * remaining if i < len(gates) - 1 else remaining)
            remaining = remaining * (1 - lam)
        pdf = torch.stack(pdf, dim=2)  # (B, T, steps)
        expected = lambda: sum(self.lm_head(h) * pdf[..., i, None] for i, h in enumerate(states))  # noqa: E731
        if labels is not None:
            logits = expected()
        elif exit_at_step is not None and 0 <= exit_at_step < len(states):
            logits = self.lm_head(states[exit_at_step])
        elif exit_threshold is not None:
            reached = pdf.cumsum(dim=2) >= exit_threshold
            exit_steps = torch.where(reached.any(2), reached.float().argmax(2), len(states) - 1)
            chosen = torch.stack(states, dim=2).gather(2, exit_steps[..., None, None].expand(-1, -1, 1, states[0].shape[-1]))
            logits = self.lm_head(chosen.squeeze(2))
        elif use_weighted_exit:
            logits = expected()
        else:
            logits = self.lm_head(outputs.last_hidden_state)
        return CausalLMOutputWithPast(logits=logits)


class MomentumLoop(nn.Module):
    """A step carrying a second tensor: (h, v) ← step(h, v, e) with v a momentum, both updated
    every iteration. The map the model iterates is (h, v) ↦ (h', v'), not h ↦ h' with v fixed."""

    def __init__(self, vocab=32, dim=16, steps=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.step = MomentumStep(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.steps = steps

    def forward(self, input_ids):
        e = self.embed(input_ids)
        h, v = e, torch.zeros_like(e)
        for _ in range(self.steps):
            h, v = self.step(h, v, e)
        return self.head(h)


class MomentumStep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.cell = nn.Linear(dim, dim)

    def forward(self, h, v, e):
        v = 0.9 * v + torch.tanh(self.cell(h)) + e
        return h + 0.5 * v, v


class PerTokenDepth(nn.Module):
    """Per-token depths: position i runs `depths[i]` iterations; a frozen position keeps its
    previous state (`torch.where`), the step's output there is thrown away. The loop runs to the
    deepest position, so the shallowest positions freeze early and one freezes at the last step."""

    def __init__(self, vocab=32, dim=16, depths=(2, 3, 4, 5, 6, 6)):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.step = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("depths", torch.tensor(depths), persistent=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        depth = self.depths[: input_ids.shape[1]]
        for t in range(int(depth.max())):
            out = self.step(h)
            h = torch.where((t < depth)[None, :, None], out, h)
        return self.head(self.norm(h))


class KLExitLoop(nn.Module):
    """A model whose adaptive path is another method: `forward` runs all steps; `forward_adaptive`
    steps the same block until the head's distribution stops moving (KL below a threshold),
    without calling forward."""

    def __init__(self, vocab=32, dim=16, steps=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.step = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, vocab, bias=False)
        self.steps = steps

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(self.steps):
            h = self.step(h)
        return self.head(h)

    @torch.no_grad()
    def forward_adaptive(self, input_ids, threshold=1e-3):
        h = self.embed(input_ids)
        logp = self.head(h).log_softmax(-1)
        for _ in range(self.steps):
            h = self.step(h)
            new = self.head(h).log_softmax(-1)
            if F.kl_div(new, logp, log_target=True, reduction="batchmean") < threshold:
                break
            logp = new
        return self.head(h)


def reference(states: list[torch.Tensor], h0: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-iteration convergence and spectral metrics from end states h_0 … h_{I−1} and the
    pre-loop state, written out from their definitions (records.ITERATION_METRICS)."""
    hs = [h0.double()] + [h.double() for h in states]
    out = {k: [] for k in ("rel_residual", "cos_step", "dist_to_final", "state_norm", "growth_ratio")}
    # dist_to_final is documented as a mean over 1 position in 16 (at least 4, evenly spaced, last
    # included) of bfloat16 copies: the exact value at those positions, and its stated error bound
    T = hs[-1].shape[1]
    sample = np.round(np.linspace(0, T - 1, min(T, max(4, -(-T // 16))))).astype(int)
    final = hs[-1][:, sample]
    bound = []
    for t in range(1, len(hs)):
        h, p = hs[t], hs[t - 1]
        n, np_ = h.norm(dim=-1), p.norm(dim=-1)
        out["rel_residual"].append(((h - p).norm(dim=-1) / n).mean().item())
        out["cos_step"].append((1 - (h * p).sum(-1) / (n * np_)).mean().item())
        hs_t = h[:, sample]
        out["dist_to_final"].append(((hs_t - final).norm(dim=-1) / final.norm(dim=-1)).mean().item())
        bound.append(2.0**-8 * (hs_t.norm(dim=-1) / final.norm(dim=-1)).mean().item() + 1e-6)
        out["state_norm"].append(n.mean().item())
        out["growth_ratio"].append((n / np_).mean().item())
    return {**{k: np.array(v) for k, v in out.items()}, "dist_to_final_bound": np.array(bound)}


def assert_matches(trace, ref: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    for name, values in ref.items():
        if name == "dist_to_final_bound":
            continue
        if name == "dist_to_final" and "dist_to_final_bound" in ref:
            err = np.abs(trace.iteration_metrics[name] - values)
            assert (err <= ref["dist_to_final_bound"]).all(), (name, err, ref["dist_to_final_bound"])
            continue
        np.testing.assert_allclose(trace.iteration_metrics[name], values, rtol=tol, atol=tol, err_msg=name)


class Capture:
    """Forward hooks that keep every output (and, optionally, input) of some modules; removed on exit."""

    def __init__(self, **modules: nn.Module):
        self.outputs = {k: [] for k in modules}
        self.inputs = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, output):
            self.outputs[key].append(output)
            self.inputs[key].append(args)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and \
        not any(k in vars(m) for m in model.modules() for k in ("core_block_forward", "generate", "forward_adaptive"))
