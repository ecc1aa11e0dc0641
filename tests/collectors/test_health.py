"""`/healthz` and `/readyz` on the receiver port of `serve` (issue 23): liveness answers while the
process serves; readiness follows the store, and goes to 503 with the reason once it is closed."""

from __future__ import annotations

import urllib.error
import urllib.request

from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store


def status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_and_readiness_follow_the_store(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    with Receiver(store, "127.0.0.1", 0, token="t") as receiver:  # no token needed for either
        assert status(receiver.endpoint + "/healthz") == (200, "ok\n")
        assert status(receiver.endpoint + "/readyz") == (200, "ready\n")
        store.close()
        code, body = status(receiver.endpoint + "/readyz")
        assert code == 503 and body.startswith("store not ready:") and "closed" in body
        assert status(receiver.endpoint + "/healthz") == (200, "ok\n")
        code, body = status(receiver.endpoint + "/v1/traces")
        assert code == 405 and "/healthz" in body
        assert receiver.rejected_requests == 0  # probes are not counted as rejected senders
