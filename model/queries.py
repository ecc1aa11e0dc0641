"""Which queries a layer computes when only some positions of a batch need an output.

The compacted loop (`looped.RecurrentBlock`) runs the heavy work of an iteration on the positions
still running and the coda lens reads a few positions out; both still need keys and values of
every earlier position of those rows. `Queries` lists the wanted (row, position) pairs, row-major,
and packs them per row for one masked attention call: row `live[j]` holds its queries in slots
`0..width-1` of batch entry `j`, padded slots attend to key 0 only and are dropped. Attention then
costs rows × width × keys instead of rows × every position × keys, and everything after attention
(MoE, LoRA, injection, lens head) runs on the N wanted rows only, as a flat (N, D) tensor.

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
    rank: torch.Tensor  # (N,) its place among its row's queries
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
        slot = (np.cumsum(counts > 0) - 1)[rows]
        rank = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
        # one host-to-device copy for all five index vectors
        packed = torch.from_numpy(np.concatenate([rows, pos, live, slot, rank]).astype(np.int64)).to(device)
        n, nl = rows.size, live.size
        r, p, lv, sl, rk = packed.split([n, n, nl, n, n])
        return cls(r, p, lv, sl, rk, int(counts.max(initial=0)), int(pos.max(initial=-1)) + 1, mask.shape[0])

    @classmethod
    def grid(cls, n_rows: int, positions: torch.Tensor) -> "Queries":
        """`positions` of every row (no host read: shapes only)."""
        W, dev = positions.numel(), positions.device
        rows = torch.arange(n_rows, device=dev).repeat_interleave(W)
        rank = torch.arange(W, device=dev).repeat(n_rows)
        # no extent: reading positions.max() would be a host read
        return cls(rows, positions.repeat(n_rows), torch.arange(n_rows, device=dev), rows, rank, W, None, n_rows)

    def within_live(self) -> "Queries":
        """The same queries indexed into a batch of the live rows only (x[self.live])."""
        return Queries(self.slot, self.pos, torch.arange(self.live.shape[0], device=self.live.device),
                       self.slot, self.rank, self.width, self.extent, self.live.shape[0])

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(n_rows, T, ...) → (N, ...): the wanted positions of x."""
        return x[self.rows, self.pos]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, causal: bool,
               dropout_p: float, enable_gqa: bool) -> torch.Tensor:
        """q (N, H, d) of the wanted queries; k, v (n_rows, S, Hkv, d) with `past` cached positions
        before this call's first; query i sees keys 0..past + pos[i] (all, when not causal).
        Returns (N, H, dv). k and v may already be those of the live rows only."""
        if self.n == 0:
            return q.new_zeros(0, q.shape[1], v.shape[-1])
        if k.shape[0] != self.live.shape[0]:
            k, v = k[self.live], v[self.live]
        L, S = k.shape[0], k.shape[1]
        packed = q.new_zeros(L, self.width, *q.shape[1:])
        packed[self.slot, self.rank] = q
        mask = None
        if causal:
            last = torch.zeros(L, self.width, dtype=torch.long, device=q.device)  # padded slots: key 0
            last[self.slot, self.rank] = self.pos + past
            mask = (torch.arange(S, device=q.device) <= last[..., None])[:, None]  # (L, 1, W, S)
        out = sdpa(packed.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout_p, enable_gqa)
        return out.transpose(1, 2)[self.slot, self.rank]


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
