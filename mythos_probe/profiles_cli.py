"""`mythos-probe profiles STORE`: choose a loop profile per endpoint (or user, or any request
attribute) from the store's full-depth shadow forwards, write them with any cost limits to a JSON
file a server loads (`LoopProfiles.load(path).budget_for(attributes)`), print the evidence behind
each, and optionally write Prometheus rules for the limits.

This module is not: the choice itself (`loop_profiles`), the governor or the rules (`budget_rules`).
"""

from __future__ import annotations

import argparse
import re

HELP = "choose loop profiles per endpoint from stored shadow forwards, with cost limits and alert rules"

_LIMIT = re.compile(r"^(?P<key>[^=]+)=(?P<value>[^:]+):(?P<flops>[0-9.eE+]+)/(?P<window>[0-9.]+)s"
                    r"(?::(?P<action>refuse|degrade=\d+))?$")


def parse_limit(text: str):
    """`KEY=VALUE:FLOPS/WINDOWs[:degrade=N|:refuse]`, e.g. `endpoint=/hard:2e12/60s:degrade=2`."""
    from mythos_probe.loop_profiles import CostLimit

    m = _LIMIT.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"bad limit {text!r}: write KEY=VALUE:FLOPS/WINDOWs[:degrade=N|:refuse], e.g. "
            "endpoint=/hard:2e12/60s:degrade=2 (VALUE * for every value of KEY)")
    action = m["action"] or "degrade=1"
    return CostLimit(m["key"], m["value"], float(m["flops"]), float(m["window"]),
                     degraded_max_loops=1 if action == "refuse" else int(action.split("=")[1]),
                     refuse=action == "refuse")


def configure(parser: argparse.ArgumentParser) -> None:
    from mythos_probe.loop_profiles import DEFAULT_CONFIDENCE, DEFAULT_MIN_REQUESTS

    parser.add_argument("store", help="DuckDB store file or Parquet store folder holding full-depth shadow forwards "
                        "(kind='shadow', exit='fixed', lens probe at detail='positions'), e.g. the demo's")
    parser.add_argument("--target", type=float, default=0.99,
                        help="agreement with full depth each profile must keep, as a lower confidence bound (default 0.99)")
    parser.add_argument("--by", default="endpoint", help="request attribute to group by (default: endpoint)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help=f"confidence of the agreement bound (default {DEFAULT_CONFIDENCE})")
    parser.add_argument("--min-requests", type=int, default=DEFAULT_MIN_REQUESTS,
                        help=f"shadow forwards a group needs before it leaves full depth (default {DEFAULT_MIN_REQUESTS})")
    parser.add_argument("--limit", type=parse_limit, action="append", default=[], metavar="KEY=VALUE:FLOPS/Ws[:ACTION]",
                        help="a cost limit, repeatable: e.g. endpoint=/hard:2e12/60s:degrade=2 or user=*:1e12/3600s:refuse")
    parser.add_argument("--out", default="loop-profiles.json", help="profiles file to write (default: loop-profiles.json)")
    parser.add_argument("--rules", help="also write Prometheus rules for the endpoint limits to this file")


def run(args: argparse.Namespace) -> int:
    from mythos_probe.loop_profiles import profiles

    result = profiles(args.store, target=args.target, by=args.by, confidence=args.confidence,
                      min_requests=args.min_requests, limits=args.limit)
    result.save(args.out)
    print(result.describe())
    for lim in result.limits:
        action = "refuse" if lim.refuse else f"max_loops → {lim.degraded_max_loops}"
        print(f"  limit {lim.key}={lim.value}: {lim.flops:.3g} FLOPs per {lim.window_s:g} s, then {action}")
    print(f"wrote {args.out}")
    if args.rules:
        from mythos_probe.budget_rules import write_rules

        for note in write_rules(result, args.rules):
            print(f"  no rule for {note}")
        print(f"wrote {args.rules} (check with: promtool check rules {args.rules})")
    return 0
