#!/usr/bin/env bash
# Arize Phoenix for the collectors interop test, in its own venv (.venv-phoenix): its dependency
# pins (sqlalchemy, grpc, protobuf…) may clash with ours, and the test only talks to it over OTLP
# and HTTP, so it never shares an interpreter with mythos-probe. Idempotent: skips when the pinned
# version is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-phoenix"
version="20.26.1"
if [ -x "$venv/bin/phoenix" ] && "$venv/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('arize-phoenix') != '$version')" 2>/dev/null; then
  exit 0
fi
echo "mythos-probe: installing arize-phoenix $version into $venv for the interop test…" >&2
command -v python3.11 >/dev/null && py=python3.11 || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check -q install --upgrade pip >/dev/null
"$venv/bin/python" -m pip --disable-pip-version-check -q install "arize-phoenix==$version"
