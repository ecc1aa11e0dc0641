"""Small Huginn- and Ouro-shaped models for the spec tests, and the reference metrics every spec
test compares against.

The public code of Huginn (seal-rg/recurrent-pretraining, `recpre/raven_modeling_minimal.py`) and
of Ouro (ByteDance `modeling_ouro.py`) is not on PyPI, so these models are written here from the
papers and that code's structure: the same module names and the same recurrence, none of its code.
- `RavenForCausalLM`: `transformer.{wte, prelude, adapter, core_block, coda, ln_f}` and `lm_head`;
  `iterate_forward` starts from a random state and calls `core_block_forward(x, input_embeds, …)`,
  which runs adapter(cat[x, e]) then the core blocks and returns (x, block_idx).
- `OuroForCausalLM`: `model.{embed_tokens, layers, norm, early_exit_gate}` and `lm_head`; each of
  `total_ut_steps` steps runs every layer then the norm, and the gate gives an exit logit; the
  exit distribution p_t = λ_t Π(1 − λ_s) (the last step takes the remainder) picks, per position,
  the first step whose cumulative mass reaches `early_exit_threshold`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


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


class RavenForCausalLM(nn.Module):
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
        self.num_steps = num_steps

    def initialize_state(self, input_embeds):
        return torch.randn_like(input_embeds) * 0.4

    def core_block_forward(self, x, input_embeds, block_idx):
        x = self.transformer.adapter(torch.cat([x, input_embeds], dim=-1))
        for block in self.transformer.core_block:
            block_idx += 1
            x = block(x, block_idx)
        return x, block_idx

    def iterate_forward(self, input_embeds, num_steps):
        x = self.initialize_state(input_embeds)
        block_idx = 0
        for _ in range(num_steps):
            x, block_idx = self.core_block_forward(x, input_embeds, block_idx)
        return self.transformer.ln_f(x)

    def forward(self, input_ids, num_steps=None):
        e = self.transformer.wte(input_ids)
        for block in self.transformer.prelude:
            e = block(e)
        x = self.iterate_forward(e, num_steps or self.num_steps)
        for block in self.transformer.coda:
            x = block(x)
        return CausalLMOutputWithPast(logits=self.lm_head(self.transformer.ln_f(x)))


class OuroModel(nn.Module):
    def __init__(self, vocab, dim, layers, total_ut_steps):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim) for _ in range(layers)])
        self.norm = nn.RMSNorm(dim)
        self.early_exit_gate = nn.Linear(dim, 1)
        self.total_ut_steps = total_ut_steps

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        states, gates = [], []
        for _ in range(self.total_ut_steps):
            for layer in self.layers:
                h = layer(h)
            h = self.norm(h)
            states.append(h)
            gates.append(self.early_exit_gate(h))
        return h, states, gates


class OuroForCausalLM(nn.Module):
    def __init__(self, vocab=64, dim=32, layers=2, total_ut_steps=4, early_exit_threshold=0.6):
        super().__init__()
        self.config = SimpleNamespace(total_ut_steps=total_ut_steps, early_exit_threshold=early_exit_threshold)
        self.model = OuroModel(vocab, dim, layers, total_ut_steps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        last, states, gates = self.model(input_ids)
        threshold = self.config.early_exit_threshold
        if threshold is None:
            return CausalLMOutputWithPast(logits=self.lm_head(last))
        remaining, pdf = torch.ones_like(gates[0].squeeze(-1)), []
        for i, gate in enumerate(gates):
            lam = torch.sigmoid(gate.squeeze(-1))
            pdf.append(lam * remaining if i < len(gates) - 1 else remaining)
            remaining = remaining * (1 - lam)
        reached = torch.stack(pdf, dim=2).cumsum(dim=2) >= threshold
        exit_step = torch.where(reached.any(2), reached.float().argmax(2), len(gates) - 1)  # (B, T)
        chosen = torch.stack(states, dim=2).gather(2, exit_step[..., None, None].expand(-1, -1, 1, last.shape[-1]))
        return CausalLMOutputWithPast(logits=self.lm_head(chosen.squeeze(2)))


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
        not any(k in vars(m) for m in model.modules() for k in ("core_block_forward", "generate"))
