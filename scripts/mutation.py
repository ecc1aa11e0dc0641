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

This is not run in CI (a module takes minutes to tens of minutes on two cores).

    scripts/mutation.sh                   # list the modules and their tests
    scripts/mutation.sh collectors/spans.py [--survivors] [--max-children 1]
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


def main(argv=None) -> int:
    cfg = settings()
    tests_by_module: dict[str, list[str]] = cfg["tests"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", help="a key of [tool.mythos-probe.mutation.tests], "
                        "e.g. collectors/spans.py or mythos_probe/metrics/")
    parser.add_argument("--survivors", action="store_true",
                        help="re-test only the mutants the last run did not kill (after adding tests), and "
                        "the new mutants of functions changed since")
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
    where = stage(key, tests_by_module[key], cfg)
    prefix = dotted(key)
    if args.survivors:
        # "no tests" too: a test added since may now reach the function
        left = sorted(n for n, s in statuses_of(key).items() if s not in ("killed", "timeout"))
        if not left:
            print("no survivors to re-test")
            return 0
        names = left
    else:
        # named mutants are re-tested even when an earlier run has a verdict: the tests change
        names = [prefix + ".*"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    rc = subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *names],
                        cwd=where, env=env).returncode
    # Functions edited since the last run get fresh, unchecked mutants when mutmut regenerates
    # them, which a --survivors run does not name: test those too.
    unchecked = sorted(n for n, s in statuses_of(key).items() if s == "not checked")
    if rc == 0 and unchecked:
        rc = subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *unchecked],
                            cwd=where, env=env).returncode
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation_scores.py"), key])
    return rc


if __name__ == "__main__":
    sys.exit(main())
