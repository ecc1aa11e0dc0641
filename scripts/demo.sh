#!/usr/bin/env bash
# The main job: bootstrap .venv, then run the demo (extra arguments go to `mythos-probe demo`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/mythos-probe" demo "$@"
