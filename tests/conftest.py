"""Shared test helpers.

`need(condition, reason)`: browser and interop tests must run in CI (CI=true) and fail there when
their real dependency is missing; elsewhere they skip with the printed reason.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)
