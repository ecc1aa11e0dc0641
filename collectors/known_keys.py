"""Which (trace_id, span_id) keys a DuckDB store may already hold, answered without a table scan.

The store drops a forward or span row it already holds (a retrying exporter, a replay). Asking
DuckDB with NOT EXISTS scans the key columns of `forwards` and `spans` on every write: ~5 ms on an
empty store, 75-135 ms at 100,000 forwards, so the receiver's commits slowed as the store grew.
`KnownKeys` keeps DuckDB's 64-bit `hash(trace_id, span_id)` of every stored key in memory (a
sorted numpy array, plus a set of the keys added since; 16 bytes a forward). A batch whose hashes
are all absent is new, for certain; any hit (a real duplicate or, rarely, a collision) sends the
batch to the exact query, so a collision costs a scan, never a row.

It checks itself: the row counts it covers are compared with the tables' own counts on every
write, and any difference (rows written or deleted by another path than `Store._write`) makes it
read the keys again, so it never answers "new" for a key it has not seen.

This module is not: the store (`store`), which owns the transaction and calls `new_keys`/`added`.
"""

from __future__ import annotations

import numpy as np

TABLES = ("forwards", "spans")
_MERGE_AT = 65_536  # keys added since the last sort: above this they are merged into the sorted array


class KnownKeys:
    def __init__(self) -> None:
        self._sorted: dict[str, np.ndarray] = {}
        self._recent: dict[str, set[int]] = {}
        self._rows: dict[str, int] = {}
        self.loads = 0  # times the keys were read from the tables (the first write, or after a difference)

    def _load(self, cur) -> None:
        for table in TABLES:
            hashes = cur.execute(f"SELECT hash(trace_id, span_id) AS h FROM {table}").fetchnumpy()["h"]
            self._sorted[table] = np.sort(hashes)  # DuckDB's UBIGINT: uint64
            self._recent[table] = set()
            self._rows[table] = len(hashes)
        self.loads += 1

    def check(self, cur, keys, counts: dict[str, int]) -> tuple[np.ndarray, bool]:
        """(the hash of each key of the Arrow table `keys` (columns spans, trace_id, span_id), in
        order; whether every one is certainly absent from its table), on cursor `cur` inside the
        write's transaction. `counts`: each table's row count now, read in that transaction."""
        if counts != self._rows:
            self._load(cur)
        _keys = keys  # noqa: F841 (read by DuckDB's replacement scan: no catalog change, see schema.insert_arrow)
        rows = cur.execute("SELECT spans, hash(trace_id, span_id) AS h FROM _keys").fetchnumpy()
        spans, hashes = rows["spans"], rows["h"]  # bool, uint64
        for table, mine in (("forwards", ~spans), ("spans", spans)):
            wanted, stored, recent = hashes[mine], self._sorted[table], self._recent[table]
            if len(stored):
                at = np.minimum(np.searchsorted(stored, wanted), len(stored) - 1)
                if (stored[at] == wanted).any():
                    return hashes, False
            if recent and not recent.isdisjoint(wanted.tolist()):
                return hashes, False
        return hashes, True

    def added(self, table: str, hashes: np.ndarray) -> None:
        """Records the keys (their `check` hashes) just committed to `table`."""
        if table not in self._rows:
            return
        recent = self._recent[table]
        recent.update(hashes.tolist())
        self._rows[table] += len(hashes)
        if len(recent) > _MERGE_AT:  # pragma: no mutate (when to merge changes no answer)
            self._sorted[table] = np.union1d(self._sorted[table], np.fromiter(recent, np.uint64))
            recent.clear()
