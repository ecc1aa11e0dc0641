"""The `mythos-probe` command line: one subcommand per module, each defining `HELP`,
`configure(parser)` and `run(args) -> int`.

Subcommand modules are imported only when their subcommand runs (or for `--help`), and must not
import torch at module level unless they need the model: `serve` and `dashboard` stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("mythos_probe.demo", "run the trained model on a mixed workload, store it and serve the dashboard"),
    "serve": ("mythos_probe.collectors.serve", "receive OTLP from remote workers, write the store, host the dashboard"),
    "dashboard": ("mythos_probe.dashboards.cli", "open a DuckDB store read-only in the dashboard"),
    "export": ("mythos_probe.collectors.export_cli", "export a store to partitioned Parquet or over OTLP"),
    "variants": ("mythos_probe.model.variants", "list model presets with parameters and FLOPs per token"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mythos-probe",
        description="Observability and interpretability for looped (recurrent-depth) transformers.",
    )
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
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
