#!/usr/bin/env bash
# Run the whole test suite (bootstraps .venv first). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/system-deps.sh"
cd "$root"
bash "$root/scripts/interop-deps.sh"
exec "$root/.venv/bin/python" -m pytest "$@"
