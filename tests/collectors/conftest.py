"""Fixtures for the collectors tests: temporary stores and a receiver on a free loopback port."""

from __future__ import annotations

import pytest

from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store

TABLE_KEYS = {
    "forwards": "trace_id, span_id",
    "iterations": "trace_id, span_id, iteration",
    "positions": "trace_id, span_id, batch_index, position, iteration",
    "experts": "trace_id, span_id, iteration, expert",
    "spans": "trace_id, span_id",
}


def table(store: Store, name: str, drop: tuple[str, ...] = ("forward_id",)):
    """A table's rows in key order, by default without the store-local `forward_id` (two stores
    holding the same forwards number them differently)."""
    df = store.query(f"SELECT * FROM {name} ORDER BY {TABLE_KEYS[name]}")
    return df.drop(columns=[c for c in drop if c in df.columns]).reset_index(drop=True)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.duckdb") as s:
        yield s


@pytest.fixture
def receiver(tmp_path):
    with Store(tmp_path / "received.duckdb") as s, Receiver(s, port=0) as r:
        yield r
