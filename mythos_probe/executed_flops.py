"""The FLOPs a block of torch code actually runs, counted at the dispatcher.

    with ExecutedFlops() as counted:
        model(ids, exit="kl", exit_threshold=1e-4)
    counted.total, counted.by_op

Counts what reaches the kernels, whatever the model's own bookkeeping says: every matmul (`mm`,
`addmm`, `bmm`, `baddbmm`: 2·M·K·N) and every fused attention call (2·(d_qk + d_v) per attended
query-key pair per head: causal calls count the keys at or before each query, masked ones the
True entries of the mask, as Kaplan et al. 2020 count attention in `model.variants`; attention that
falls back to torch's math path is counted as its two matmuls, every pair). Elementwise
work (norms, activations, softmax) is not counted, as in Kaplan's count. So an exit policy's saving
is measured on what ran: keys and values still computed for exited positions, queries attended
and then dropped, and every coda-lens readout included.

A `TorchDispatchMode`, not `torch.utils.flop_counter.FlopCounterMode`: that one installs global
module hooks to track modules, and a looped model watched by hooks runs masked (so that hooks see
every position), so it would count a different forward than the one being measured; and it counts
no CPU flash attention. Counting costs host reads of attention masks and some Python per operator:
run it on a separate, untimed forward. A FLOP-heavy operator it has no formula for (a convolution,
a matrix-vector product, a grouped or scaled matmul) is named in a warning when the mode exits.

This module is not: the FLOP formula of a config (`model.variants`), nor the cost probe's metric
(`metrics.cost`), which is modeled from iteration counts.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mythos_probe.user_frame import outside

_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
# FLOP-heavy operators this counter has no formula for: met while counting, they make the total
# an undercount, so leaving the mode warns with their names (never a silently low figure)
# (torch's math attention is not among them: it is a composite, so the mode sees its two matmuls)
_NOT_COUNTED = ("convolution", "mv", "addmv", "dot", "vdot", "addbmm", "_grouped_mm", "_scaled_mm",
                "_scaled_dot_product_fused_attention_overrideable")
# fused attention kernels: where each takes its mask (or bias) and its is_causal flag
_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu": ("attn_mask", 4),  # (q, k, v, dropout, is_causal, *, attn_mask)
    "_scaled_dot_product_flash_attention": (None, 4),  # (q, k, v, dropout, is_causal, ...)
    "_scaled_dot_product_efficient_attention": (3, 6),  # (q, k, v, attn_bias, lse, dropout, is_causal)
    "_scaled_dot_product_cudnn_attention": (3, 6),
}


def _matmul_flops(name: str, args) -> int:
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _attention_flops(name: str, args, kwargs) -> int:
    q, k, v = args[:3]
    B, H, T, d_qk = q.shape
    S, d_v = k.shape[-2], v.shape[-1]
    mask_at, causal_at = _ATTENTION[name]
    mask = kwargs.get(mask_at) if isinstance(mask_at, str) else (args[mask_at] if mask_at and len(args) > mask_at else None)
    is_causal = kwargs.get("is_causal", args[causal_at] if len(args) > causal_at else False)
    if mask is not None:  # the attended entries, broadcast over the batch and heads
        mask = mask if mask.dtype == torch.bool else mask > float("-inf")
        pairs = int(mask.expand(B, H, T, S).sum())
    elif is_causal:  # torch's is_causal: query i sees keys 0..i (top-left aligned when T ≠ S)
        pairs = B * H * sum(min(i + 1, S) for i in range(T)) if T > S else B * H * T * (T + 1) // 2
    else:
        pairs = B * H * T * S
    return 2 * pairs * (d_qk + d_v)


class ExecutedFlops(TorchDispatchMode):
    """Counts the matmul and attention FLOPs dispatched while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.not_counted: Counter[str] = Counter()  # calls of FLOP-heavy operators left out of `total`

    def __exit__(self, *exc):
        if self.not_counted:
            calls = ", ".join(f"{name} ×{n}" for name, n in sorted(self.not_counted.items()))
            warnings.warn(f"ExecutedFlops has no FLOP formula for {calls}: `total` leaves them out and "
                          "undercounts this code; add their formula to mythos_probe/executed_flops.py",
                          stacklevel=outside())
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _MATMULS:
            self.by_op[name] += _matmul_flops(name, args)
        elif name in _ATTENTION:
            self.by_op["attention"] += _attention_flops(name, args, kwargs)
        elif name in _NOT_COUNTED:
            self.not_counted[name] += 1
        return func(*args, **kwargs)
