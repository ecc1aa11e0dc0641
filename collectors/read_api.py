"""The read API of `mythos-probe serve`: readers beside the single writer, over HTTP.

DuckDB lets one process write a file and no other process read it meanwhile, so the dashboard, a
notebook or `export` read what `serve` stores through serve itself, on its OTLP port, with the
same bearer token as ingest:

    GET /v1/read                         → JSON {"store_id", "max_forward_id", "tables"}
    GET /v1/read/<table>?after=A&upto=B  → Arrow IPC stream: the table's rows of forwards A < forward_id ≤ B

`forward_id` is assigned in commit order, and a forward commits with its iterations, positions,
experts and span in one transaction, so a reader that asks for (A, B] with B at most the
`max_forward_id` it was told gets every row of those forwards, each once, whenever it asks (the
rows of a committed forward never change). `spans` holds the forwards' own spans (per-iteration
child spans stay in the store). `store_id` changes when serve restarts: a reader then starts again
from 0. `remote.RemoteStore` is the client.

A Parquet store folder (`serve --parquet`) numbers forwards by hash, not in commit order: it is
read directly, by as many readers as like (`mythos-probe dashboard DIR`), and its read API answers
501 saying so.

This module is not: the HTTP server (`receiver`), the client (`remote`) or the store (`store`).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs

import pyarrow as pa

from mythos_probe.collectors.store import Store

ARROW_STREAM = "application/vnd.apache.arrow.stream"
READ_PATH = "/v1/read"
_TABLE_PATH = re.compile(r"/v1/read/([a-z_]+)")
MAX_FORWARDS_PER_READ = 100_000  # a bound on one answer's size; the client asks for far fewer

_SELECT = {
    table: f"SELECT * FROM {table} WHERE forward_id > ? AND forward_id <= ? ORDER BY forward_id"
    for table in ("forwards", "iterations", "positions", "experts")
}
_SELECT["spans"] = ("SELECT s.* FROM spans s JOIN forwards f USING (trace_id, span_id) "
                    "WHERE f.forward_id > ? AND f.forward_id <= ? ORDER BY f.forward_id")


def _int(query: dict[str, list[str]], name: str) -> int:
    values = query.get(name)
    if not values or not re.fullmatch(r"-?[0-9]{1,19}", values[0]):
        raise ValueError(f"query parameter {name!r} must be an integer")
    return int(values[0])


def arrow_of(store: Any, sql: str, params: list) -> pa.Table:
    """The result of `sql` as an Arrow table, on one of the store's cursors."""
    with store._cursors.cursor() as cur:  # noqa: SLF001 — a read on the store's own connection
        rel = cur.sql(sql, params=params)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def answer(store: Any, store_id: str, path: str, query_string: str) -> tuple[int, bytes, str]:
    """(status, body, content type) for a GET under /v1/read."""
    if not isinstance(store, Store):
        return 501, (b"this serve writes a Parquet store folder: read the folder itself "
                     b"(mythos-probe dashboard DIR), which any number of readers may\n"), "text/plain; charset=utf-8"
    if path == READ_PATH:
        top = arrow_of(store, "SELECT coalesce(max(forward_id), 0) AS m FROM forwards", [])
        body = {"store_id": store_id, "max_forward_id": int(top.column("m")[0].as_py()), "tables": list(_SELECT)}
        return 200, json.dumps(body).encode(), "application/json"
    match = _TABLE_PATH.fullmatch(path)
    if match is None or match.group(1) not in _SELECT:
        return 404, f"tables: {', '.join(_SELECT)} under {READ_PATH}/\n".encode(), "text/plain; charset=utf-8"
    query = parse_qs(query_string)
    try:
        after, upto = _int(query, "after"), _int(query, "upto")
    except ValueError as exc:
        return 400, f"{exc}\n".encode(), "text/plain; charset=utf-8"
    if upto - after > MAX_FORWARDS_PER_READ:
        return 413, f"ask for at most {MAX_FORWARDS_PER_READ} forwards at a time\n".encode(), "text/plain; charset=utf-8"
    table = arrow_of(store, _SELECT[match.group(1)], [after, upto])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return 200, sink.getvalue().to_pybytes(), ARROW_STREAM

