#!/usr/bin/env bash
# System packages the browser tests need: Debian's chromium and chromium-driver. Installed in CI
# when missing; elsewhere only when we are root and apt-get exists, otherwise the browser tests
# skip with a reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "mythos-probe: installing chromium and chromium-driver for the browser tests…" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
elif [ "${CI:-}" = "true" ]; then
  echo "chromium and chromium-driver are missing and cannot be installed (need root and apt-get)" >&2
  exit 1
fi
