"""Shared test helpers.

`need(condition, reason)`: browser and interop tests must run in CI (CI=true) and fail there when
their real dependency is missing; elsewhere they skip with the printed reason.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers the interop tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


class SyncCounter:
    """Records every aten op that reads a device value on the host (behind .item(), bool(), a
    data-dependent shape, a copy to the CPU) while active: where a host synchronisation would
    happen on a GPU. On a CPU tensor only an explicit `.to("cpu", copy=True)` reaches the
    dispatcher as a copy (`.cpu()` returns the tensor itself), which is how the model's loop reads."""

    SYNCING = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item", "equal", "is_nonzero")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode  # torch only for the tests that count

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in counter.SYNCING:
                    counter.syncs.append(name)
                elif name == "_to_copy" and str((kwargs or {}).get("device", "")) == "cpu":
                    counter.syncs.append("copy to host")  # an explicit .to("cpu", copy=True)
                return func(*args, **(kwargs or {}))

        self.syncs: list[str] = []
        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.fixture(autouse=True, scope="session")
def _mutmut_frames_count_as_ours():
    """Under mutmut (scripts/mutation.sh) every function of the mutated module runs through a
    trampoline in mutmut's package: a frame outside mythos_probe and torch, where a warning's
    location (`mythos_probe/user_frame.py`) would stop. Counted as ours there, so the tests of where a
    warning points run (and kill mutants) under mutmut too."""
    if "MUTANT_UNDER_TEST" in os.environ:
        import mutmut

        from mythos_probe import user_frame

        user_frame._INTERNAL += (os.path.dirname(mutmut.__file__) + os.sep,)
    yield
