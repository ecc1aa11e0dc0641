"""`mythos-probe export`: a store → partitioned Parquet, or replayed over OTLP.

`--parquet DIR` writes one Hive-partitioned dataset per table (`DIR/<table>/date=…/model_id=…/`)
through DuckDB's COPY, which DuckDB, Spark, ClickHouse and Polars read back with Hive
partitioning. A model id whose directory name would pass 255 bytes (escaped: a CJK character
takes 9) is refused before anything is written, naming it: a shortened name would change the
model id readers take from the path. Child tables get their forward's date and model by a join, so every table
partitions the same way; spans that are not forwards (per-iteration children) have no forward
row and land under `date=NULL/model_id=NULL`.

`--otlp ENDPOINT` replays every stored forward as the span `spans.emit` makes of it, under the
resource it arrived with, to an OTLP endpoint (`mythos-probe serve`, a Collector, Phoenix…), so a
store recorded offline can be loaded into a live backend. The `LoopTrace` is rebuilt from the typed
tables (they keep NaN and ±Inf, which JSON cannot) as span attributes and decoded by
`spans.attributes_to_trace`, the receiver's own decoder. Spans other than forwards are not
replayed. Settings other than the endpoint resolve as in `exporter.otlp_exporter`.

This module is not: the store (`store`), the span encoding (`spans`) or the transport (`exporter`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import duckdb
import numpy as np

from mythos_probe.cli import CommandError
from mythos_probe.collectors import spans
from mythos_probe.collectors.parquet_store import open_read_only
from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store
from mythos_probe.records import FORWARD_METRIC_NAMES, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES, LoopTrace

HELP = "export a store to partitioned Parquet or over OTLP"

# Forwards rebuilt and sent per round: bounds memory (a 256-position forward is ~1 MB of
# attribute lists) and keeps every round far below the exporter queue and request size limits.
CHUNK = 32


# A directory name is at most 255 bytes on the common file systems (ext4, XFS, APFS, NTFS), and
# Hive partitioning writes `model_id=<value>` with every byte outside [A-Za-z0-9-_.~] as %XX: an
# 86-character CJK model id (3 bytes each in UTF-8, 9 written) needs 783.
NAME_MAX = 255


def check_partition_values(store: Store) -> None:
    """Raises CommandError naming a model id whose partition directory would be too long, before
    anything is written: truncating or hashing the directory name would change the model id that
    every Hive reader takes from it."""
    for model_id in store.query("SELECT DISTINCT model_id FROM forwards WHERE model_id IS NOT NULL").model_id:
        name = "model_id=" + quote(model_id, safe="")
        if len(name.encode()) > NAME_MAX:
            shown = model_id if len(model_id) <= 40 else model_id[:40] + "…"
            raise CommandError(
                f"cannot export --parquet: model id {shown!r} ({len(model_id)} characters) would be the directory "
                f"name {name[:40]}… of {len(name.encode())} bytes, over the file system's {NAME_MAX}-byte limit "
                "(Hive partitioning keeps the model id in the directory name, escaped). Record the model under a "
                "shorter model_id (attach(model_id=...)), or export over OTLP instead"
            )


def export_parquet(store: Store, out: str | Path) -> dict[str, Path]:
    """Writes every table under `out/<table>/date=…/model_id=…/*.parquet`; returns the folders.
    Raises CommandError, writing nothing, when a model id is too long for a directory name."""
    check_partition_values(store)
    out = Path(out)
    folders = {}
    for table in TABLES:
        if table == "forwards":
            select = "SELECT *, strftime(start_time, '%Y-%m-%d') AS date FROM forwards"
        else:
            select = (
                f"SELECT t.*, strftime(f.start_time, '%Y-%m-%d') AS date, f.model_id AS model_id "
                f"FROM {table} t LEFT JOIN forwards f USING (trace_id, span_id)"
            )
        folder = out / table
        folder.mkdir(parents=True, exist_ok=True)
        # COPY takes no parameter for its target, so the path goes in as a quoted SQL literal.
        target = "'" + str(folder).replace("'", "''") + "'"
        store.query(f"COPY ({select}) TO {target} (FORMAT parquet, PARTITION_BY (date, model_id), OVERWRITE_OR_IGNORE)")
        folders[table] = folder
    return folders


_NULLABLE = {
    "forwards": FORWARD_METRIC_NAMES,
    "iterations": ITERATION_METRIC_NAMES,
    "positions": (*POSITION_METRIC_NAMES, "token_id", "token_text", "iterations_used"),
}


def _present(store: Store, table: str, columns: tuple[str, ...], lo: int, hi: int) -> dict[int, set[str]]:
    """Per forward, which of `columns` hold values: NULL means the record lacked the field, while
    pandas would show NULL and NaN alike."""
    counts = ", ".join(f'count("{c}") AS "{c}"' for c in columns)
    df = store.query(f"SELECT forward_id, {counts} FROM {table} WHERE forward_id BETWEEN ? AND ? GROUP BY forward_id", [lo, hi])
    return {int(row["forward_id"]): {c for c in columns if row[c] > 0} for _, row in df.iterrows()}


def stored_traces(store: Store, chunk: int = CHUNK) -> Iterator[list[tuple[str, LoopTrace]]]:
    """Every stored forward as (its resource as JSON, its `LoopTrace`), in store order, `chunk`
    forwards per list."""
    ids = store.query("SELECT forward_id FROM forwards ORDER BY forward_id")["forward_id"].tolist()
    for start in range(0, len(ids), chunk):
        lo, hi = ids[start], ids[min(start + chunk, len(ids)) - 1]
        between = "WHERE forward_id BETWEEN ? AND ?"
        forwards = store.query(
            "SELECT f.*, CAST(f.attributes AS VARCHAR) AS user, coalesce(CAST(s.resource AS VARCHAR), '{}') AS resource"
            f" FROM forwards f LEFT JOIN spans s USING (trace_id, span_id) {between.replace('forward_id', 'f.forward_id')}"
            " ORDER BY f.forward_id", [lo, hi])
        tables = {
            "iterations": store.query(f"SELECT * FROM iterations {between} ORDER BY forward_id, iteration", [lo, hi]),
            "positions": store.query(
                f"SELECT * FROM positions {between} ORDER BY forward_id, batch_index, position, iteration", [lo, hi]),
            "experts": store.query(f"SELECT * FROM experts {between} ORDER BY forward_id, iteration, expert", [lo, hi]),
        }
        rows = {name: dict(tuple(df.groupby("forward_id"))) for name, df in tables.items()}
        present = {table: _present(store, table, columns, lo, hi) for table, columns in _NULLABLE.items()}
        out = []
        for f in forwards.to_dict("records"):
            fid = f["forward_id"]
            attrs = _attributes(f, {t: p.get(fid, set()) for t, p in present.items()},
                                *(rows[t].get(fid) for t in ("iterations", "positions", "experts")))
            out.append((f["resource"], spans.attributes_to_trace(attrs, f["trace_id"], f["span_id"], f["start_ns"], f["end_ns"])))
        yield out


def _attributes(f: dict, present: dict[str, set[str]], iterations, positions, experts) -> dict:
    """One stored forward as the span attributes `spans.trace_to_attributes` would give its record;
    `present`: table → the columns that hold values for this forward."""
    # every scalar field from its column of the same name: kind, loop name and rank included
    attrs = {key: f[field] for field, key in spans.SCALAR_ATTRS.items()}
    for name in present["iterations"]:
        attrs[spans.ITERATION_ATTRS[name]] = iterations[name].to_numpy()
    for name in present["forwards"]:
        attrs[spans.FORWARD_ATTRS[name]] = f[name]
    metrics = [m for m in POSITION_METRIC_NAMES if m in present["positions"]]
    if metrics:
        attrs[spans.ATTR_POSITION_SHAPE] = [f["batch"], f["seq_len"], f["iterations"]]
        for name in metrics:
            attrs[spans.POSITION_ATTRS[name]] = positions[name].to_numpy()
    if positions is not None:
        first = positions[positions["iteration"] == 0]  # one row per (batch_index, position)
        for column, key in (("token_id", spans.ATTR_TOKEN_IDS), ("iterations_used", spans.ATTR_POSITION_ITERATIONS),
                            ("token_text", spans.ATTR_TOKEN_TEXT)):
            if column in present["positions"]:
                attrs[key] = first[column].tolist()
    for field, key in spans.BUDGET_ATTRS.items():  # list columns of the same name; NULL: no budgets
        value = f.get(field)
        if isinstance(value, (list, tuple, np.ndarray)):  # NULL reads as None or pandas' NA
            attrs[key] = list(value)
    if f["n_experts"]:
        attrs[spans.ATTR_EXPERT_COUNT] = f["n_experts"]
        attrs[spans.ATTR_EXPERT_LOAD] = [] if experts is None else experts["load"].tolist()
    for key, value in json.loads(f["user"]).items():
        # The JSON column holds NaN and ±Inf as null; NaN writes back to the same null.
        attrs[spans.PREFIX_USER + key] = float("nan") if value is None else value
    return attrs


@dataclass
class Replay:
    """What `export_otlp` sent: forwards stored, spans delivered and spans not delivered."""

    forwards: int
    delivered: int = 0
    not_delivered: int = 0


class _Sender:
    """One resource's tracer provider, on a `BoundedSpanProcessor` exporting to the endpoint."""

    def __init__(self, resource: str, endpoint: str, headers: dict[str, str] | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter

        self.processor = BoundedSpanProcessor(otlp_exporter(endpoint, headers=headers))
        # Resource(...) rather than exporter.tracer_provider's Resource.create(...): the span keeps
        # the resource it was stored with, not this process's service name and SDK version.
        self.provider = TracerProvider(resource=Resource(json.loads(resource)),
                                       id_generator=spans.LoopTraceIdGenerator(), span_limits=spans.SPAN_LIMITS)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("mythos_probe")


def export_otlp(store: Store, endpoint: str, progress: bool = True, token: str | None = None) -> Replay:
    """Emits every stored forward to `endpoint`, `CHUNK` at a time, waiting for each round to be
    exported (so nothing is dropped for a full queue). Stops at the first round of which no span
    got through, counting the rest as not delivered: an endpoint that is down fails every one.
    `token` is sent as `Authorization: Bearer <token>` (what `serve --token` checks); without it,
    the headers come from `OTEL_EXPORTER_OTLP_HEADERS` as for any OTLP exporter."""
    headers = None if token is None else {"Authorization": f"Bearer {token}"}
    from tqdm import tqdm

    result = Replay(forwards=int(store.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0]))
    senders: dict[str, _Sender] = {}
    bar = tqdm(total=result.forwards, unit="forward", desc="export", disable=not progress, file=sys.stderr)
    try:
        for chunk in stored_traces(store):
            if not _send(chunk, senders, endpoint, result, headers):
                break
            bar.update(len(chunk))
    finally:
        bar.close()
        for sender in senders.values():
            sender.provider.shutdown()
    result.not_delivered = result.forwards - result.delivered
    return result


