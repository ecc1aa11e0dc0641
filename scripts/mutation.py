"""Mutation testing of the core modules with mutmut 3, one module at a time, each with only the
fast tests that cover it (`[tool.mythos-probe.mutation.tests]` in pyproject.toml).

Why a staging tree: mutmut names a mutant after its file's path (`collectors/spans.py` →
`collectors.spans`) and runs the tests against a copy of the sources in `mutants/`, first on
sys.path. Our sources live at the root (`model/`, `collectors/`, `dashboards/`) but are imported
as `mythos_probe.model`, ... (pyproject's package-dir mapping, an editable install here), so run
in place the tests would import the unmutated files through the editable finder and every mutant
would "survive" or have "no tests". The stage `build/mutation/<module>/` therefore holds the
installed layout, `mythos_probe/{model,collectors,dashboards}`, copied with their times kept (mutmut
re-mutates only the files that changed), `tests/`, and a pyproject.toml made of ours plus the
module's `[tool.mutmut]`. The package is imported from `mutants/` there, ahead of the editable
install. Results stay in the stage between runs; `benchmarks/mutation_scores.py` reads them.

Equivalent mutants by rule: before a run, the module's mutants are generated as mutmut generates
them and those whose only change is the letter case of SQL that DuckDB reads the same
(`scripts/mutation_equivalents.py` says exactly which) are written with their reasons to
`equivalent.json` in the stage and left out of the run; the score report counts them apart.
`--check-equivalents` runs them as well, to check the rule: none may be killed.

This is not run in CI (a module takes minutes to tens of minutes on two cores).

    scripts/mutation.sh                   # list the modules and their tests
    scripts/mutation.sh collectors/spans.py [--survivors] [--max-children 1]
    scripts/mutation.sh dashboards/queries.py --check-equivalents
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "mutation"
# the root folders pyproject's package-dir installs under mythos_probe
SUBPACKAGES = ("model", "collectors", "dashboards")


def settings() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mythos-probe"]["mutation"]


def staged_path(module: str) -> str:
    """`collectors/spans.py` → `mythos_probe/collectors/spans.py` (the installed layout)."""
    module = module.rstrip("/")
    first = module.split("/")[0]
    return f"mythos_probe/{module}" if first in SUBPACKAGES else module


def dotted(module: str) -> str:
    """The mutant-name prefix mutmut gives the module: `mythos_probe.collectors.spans`."""
    path = staged_path(module)
    return path.removesuffix(".py").replace("/", ".")


def slug(module: str) -> str:
    return module.rstrip("/").removesuffix(".py").replace("/", "__")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def sync(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> None:
    """Mirror src into dst keeping modification times (mutmut compares them): copy what is new or
    changed, delete what src no longer has (except the top-level names in `keep`)."""
    wanted = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or path.is_dir():
            continue
        wanted.add(rel)
        target = dst / rel
        st = path.stat()
        if target.exists() and (target.stat().st_mtime_ns, target.stat().st_size) == (st.st_mtime_ns, st.st_size):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for path in sorted(dst.rglob("*"), reverse=True) if dst.exists() else []:
        rel = path.relative_to(dst)
        if rel.parts[0] in keep or "__pycache__" in rel.parts:
            continue
        if path.is_file() and rel not in wanted:
            path.unlink()


def stage(module: str, tests: list[str], cfg: dict) -> Path:
    where = STAGE / slug(module)
    sync(ROOT / "mythos_probe", where / "mythos_probe", keep=SUBPACKAGES)
    for sub in SUBPACKAGES:
        sync(ROOT / sub, where / "mythos_probe" / sub)
    sync(ROOT / "tests", where / "tests")
    pytest_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    target = staged_path(module)
    mutmut = dict(cfg.get("mutmut", {}))
    mutmut.update(
        source_paths=["mythos_probe"],
        only_mutate=[target + "/*" if not target.endswith(".py") else target],
        pytest_add_cli_args_test_selection=tests,
    )
    lines = ["# written by scripts/mutation.py; edit pyproject.toml's [tool.mythos-probe.mutation]",
             "[tool.pytest.ini_options]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in pytest_cfg.items()]
    lines += ["", "[tool.mutmut]"] + [f"{k} = {toml_value(v)}" for k, v in mutmut.items()]
    (where / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return where


def forget_renumbered(module: str, where: Path) -> list[str]:
    """Set to "not checked" mutmut's results of the functions whose text changed since the last
    staging; returns the names reset.

    Why: mutmut keeps a function's results while its AST is unchanged, and comments are not in the
    AST. A `# pragma: no mutate` added or removed changes which mutants the function has and so
    their numbers: the kept results would silently belong to other mutants (a "killed" moved onto
    a survivor). Each function's text, comments in, is recorded in the stage
    (`function_texts.json`); one that differs from the record is re-tested by the next
    --survivors or --sample run. Without a record (a stage made before this check), nothing is reset."""
    import ast
    import hashlib

    from mutmut.mutation.trampoline_templates import mangle_function_name

    target = staged_path(module)
    files = [Path(target)] if target.endswith(".py") else sorted(
        p.relative_to(where) for p in (where / target).rglob("*.py"))
    texts: dict[str, str] = {}
    for rel in files:
        source = (where / rel).read_text()
        lines = source.splitlines()
        prefix = str(rel).removesuffix(".py").replace("/", ".").removesuffix(".__init__")

        def visit(body, owner=None):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    text = "\n".join(lines[first - 1:node.end_lineno])
                    key = f"{prefix}.{mangle_function_name(name=node.name, class_name=owner)}"
                    texts[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
                elif isinstance(node, ast.ClassDef):
                    visit(node.body, node.name if owner is None else f"{owner}.{node.name}")

        visit(ast.parse(source).body)
    record = where / "function_texts.json"
    old = json.loads(record.read_text()) if record.exists() else {}
    changed = {f for f, h in texts.items() if f in old and old[f] != h}
    reset = []
    for meta in (where / "mutants").rglob("*.py.meta") if changed else ():
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        hit = [n for n, code in codes.items() if code is not None and n.partition("__mutmut_")[0] in changed]
        if hit:
            codes.update(dict.fromkeys(hit))
            meta.write_text(json.dumps(data, indent=4))
            reset += hit
    record.write_text(json.dumps(texts, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return sorted(reset)


def forget_stale_stats(where: Path, tests: list[str]) -> bool:
    """Delete mutmut's record of which tests run which functions (`mutants/mutmut-stats.json`) when
    a test file of the module's mapping changed since the last staging (or was never recorded);
    returns whether it did.

    Why: mutmut collects that record again only for tests it has not seen; a test whose body now
    calls one more function keeps its old record, and mutmut never runs it against that function's
    mutants (a mutant it kills is counted as surviving). Without the record, mutmut collects it
    for every test at the next run (one run of the mapped tests)."""
    import hashlib

    files = sorted({t.split("::")[0] for t in tests} | {"tests/conftest.py"})
    texts = {f: hashlib.sha256((where / f).read_bytes()).hexdigest()[:16] for f in files if (where / f).is_file()}
    record = where / "test_texts.json"
    stale = not record.exists() or json.loads(record.read_text()) != texts
    stats = where / "mutants" / "mutmut-stats.json"
    if stale and stats.exists():
        stats.unlink()
    record.write_text(json.dumps(texts, indent=1, sort_keys=True) + "\n")
    return stale


def equivalent_file(module: str) -> Path:
    return STAGE / slug(module) / "equivalent.json"


def equivalents_of(module: str) -> dict[str, str]:
    """Mutant name → why it is equivalent, as the last run over `module` found (empty before)."""
    path = equivalent_file(module)
    return json.loads(path.read_text()) if path.exists() else {}


def mark_equivalents(module: str, where: Path) -> tuple[list[str], dict[str, str]]:
    """(every mutant name of `module`, those equivalent by rule with their reasons), generated
    from the staged source as mutmut generates them; the equivalents are saved for the report."""
    from mutation_equivalents import equivalents
    from mutmut.mutation.file_mutation import mutate_file_contents

    prefix = dotted(module)
    names, equivalent = [], {}
    target = staged_path(module)
    files = [Path(target)] if target.endswith(".py") else sorted(
        p.relative_to(where) for p in (where / target).rglob("*.py"))
    cwd = os.getcwd()
    os.chdir(where)  # mutmut's generator reads its configuration from the working directory
    try:
        for rel in files:
            file_prefix = str(rel).removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            generated = mutate_file_contents(str(rel), rel.read_text())
            names += [f"{file_prefix}.{n}" for n in generated.mutant_names]
            equivalent.update(equivalents(generated.code, list(generated.mutant_names), file_prefix))
    finally:
        os.chdir(cwd)
    names = [n for n in names if n.startswith(prefix)]
    equivalent_file(module).write_text(json.dumps(dict(sorted(equivalent.items())), indent=1, ensure_ascii=False) + "\n")
    return names, equivalent


def statuses_of(module: str) -> dict[str, str]:
    """Mutant name → mutmut's status in the last run over `module` (from its .meta files)."""
    from mutmut.stats import status_by_exit_code

    prefix = dotted(module) + "."
    out = {}
    for meta in (STAGE / slug(module) / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if name.startswith(prefix):
                out[name] = status_by_exit_code[code]
    return out


# A module's samples in the order drawn: <module>.txt, <module>.second.txt, ... (seeds 24, 25, ...)
SAMPLE_ORDER = ("", ".second", ".third", ".fourth")


def sample_path(module: str, index: int) -> Path:
    return ROOT / "benchmarks" / "mutation_samples" / f"{slug(module)}{SAMPLE_ORDER[index]}.txt"


def draw_sample(module: str, candidates: list[str], size: int) -> int:
    """Write a uniform random sample of `candidates` as the module's next sample: the first, or
    one drawn from the mutants outside the earlier samples (after the tests their survivors asked
    for, whose effect on those samples is no longer an estimate). Drawn over every mutant, whatever
    an earlier run said of it, with a fixed seed per sample; a sample is never redrawn (one chosen
    after seeing its score would not estimate the module's)."""
    import random

    index = next((i for i in range(len(SAMPLE_ORDER)) if not sample_path(module, i).exists()), None)
    if index is None:
        print(f"{slug(module)} has all {len(SAMPLE_ORDER)} samples; run it whole instead", file=sys.stderr)
        return 1
    earlier = {n for i in range(index) for n in sample_path(module, i).read_text().split()}
    pool = sorted(set(candidates) - earlier)
    chosen = sorted(random.Random(24 + index).sample(pool, min(size, len(pool))))
    path = sample_path(module, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(n + "\n" for n in chosen))
    print(f"{len(chosen)} of {len(pool)} mutants drawn: {path.relative_to(ROOT)}")
    return 0


def main(argv=None) -> int:
    cfg = settings()
    tests_by_module: dict[str, list[str]] = cfg["tests"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", help="a key of [tool.mythos-probe.mutation.tests], "
                        "e.g. collectors/spans.py or mythos_probe/metrics/")
    parser.add_argument("--survivors", action="store_true",
                        help="re-test only the mutants the last run did not kill or had no tests for (after adding tests), and "
                        "the new mutants of functions changed since")
    parser.add_argument("--sample", action="store_true",
                        help="test only the module's latest random sample (benchmarks/mutation_samples/), those not "
                        "killed yet: a score in minutes where a full run takes hours")
    parser.add_argument("--draw-sample", type=int, metavar="N",
                        help="draw the module's next random sample: N of its mutants outside the earlier samples "
                        "(the rule's equivalents left out), uniform, seeded, written to benchmarks/mutation_samples/; "
                        "never replaces one")
    parser.add_argument("--check-equivalents", action="store_true",
                        help="run only the mutants the SQL letter-case rule marks equivalent (none may be killed)")
    parser.add_argument("--mark-only", action="store_true",
                        help="only re-mark the equivalent mutants of the last run's stage (after a change to the "
                        "rule) and print the score; runs nothing")
    parser.add_argument("--only", action="append", metavar="GLOB",
                        help="test only the mutants whose name matches (fnmatch, repeatable), e.g. "
                        "'*RecurrentBlock*': a part of a module too slow to run whole")
    parser.add_argument("--max-children", type=int, default=1,
                        help="mutants tested at once (default 1: the machines here are shared)")
    args = parser.parse_args(argv)
    if args.module is None:
        for module, tests in tests_by_module.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    key = next((k for k in tests_by_module if k.rstrip("/") == args.module.rstrip("/")), None)
    if key is None:
        parser.error(f"no mutation config for {args.module!r}; known: {', '.join(tests_by_module)}")
    if args.sample:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from mutation_scores import sample_of

        if not sample_of(key):
            parser.error(f"no sample listed for {key} in benchmarks/mutation_samples/")
    if args.mark_only:  # the stage as the last run left it: a run may still be using it
        mark_equivalents(key, STAGE / slug(key))
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation_scores.py"), key]).returncode
    where = stage(key, tests_by_module[key], cfg)
    if forget_stale_stats(where, tests_by_module[key]):
        print("a mapped test file changed since the last run: mutmut collects which tests run which functions again")
    reset = forget_renumbered(key, where)
    if reset:
        print(f"{len(reset)} results reset to 'not checked': their functions' text changed since the last run "
              "(mutmut's own check reads the AST, which leaves out a changed `# pragma: no mutate`)")
    every, equivalent = mark_equivalents(key, where)
    print(f"{len(equivalent)} of {len(every)} mutants are equivalent by rule (SQL letter case); "
          f"{'checking them' if args.check_equivalents else 'left out of the run'}: {equivalent_file(key)}")
    if args.draw_sample:
        return draw_sample(key, [n for n in every if n not in equivalent], args.draw_sample)
    if args.check_equivalents:
        names = sorted(equivalent)
    elif args.sample:
        status = statuses_of(key)
        names = [n for n in sample_of(key)
                 if status.get(n, "not checked") not in ("killed", "timeout") and n not in equivalent]
        if not names:
            print("every mutant of the sample is killed")
            return 0
    elif args.survivors:
        # "no tests" too: the mapping may list new tests since
        names = sorted(n for n, s in statuses_of(key).items() if s not in ("killed", "timeout") and n not in equivalent)
    else:
        # named mutants are re-tested even when an earlier run has a verdict: the tests change
        names = [n for n in every if n not in equivalent]
    if args.only:
        import fnmatch

        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in args.only)]
    if not names:
        print("no mutants to test")
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    rc = subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *names],
                        cwd=where, env=env).returncode
    # Functions edited since the last run get fresh, unchecked mutants when mutmut regenerates
    # them, which a --survivors run does not name: test those too.
    unchecked = sorted(n for n, s in statuses_of(key).items()
                       if s == "not checked" and n not in equivalent and (not args.only or n in names))
    if rc == 0 and unchecked and not args.check_equivalents and not args.sample:
        rc = subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *unchecked],
                            cwd=where, env=env).returncode
    if args.check_equivalents:
        status = statuses_of(key)
        wrong = sorted(n for n in equivalent if status.get(n) in ("killed", "timeout"))
        print(f"equivalent by rule: {len(equivalent)}, killed: {len(wrong)}" + "".join(f"\n    {n}" for n in wrong))
        return rc or (1 if wrong else 0)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation_scores.py"), key])
    return rc


if __name__ == "__main__":
    sys.exit(main())
