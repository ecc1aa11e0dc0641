"""`LoopCache`: the activations of one `LoopedTransformer.run_with_cache` forward, with
TransformerLens's residual-stream analysis (`accumulated_resid`, `decompose_resid`,
`apply_ln_to_stack`, `logit_attrs`) given an iteration axis.

The residual stream of a looped model, unrolled: the embedding; each prelude block adds its
attention and MLP outputs; the loop starts from the prelude output (h_0 = e) and iteration t makes

    h_{t+1} = a_t ⊙ h_t + r_t ⊙ (B ⊙ e + x_t + attn_t + mlp_t + lora_t)

with x_t the block's normed input (`recurrent.block.hook_resid_pre`), a_t = A and r_t = 1 for a
running position, a_t = 1 and r_t = 0 for one frozen by a kl/latent exit (`model/looped.py`). So
every loop state is a sum of decayed components, and so is ACT's output Σ_t w_t h_{t+1}; the coda
blocks then add theirs. `iteration=t` means "the loop state after iteration t" (`loop.{t}`);
`iteration=None` the final residual entering the model's last RMSNorm.

Labels: "embed", "prelude.{i}.attn_out" / ".mlp_out", "loop.{t}.injection" / ".resid_pre" /
".attn_out" / ".mlp_out" / ".lora", "coda.{i}.attn_out" / ".mlp_out"; accumulated residuals
"embed", "prelude.{i}" (".mid"), "loop.{t}", "coda_in", "coda.{i}" (".mid").

The norm: `apply_ln_to_stack` applies the model's final RMSNorm (scale and weight) with the scale
of the residual the stack sums to (the final one, or the loop state after `iteration`), so that
components still sum to the normed residual and `logit_attrs` sum to the logit difference: at
`iteration=None` the model's own, at `iteration=t` the direct path norm(h_t)·W_U (the coda
skipped; the coda lens is not linear in the state). `recompute_ln=True` norms each entry by its
own scale (the logit lens of accumulated residuals).

This module is not: the hook points (`looped.py`) or the cache keying (`probes/hooks.py`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from mythos_probe.probes.hooks import IterationCache

PosSlice = Union[None, int, slice, Sequence[int], torch.Tensor]


def _apply_pos(x: torch.Tensor, pos_slice: PosSlice, dim: int = -2) -> torch.Tensor:
    """TransformerLens's `Slice` on the position dimension: None keeps all, an int drops the dim."""
    if pos_slice is None:
        return x
    if isinstance(pos_slice, int):
        return x.select(dim, pos_slice)
    if isinstance(pos_slice, slice):
        return x[(slice(None),) * (dim % x.dim()) + (pos_slice,)]
    index = torch.as_tensor(pos_slice, device=x.device)
    return x.index_select(dim, index)


