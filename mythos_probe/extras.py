"""Which install extra brings which optional module, and the one-line message that names it.

The base install (`pip install mythos-probe`) is torch-free and stores nothing. Two extras fit the
two kinds of user (README, "Install"):
- `server`: `mythos-probe serve`, `dashboard`, `export` and Prometheus (DuckDB, Arrow, the
  OpenTelemetry SDK and OTLP/HTTP exporter, Dash), no torch;
- `probe`: `attach()` in a training or inference process or a notebook (torch, TransformerLens,
  safetensors, and the DuckDB store the recorder writes).

`missing(exc)` turns the `ModuleNotFoundError` of such a module into that one line; the CLI prints
it instead of a traceback, and `mythos_probe.attach` raises it.

This module is not the list of dependencies (pyproject.toml is).
"""

from __future__ import annotations

PROBE = "probe"
SERVER = "server"

# top-level module → the extra that installs it
EXTRA_OF = {
    "torch": PROBE,
    "transformer_lens": PROBE,
    "safetensors": PROBE,
    "duckdb": SERVER,
    "pyarrow": SERVER,
    "opentelemetry": SERVER,
    "google": SERVER,  # protobuf, with the OpenTelemetry proto package
    "prometheus_client": SERVER,
    "dash": SERVER,
    "dash_ag_grid": SERVER,
    "werkzeug": SERVER,
    "flask": SERVER,
}

_WHAT = {PROBE: "attach() and the model", SERVER: "serve, dashboard, export and Prometheus"}


def install_line(extra: str) -> str:
    return f"pip install 'mythos-probe[{extra}]'"


def missing(exc: BaseException) -> str | None:
    """The one-line message for a missing optional module, or None when `exc` is something else."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    also = " (or [probe] in a notebook, which includes the store)" if extra == SERVER and top in ("duckdb", "pyarrow", "opentelemetry", "google") else ""
    return f"{top} is not installed; {_WHAT[extra]} need the {extra} extra: {install_line(extra)}{also}"


def require(exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """`exc` again with the message naming its extra, for `raise require(exc) from None`."""
    message = missing(exc)
    return exc if message is None else ModuleNotFoundError(message, name=exc.name)