def _send(items: list[tuple[str, LoopTrace]], senders: dict[str, _Sender], endpoint: str, result: Replay,
          headers: dict[str, str] | None = None) -> bool:
    """Emits one round and waits for it; False when none of its spans was delivered."""
    before = sum(s.processor.exported_spans for s in senders.values())
    for resource, trace in items:
        if resource not in senders:
            senders[resource] = _Sender(resource, endpoint, headers)
        spans.emit(senders[resource].tracer, trace)
    for sender in senders.values():
        sender.processor.force_flush()
    delivered = sum(s.processor.exported_spans for s in senders.values()) - before
    result.delivered += delivered
    return delivered > 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="DuckDB store file or Parquet store folder to read (opened read-only), "
                        "or the URL of a running serve (http://HOST:OTLP_PORT) to export the store it is writing")
    parser.add_argument("--parquet", metavar="DIR", help="write partitioned Parquet under DIR")
    parser.add_argument("--otlp", metavar="ENDPOINT",
                        help="replay every forward over OTLP/HTTP to ENDPOINT (base URL, e.g. http://127.0.0.1:4318)")
    parser.add_argument("--token", default=None,
                        help="the token of `serve --token`, sent as `Authorization: Bearer` to the --otlp endpoint "
                             "(default: the headers in OTEL_EXPORTER_OTLP_HEADERS) and to a serve URL read from "
                             "(default: $MYTHOS_PROBE_TOKEN)")


