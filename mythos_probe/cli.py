"""The `mythos-probe` command line: one subcommand per module, each defining `HELP`,
`configure(parser)` and `run(args) -> int`.

Subcommand modules are imported only when their subcommand runs (or for `--help`), and must not
import torch at module level unless they need the model: `serve` and `dashboard` stay light.

Expected failures (a store that cannot be opened or is damaged, a port in use, a refused setting,
a `CommandError`) print one line, `mythos-probe COMMAND: what went wrong`, and exit with status 2;
the traceback is shown only with `--debug`. Anything else is a bug and keeps its traceback.
A module of an extra that is not installed (torch for `demo` in a server install, DuckDB for
`serve` in a bare one) is one line too, naming the extra to install (`mythos_probe.extras`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "demo": ("mythos_probe.demo.run", "run the trained model on a mixed workload, store it and serve the dashboard"),
    "serve": ("mythos_probe.collectors.serve", "receive OTLP from remote workers, write the store, host the dashboard"),
    "dashboard": ("mythos_probe.dashboards.cli", "open a store (DuckDB file or Parquet folder) read-only in the dashboard"),
    "export": ("mythos_probe.collectors.export_cli", "export a store to partitioned Parquet or over OTLP"),
    "compact": ("mythos_probe.collectors.compact_cli", "compact a Parquet store folder in place, safely while others write and read it"),
    "variants": ("mythos_probe.model.variants", "list model presets with parameters and FLOPs per token"),
    "profiles": ("mythos_probe.profiles_cli", "choose loop profiles per endpoint from stored shadow forwards"),
}


class CommandError(Exception):
    """A failure the user can fix, raised by a subcommand: printed as one line, exit status 2."""


def port_number(text: str) -> int:
    """argparse type of every port option: 0 (a free one) to 65535, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1 to 65535, or 0 for a free one")
    return value


def _expected() -> tuple[type[BaseException], ...]:
    # Imported here, after a failure, so that `--help` and `variants` never load DuckDB; a server
    # install without DuckDB fails for that reason first, and must not fail again here.
    expected: tuple[type[BaseException], ...] = (CommandError, OSError, ValueError)
    try:
        import duckdb

        from mythos_probe.collectors.store import SchemaError, StoreError
    except ImportError:
        return expected
    return (*expected, StoreError, SchemaError, duckdb.Error)


def _fail(command: str | None, message: str) -> int:
    print(f"mythos-probe {command or ''}: {message}".replace(" :", ":"), file=sys.stderr)
    return 2


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mythos-probe",
        description="Observability and interpretability for looped (recurrent-depth) transformers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that will run
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mythos_probe import extras

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser(argv).parse_args(argv)
    except ModuleNotFoundError as exc:  # the subcommand's module needs an extra not installed
        if debug or extras.missing(exc) is None:
            raise
        return _fail(next((a for a in argv if not a.startswith("-")), None), extras.missing(exc))
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if extras.missing(exc) is not None:
            return _fail(args.command, extras.missing(exc))
        if not isinstance(exc, _expected()):
            raise
        return _fail(args.command, f"{exc} (--debug shows the traceback)")


if __name__ == "__main__":
    # `python -m mythos_probe.cli` runs this file as `__main__`: run the imported module instead, so
    # that its `CommandError` is the one the subcommands raise.
    from mythos_probe.cli import main as _main

    sys.exit(_main())
