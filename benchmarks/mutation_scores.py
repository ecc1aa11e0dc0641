"""The last mutation score of each core module: the share of mutmut's mutants its tests killed,
read from the results `scripts/mutation.sh MODULE` left in build/mutation/ (nothing is re-run).

Killed counts mutants a test failed on and those that ran past mutmut's time limit (a mutant
that loops forever is caught); every other status (survived, no tests, suspicious, segfault,
skipped) counts against the score. Mutants whose line carries `# pragma: no mutate` (an
equivalent change, the reason written beside it) are never generated, so they count neither way.
Mutants equivalent by the SQL letter-case rule (`scripts/mutation_equivalents.py`; they are
generated, then left out of the run) count neither way either, and are reported apart in the
"equivalent" column, never folded into "killed"; `--equivalents` lists them with their reasons.
The targets are those of issue 24: 95 % where the module is listed in TARGET_95, else 90 %.
Where a full run takes hours, a module is scored on uniform random samples of its mutants listed
in benchmarks/mutation_samples/<module>.txt, then <module>.second.txt, <module>.third.txt, each
drawn after the tests the one before asked for (`scripts/mutation.sh MODULE --sample` runs the
latest): a line per sample gives the share killed among its names that mutmut still generates (a
pragma or a code change since the draw renumbers a function's mutants; those names count neither way).

    .venv/bin/python benchmarks/mutation_scores.py [MODULE ...] [--survivors] [--equivalents]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from mutation import SAMPLE_ORDER, equivalents_of, sample_path, statuses_of  # noqa: E402

TARGET_95 = {"mythos_probe/metrics/", "mythos_probe/probes/reductions.py", "collectors/spans.py",
             "collectors/rows.py", "collectors/otlp_decode.py", "dashboards/queries.py"}
DETECTED = {"killed", "timeout"}


def samples_of(module: str) -> dict[str, list[str]]:
    """`module`'s random samples in the order drawn, by label ("sample", "second sample", ...)."""
    found = {}
    for index, suffix in enumerate(SAMPLE_ORDER):
        path = sample_path(module, index)
        if path.is_file():
            found[f"{suffix.lstrip('.')} sample".strip()] = path.read_text().split()
    return found


def sample_of(module: str) -> list[str]:
    """The mutant names of `module`'s latest random sample (empty if it has none)."""
    samples = samples_of(module)
    return list(samples.values())[-1] if samples else []


def main(argv=None) -> int:
    modules = list(tomllib.loads((ROOT / "pyproject.toml").read_text())
                   ["tool"]["mythos-probe"]["mutation"]["tests"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="*", help="modules to report (default: all configured)")
    parser.add_argument("--survivors", action="store_true", help="list the mutants not killed")
    parser.add_argument("--equivalents", action="store_true",
                        help="list the mutants equivalent by rule (SQL letter case), with why")
    args = parser.parse_args(argv)
    chosen = [m for m in modules if not args.module or m.rstrip("/") in {a.rstrip("/") for a in args.module}]
    print(f"{'module':40s} {'killed':>7s} {'total':>6s} {'score':>7s} {'target':>7s} {'equivalent':>10s}  not killed")
    for module in chosen:
        equivalent = equivalents_of(module)
        everything = statuses_of(module)
        status = {n: s for n, s in everything.items() if n not in equivalent}
        if not status:
            print(f"{module:40s} {'-':>7s} {'-':>6s} {'never run':>7s}")
            continue
        counts = Counter(status.values())
        killed = sum(counts[s] for s in DETECTED)
        target = 95 if module in TARGET_95 else 90
        rest = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in DETECTED)
        marked = sum(n in everything for n in equivalent)
        print(f"{module:40s} {killed:7d} {len(status):6d} {100 * killed / len(status):6.1f}% "
              f"{target:6d}% {marked:10d}  {rest}")
        for label, sample in samples_of(module).items():
            c = Counter(status.get(n, "not generated") for n in sample)
            k = sum(c[s] for s in DETECTED)
            scored = len(sample) - c["not generated"]
            rest = ", ".join(f"{n} {s}" for s, n in sorted(c.items()) if s not in DETECTED)
            print(f"{'  ' + label:40s} {k:7d} {scored:6d} {100 * k / max(scored, 1):6.1f}% {target:6d}%  {rest}")
        if args.equivalents:
            for name, why in sorted(equivalent.items()):
                if name in everything:
                    print(f"    equivalent   {name}: {why}")
        if args.survivors:
            for name, s in sorted(status.items()):
                if s not in DETECTED:
                    print(f"    {s:12s} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
