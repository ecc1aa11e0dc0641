"""The `mythos-probe` command line: one subcommand per module, each defining `HELP`,
`configure(parser)` and `run(args) -> int`.

Subcommand modules are imported only when their subcommand runs (or for `--help`), and must not
import torch at module level unless they need the model: `serve` and `dashboard` stay light.

Expected failures (a store that cannot be opened or is damaged, a port in use, a refused setting,
a `CommandError`) print one line, `mythos-probe COMMAND: what went wrong`, and exit with status 2;
the traceback is shown only with `--debug`. Anything else is a bug and keeps its traceback.
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
    "variants": ("mythos_probe.model.variants", "list model presets with parameters and FLOPs per token"),
    "profiles": ("mythos_probe.profiles_cli", "choose loop profiles per endpoint from stored shadow forwards"),
}


class CommandError(Exception):
    """A failure the user can fix, raised by a subcommand: printed as one line, exit status 2."""


def _expected() -> tuple[type[BaseException], ...]:
    # Imported here, after a failure, so that `--help` and `variants` never load DuckDB.
    import duckdb

    from mythos_probe.collectors.store import SchemaError, StoreError

    return (CommandError, StoreError, SchemaError, duckdb.Error, OSError, ValueError)


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
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug or not isinstance(exc, _expected()):
            raise
        print(f"mythos-probe {args.command}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
