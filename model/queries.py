"""Which queries a layer computes when only some positions of a batch need an output.

The compacted loop (`looped.RecurrentBlock`) runs the heavy work of an iteration on the positions
still running and the coda lens reads a few positions out; both still need keys and values of
every earlier position of those rows. `Queries` lists the wanted (row, position) pairs, row-major.
A layer attends for them in one of three ways, the cheapest by a measured cost model (`plan`):
every position of the live rows in one plain causal call, keeping the wanted outputs ("full");
the wanted queries packed per row into one masked call, row `live[j]` holding its queries in slots
`0..width-1` of batch entry `j`, padded slots attending to key 0 only and dropped ("packed"); or
each wanted query as a batch entry of its own with its row's keys gathered ("gathered": on short
rows the kernel's cost per batch entry dominates, so a few queries are cheapest alone).
Everything after attention (MoE, LoRA, injection, lens head) runs on the N wanted positions only,
as a flat (N, D) tensor.

Built from a host-side boolean mask (`from_mask`: the loop reads its exit mask to the host once per
iteration and builds every index from it in numpy, so compaction adds no further host reads) or
from a fixed set of positions for every row (`grid`: the probes' lens positions, no host read).

This module is not: the attention layers (`looped.GQAttention`, `looped.MLAttention`) nor the
decision when to compact (`looped.RecurrentBlock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Queries:
    rows: torch.Tensor  # (N,) batch row of each wanted query, ascending
    pos: torch.Tensor  # (N,) its sequence index
    live: torch.Tensor  # (L,) the distinct rows, ascending
    slot: torch.Tensor  # (N,) index of rows[i] in live
    packed: torch.Tensor  # (N,) its place in the (L·width) packed queries: slot·width + rank in its row
    last: torch.Tensor  # (L, width) sequence index of each packed query (padding: 0, it sees key 0)
    local: torch.Tensor  # (L,) 0..L-1: the live rows once gathered
    width: int  # most queries in one row
    extent: Optional[int]  # 1 + the last wanted position: later ones feed no wanted query (causal); grid: None
    n_rows: int  # rows of the batch the indices refer to

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def every_row(self) -> bool:
        return self.live.shape[0] == self.n_rows

    @classmethod
    def from_mask(cls, mask: np.ndarray, device: torch.device) -> "Queries":
        """The True entries of a host (B, T) bool array."""
        rows, pos = np.nonzero(mask)
        counts = mask.sum(1)
        live = np.flatnonzero(counts)
        width = int(counts.max(initial=0))
        slot = (np.cumsum(counts > 0) - 1)[rows]
        packed = slot * width + np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
        last = np.zeros(live.size * width, dtype=np.int64)  # pragma: no mutate (all cast to int64 below)
        last[packed] = pos
        # one host-to-device copy for every index vector
        parts = [rows, pos, live, slot, packed, last, np.arange(live.size)]
        r, p, lv, sl, pk, la, lo = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device).split(
            [a.size for a in parts])
        return cls(r, p, lv, sl, pk, la.view(live.size, width), lo, width, int(pos.max(initial=-1)) + 1, mask.shape[0])

    @classmethod
    def grid(cls, n_rows: int, positions: torch.Tensor) -> "Queries":
        """`positions` of every row (no host read: shapes only)."""
        W, dev = positions.numel(), positions.device
        every = torch.arange(n_rows, device=dev)
        # no extent: reading positions.max() would be a host read
        return cls(every.repeat_interleave(W), positions.repeat(n_rows), every, every.repeat_interleave(W),
                   torch.arange(n_rows * W, device=dev), positions.expand(n_rows, W), every, W, None, n_rows)

    def within_live(self) -> "Queries":
        """The same queries indexed into a batch of the live rows only (x[self.live])."""
        return Queries(self.slot, self.pos, self.local, self.slot, self.packed, self.last, self.local,
                       self.width, self.extent, self.live.shape[0])

    def plan(self, seq_len: int, keys: int) -> str:
        """How a layer attends for these queries, the cheapest by a cost model measured on this
        CPU (benchmarks/bench_early_exit.py --rule prints the three side by side), per query head:

        - "full": every position of the live rows, one plain causal call, then the wanted ones:
          ~(0.09 + 0.0007·keys) per query, `seq_len` queries per row;
        - "packed": the wanted queries of each row packed into `width` slots, one masked call:
          ~(0.07 + 0.01·keys) per row (the kernel's cost per batch entry) + 0.16 per slot;
        - "gathered": each wanted query its own batch entry with its row's keys gathered:
          ~(0.16 + 0.015·keys) per query (copies the keys; cheap for a few queries on short rows).

        All three give the same values up to float rounding; the choice only costs time."""
        L = self.live.shape[0]
        full = L * seq_len * (0.09 + 0.0007 * keys)
        packed = L * (0.07 + 0.01 * keys + 0.16 * self.width)
        gathered = self.n * (0.16 + 0.015 * keys)
        return min((full, "full"), (packed, "packed"), (gathered, "gathered"))[1]

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """x (n_rows or L, ...) → (L, ...): the live rows (x itself when it holds only those)."""
        return x if x.shape[0] == self.live.shape[0] else x[self.live]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(n_rows, T, ...) → (N, ...): the wanted positions of x."""
        return x[self.rows, self.pos]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, causal: bool,
               dropout_p: float, enable_gqa: bool, plan: str) -> torch.Tensor:
        """q (N, H, d) of the wanted queries; k, v (n_rows, S, Hkv, d) with `past` cached positions
        before this call's first; query i sees keys 0..past + pos[i] (all, when not causal).
        Returns (N, H, dv). k and v may already be those of the live rows only. `plan`: "packed"
        or "gathered" (see `plan`)."""
        if self.n == 0:
            return q.new_zeros(0, q.shape[1], v.shape[-1])
        if plan == "gathered":
            return self._gathered(q, k, v, past, causal, dropout_p, enable_gqa)
        k, v = self.rows_of(k), self.rows_of(v)
        L, S, W = k.shape[0], k.shape[1], self.width
        packed = q.new_zeros(L * W, *q.shape[1:])
        packed[self.packed] = q
        mask = None
        if causal:
            last = self.last + past
            mask = (torch.arange(S, device=q.device) <= last[..., None])[:, None]  # (L, 1, W, S)
        out = sdpa(packed.view(L, W, *q.shape[1:]).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                   dropout_p, enable_gqa)  # (L, H, W, dv)
        return out.transpose(1, 2).reshape(L * W, *out.shape[1:2], out.shape[-1])[self.packed]

    def _gathered(self, q, k, v, past, causal, dropout_p, enable_gqa) -> torch.Tensor:
        """Each query a batch entry of its own, with its row's keys and values: the G query heads
        that share a key/value head (GQA) form that entry's G queries."""
        N, H, d = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        row = self.rows if k.shape[0] == self.n_rows else self.slot
        kq, vq = k[row].transpose(1, 2), v[row].transpose(1, 2)  # (N, Hkv, S, d)
        mask = None
        if causal:
            mask = (torch.arange(S, device=q.device) <= (self.pos + past)[:, None])[:, None, None]  # (N, 1, 1, S)
        G = H // Hkv if enable_gqa else 1  # pragma: no mutate (without GQA, H == Hkv: G is 1 either way)
        out = sdpa(q.view(N, H // G, G, d), kq, vq, mask, dropout_p,
                   False,  # pragma: no mutate (as many query as key heads: GQA is a no-op)
                   )  # (N, Hkv, G, dv)
        return out.reshape(N, H, out.shape[-1])


def sdpa(q, k, v, mask, dropout_p: float, enable_gqa: bool, is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, also fast when the value dim is below the query dim (MLA):
    that sends SDPA to its slow generic path, so v is zero-padded to the query dim (the padded
    channels come out zero and are dropped)."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         enable_gqa=enable_gqa)
    return out[..., :dv]
