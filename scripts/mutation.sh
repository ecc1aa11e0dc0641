#!/usr/bin/env bash
# Mutation testing of one core module (see scripts/mutation.py): scripts/mutation.sh MODULE
# [--survivors] [--max-children N]; without MODULE, lists the modules and their tests.
# Not part of CI: a module takes minutes. Scores: .venv/bin/python benchmarks/mutation_scores.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec nice -n "${MUTATION_NICE:-15}" "$root/.venv/bin/python" "$root/scripts/mutation.py" "$@"