class LoopCache(IterationCache):
    """What `LoopedTransformer.run_with_cache` returns: `cache["site"]`, `cache["site", t]`,
    `cache.stack("site")`, and the residual-stream analysis below. `forward` holds the call's
    arguments and what the model recorded of it (`last_forward`)."""

    def __init__(self, model, forward: dict, store=None) -> None:
        super().__init__(store)
        self.model = model
        self.forward = forward

    # -- what the analysis reads -------------------------------------------------------------

    def _need(self, key):
        try:
            return self[key]
        except KeyError:
            site = key[0] if isinstance(key, tuple) else key
            raise KeyError(
                f"this analysis reads {site!r}, which the cache does not hold: run_with_cache without "
                f"names_filter, or with a filter that keeps it") from None

    def n_iterations(self) -> int:
        """Loop iterations the forward ran (`iterations(site)`: how many of them a site was cached)."""
        return int(self.forward["iterations"])

    def _check_iteration(self, iteration: Optional[int]) -> None:
        n = self.n_iterations()
        if iteration is not None and not (isinstance(iteration, int) and 0 <= iteration < n):
            raise ValueError(f"iteration must be None (the final residual) or in 0..{n - 1} (this forward ran "
                             f"{n} iterations), got {iteration!r}")

    def _frozen_before(self, t: int) -> Optional[torch.Tensor]:
        """(B, T) positions frozen during iteration t (kl/latent exits), or None."""
        if t == 0 or self.forward["exit"] not in ("kl", "latent"):
            return None
        return self._need(("recurrent.hook_halted", t - 1))

    # -- residual stream ---------------------------------------------------------------------

    def accumulated_resid(self, iteration: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, return_labels: bool = False):
        """The residual stream at each point, stacked (n, B, T, D): the embedding, after each
        prelude block, the loop state after each iteration up to `iteration`, and (iteration None)
        the coda's input and after each coda block, the last being the final residual.
        `incl_mid`: also after each prelude and coda block's attention. `apply_ln`: the final
        RMSNorm with each entry's own scale (the logit lens)."""
        self._check_iteration(iteration)
        labels, parts = [], []

        def add(label: str, site) -> None:
            labels.append(label)
            parts.append(self._need(site))

        def blocks(section: str, n: int) -> None:  # the prelude's or the coda's blocks, in order
            for i in range(n):
                if incl_mid:
                    add(f"{section}.{i}.mid", f"{section}.{i}.hook_resid_mid")
                add(f"{section}.{i}", f"{section}.{i}.hook_resid_post")

        add("embed", "hook_embed")
        blocks("prelude", len(self.model.prelude))
        last = self.n_iterations() - 1 if iteration is None else iteration
        for t in range(last + 1):
            add(f"loop.{t}", ("recurrent.hook_state_out", t))
        if iteration is None:
            add("coda_in", "hook_coda_in")
            blocks("coda", len(self.model.coda))
        stack = torch.stack([_apply_pos(p, pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, iteration, pos_slice=pos_slice, recompute_ln=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, iteration: Optional[int] = None, mode: str = "all", apply_ln: bool = False,
                        pos_slice: PosSlice = None, incl_embeds: bool = True, return_labels: bool = False):
        """The residual (the final one, or the loop state after `iteration`) as a stack of the
        components that add up to it (n, B, T, D), each scaled by what the loop did to it since
        (the injection's decay A per later iteration; ACT's weights for ACT's output). `mode`:
        "all" (they sum to the residual), "attn" or "mlp" (only those outputs, and the embedding
        with `incl_embeds`). `apply_ln`: the final RMSNorm with the residual's scale."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        self._check_iteration(iteration)
        comps: dict[str, torch.Tensor] = {"embed": self._need("hook_embed")}
        for i in range(len(self.model.prelude)):
            comps[f"prelude.{i}.attn_out"] = self._need(f"prelude.{i}.hook_attn_out")
            comps[f"prelude.{i}.mlp_out"] = self._need(f"prelude.{i}.hook_mlp_out")
        rec = self.model.recurrent
        A = rec.injection.get_A().detach()
        injection = rec.injection.B.detach() * self._need("hook_encoded")
        act = self.forward["exit"] == "act" and iteration is None
        out: dict[str, torch.Tensor] = {}
        last = self.n_iterations() - 1 if iteration is None else iteration
        for t in range(last + 1):
            frozen = self._frozen_before(t)
            decay = A if frozen is None else torch.where(frozen[..., None], torch.ones_like(A), A)
            comps = {k: decay * v for k, v in comps.items()}
            new = {
                f"loop.{t}.injection": injection, f"loop.{t}.resid_pre": self._need(("recurrent.block.hook_resid_pre", t)),
                f"loop.{t}.attn_out": self._need(("recurrent.block.hook_attn_out", t)),
                f"loop.{t}.mlp_out": self._need(("recurrent.block.hook_mlp_out", t)),
                f"loop.{t}.lora": self._need(("recurrent.hook_lora_delta", t)),
            }
            for k, v in new.items():
                comps[k] = v if frozen is None else torch.where(frozen[..., None], torch.zeros_like(v), v)
            if act:  # ACT's output: Σ_t w_t h_{t+1}, component by component
                w = self._need(("recurrent.hook_act_weight", t))[..., None].to(A.dtype)
                for k, v in comps.items():
                    out[k] = out[k] + w * v if k in out else w * v
        if iteration is None:
            comps = out if act else comps
            for i in range(len(self.model.coda)):
                comps[f"coda.{i}.attn_out"] = self._need(f"coda.{i}.hook_attn_out")
                comps[f"coda.{i}.mlp_out"] = self._need(f"coda.{i}.hook_mlp_out")

        def kept(label: str) -> bool:
            if label == "embed":
                return incl_embeds
            return mode == "all" or label.endswith(f".{mode}_out")

        labels = [k for k in comps if kept(k)]
        stack = torch.stack([_apply_pos(comps[k], pos_slice) for k in labels])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, iteration, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def residual(self, iteration: Optional[int] = None) -> torch.Tensor:
        """(B, T, D): the final residual entering the last RMSNorm, or the loop state after `iteration`."""
        self._check_iteration(iteration)
        if iteration is not None:
            return self._need(("recurrent.hook_state_out", iteration))
        if len(self.model.coda):
            return self._need(f"coda.{len(self.model.coda) - 1}.hook_resid_post")
        return self._need("hook_coda_in")

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, iteration: Optional[int] = None,
                          pos_slice: PosSlice = None, batch_slice: Union[None, int, slice] = None,
                          recompute_ln: bool = False) -> torch.Tensor:
        """The final RMSNorm applied to a stack (n, B, T, D) whose entries are parts of the
        residual at `iteration` (None: the final one): divided by that residual's RMS scale (as
        the model computed it) and multiplied by the norm's weight, so that the parts still sum
        to the normed residual. `recompute_ln`: each entry normed with its own scale instead.
        `pos_slice` / `batch_slice`: already applied to the stack; applied here to the scale."""
        norm = self.model.norm
        if batch_slice is not None:
            residual_stack = residual_stack[:, batch_slice]
        if recompute_ln:
            return norm(residual_stack)
        resid = self.residual(iteration).float()
        scale = torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + norm.eps)  # (B, T, 1), as F.rms_norm
        scale = _apply_pos(scale, pos_slice)
        if batch_slice is not None:
            scale = scale[batch_slice]
        return (residual_stack.float() * scale * norm.weight.float()).to(residual_stack.dtype)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    iteration: Optional[int] = None, pos_slice: PosSlice = None,
                    batch_slice: Union[None, int, slice] = None) -> torch.Tensor:
        """How much each entry of a stack (n, B, T, D) of parts of the residual at `iteration`
        pushes the logit of `tokens` (minus that of `incorrect_tokens`): the normed parts
        (`apply_ln_to_stack`) dotted with the unembedding rows. Of a `decompose_resid` stack they
        sum to the logit (difference): at iteration None the model's own, at `iteration=t` that of
        norm(h_t)·W_U. `tokens`: an int, a (B,) tensor (one per example) or (B, T) (per position)."""
        W = self.model.head.weight.detach()

        def directions(tok) -> torch.Tensor:
            tok = torch.as_tensor(tok, device=W.device)
            d = W[tok]
            if tok.dim() == 1 and residual_stack.dim() == 4:  # one token per example, every position
                d = d.unsqueeze(-2)
            return d

        d = directions(tokens)
        if incorrect_tokens is not None:
            if torch.as_tensor(tokens).shape != torch.as_tensor(incorrect_tokens).shape:
                raise ValueError("tokens and incorrect_tokens must have the same shape")
            d = d - directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, iteration, pos_slice=pos_slice, batch_slice=batch_slice)
        return (scaled * d.to(scaled.dtype)).sum(-1)
