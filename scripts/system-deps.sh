#!/usr/bin/env bash
# System packages some tests need: Debian's chromium and chromium-driver (browser tests) and
# prometheus (the Prometheus interop test; its promtool checks the rules in assets/), a Java 17 runtime
# (the Spark interop test). Each is installed when missing: in CI always (failing
# when it cannot be); elsewhere only when we are root and apt-get exists, otherwise those tests
# skip with a reason.
set -euo pipefail
need_browser=0 need_prometheus=0 need_java=0
{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || need_browser=1
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need_prometheus=1
command -v java >/dev/null || need_java=1
if [ $need_browser = 0 ] && [ $need_prometheus = 0 ] && [ $need_java = 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null
  if [ $need_browser = 1 ]; then
    echo "mythos-probe: installing chromium and chromium-driver for the browser tests…" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  if [ $need_prometheus = 1 ]; then
    echo "mythos-probe: installing prometheus for the interop test…" >&2
    # without recommends: the test runs the server binary itself and needs no node exporter
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  if [ $need_java = 1 ]; then
    echo "mythos-probe: installing a Java 17 runtime for the Spark interop test…" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
  fi
elif [ "${CI:-}" = "true" ]; then
  echo "chromium, chromium-driver, prometheus or java is missing and cannot be installed (need root and apt-get)" >&2
  exit 1
fi