def why_not_delivered(endpoint: str, token: str | None) -> str:
    """Why an OTLP/HTTP endpoint took none of our spans, asked with one empty export request:
    authentication (401/403), nothing listening, or the status it answered."""
    import os
    import urllib.error
    import urllib.request

    from mythos_probe.collectors.exporter import _headers

    url = endpoint.rstrip("/") + "/v1/traces"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else _headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS"))
    request = urllib.request.Request(url, data=b"", method="POST",
                                     headers={**headers, "Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return f"{url} accepts requests but took none of the spans; see its log"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "the token given was refused" if token or headers else "no token was given"
            return (f"authentication failed at {url} (HTTP {exc.code}: {given}); pass the receiver's ingest token "
                    "with --token (that of `serve --token`) or set OTEL_EXPORTER_OTLP_HEADERS")
        return f"{url} answered HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"nothing answered at {url} ({reason}): is an OTLP receiver (e.g. `mythos-probe serve`) listening there?"


def run(args: argparse.Namespace) -> int:
    if not (args.parquet or args.otlp):
        raise CommandError("nothing to do: pass --parquet DIR or --otlp ENDPOINT")
    from mythos_probe.collectors.remote import RemoteStore, is_url

    if args.token is not None and not (args.otlp or is_url(args.store)):
        raise CommandError("--token is for --otlp or a serve URL (serve's ingest token)")
    with (RemoteStore(args.store, token=args.token) if is_url(args.store) else open_read_only(args.store)) as store:
        try:
            return _export(store, args)
        except duckdb.Error as exc:  # a page damaged past the catalog fails only when read
            raise CommandError(f"{args.store} is not a readable DuckDB store (left untouched): {exc}") from None


def _export(store, args: argparse.Namespace) -> int:
    if args.parquet:
        folders = export_parquet(store, args.parquet)
        print(json.dumps({t: str(p) for t, p in folders.items()}))
    if args.otlp:
        t0 = time.perf_counter()
        replay = export_otlp(store, args.otlp, token=args.token)
        print(f"replayed {replay.forwards:,} forwards to {args.otlp} in {time.perf_counter() - t0:.1f} s: "
              f"{replay.delivered:,} spans delivered, {replay.not_delivered:,} not delivered")
        if replay.not_delivered:
            print(f"mythos-probe export: {replay.not_delivered:,} of {replay.forwards:,} spans were not delivered: "
                  f"{why_not_delivered(args.otlp, args.token)}", file=sys.stderr)
            return 1
    return 0
