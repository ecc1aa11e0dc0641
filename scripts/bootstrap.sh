#!/usr/bin/env bash
# Create or reuse .venv with everything the demo and the test suite need. Idempotent: reinstalls
# only when pyproject.toml or this script changed since the last successful run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mythos-probe-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import mythos_probe" 2>/dev/null; then
  exit 0
fi
echo "mythos-probe: preparing $venv (first run takes a few minutes)…" >&2
command -v python3.11 >/dev/null && py=python3.11 || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk; letting a resolver
# pick `torch` freely would download a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e "$root[dev]"
# open-mythos pins torch==2.11; it is pure Python and runs on our torch, so install it without deps.
"${pip[@]}" install --no-deps "open-mythos==0.5.0"
echo "$want" > "$stamp"
