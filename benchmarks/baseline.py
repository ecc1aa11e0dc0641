"""Run a benchmark function against another revision of the project, in a fresh interpreter.

A speed-up is measured against the code it replaces, on the same machine at the same time:
`checkout(rev)` extracts revision `rev` of this repository (`git archive`, no worktree and no
change to the repository) into a temporary folder, and `call(tree, "module:function", *args)` runs
`function(*args)` in a subprocess whose `mythos_probe` is imported from that folder (None: from
this checkout), as are the processes it starts, returning what it returned (JSON). The benchmark modules and `tests` factories
come from this checkout either way, so both sides run the same measuring code. Benchmarks call
both sides alternately, round after round, so that a load spike on the shared machine hits both.

Not a test; this module is not a benchmark by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The package layout of pyproject's `package-dir`: import name → folder of the checkout.
PACKAGE_DIRS = {"mythos_probe": "mythos_probe", "mythos_probe.model": "model",
                "mythos_probe.collectors": "collectors", "mythos_probe.dashboards": "dashboards"}

_RUNNER = r"""
import importlib, json, sys
target, args = sys.argv[1], json.loads(sys.argv[2])
import mythos_probe.collectors
module, function = target.split(":")
result = getattr(importlib.import_module(module), function)(*args)
print("RESULT " + json.dumps({"result": result, "from": mythos_probe.collectors.__file__}))
"""


def _site(tree: Path) -> Path:
    """A folder to put first on PYTHONPATH so that `mythos_probe` and its subpackages import from
    `tree`: a link to the tree's mythos_probe/, inside which each subpackage of pyproject's
    `package-dir` is linked to its root folder. PYTHONPATH, unlike an import hook, reaches every
    process the benchmark starts: the receiver's decode workers come from a forkserver, a fresh
    interpreter, and with a hook in the parent only they imported this checkout's decoder."""
    site = tree / ".baseline-site"
    if not site.exists():
        site.mkdir()
        (site / "mythos_probe").symlink_to(tree / "mythos_probe", target_is_directory=True)
        for name, folder in PACKAGE_DIRS.items():
            if name != "mythos_probe" and not (tree / "mythos_probe" / name.split(".")[-1]).exists():
                (tree / "mythos_probe" / name.split(".")[-1]).symlink_to(tree / folder, target_is_directory=True)
    return site


def checkout(rev: str, into: Path | None = None) -> Path:
    """Revision `rev` of this repository's files in a new temporary folder (or `into`)."""
    into = Path(into or tempfile.mkdtemp(prefix=f"mythos-probe-{rev[:12]}-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def call(tree: Path | None, target: str, *args):
    """`target` ("module:function") called with `args` in a fresh interpreter whose `mythos_probe`
    comes from `tree` (None: this checkout); its JSON result."""
    paths = [str(_site(tree))] if tree else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # -P: the working directory (this checkout, where `mythos_probe/` lies) is not put first on sys.path
    out = subprocess.run([sys.executable, "-P", "-c", _RUNNER, target, json.dumps(args)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{target} on {tree or 'this checkout'} failed:\n{out.stderr[-4000:]}")
    answer = json.loads(next(line for line in out.stdout.splitlines()[::-1] if line.startswith("RESULT "))[7:])
    expected = str(Path(tree or ROOT).resolve())
    if not answer["from"].startswith(expected):  # never measure one side twice by mistake
        raise RuntimeError(f"{target} imported mythos_probe from {answer['from']}, not from {expected}")
    return answer["result"]
