"""Dashboard browser benchmark: click → drawn in real headless Chromium, per view. Not a test.

Builds (once, then reuses) the 10,000-forward store of `bench_dashboard.py` (plus one stored
loop sweep for the Loop sweep page), starts
`mythos-probe dashboard` on it as its own process, and drives Chromium through every page (a
click on the navigation link) and the main interactions (forward kind, grouping, spectral over
time, the what-if criterion switch, sorting the forwards grid). A view counts as drawn when no
Dash callback is pending, every chart on the page holds a figure newer than the click, grids show
rows, and the browser has painted twice after that: what a user waits for, not server time.
With `--baseline DIR`, the same page visits run interleaved against another checkout's dashboard
(e.g. /work/main) on the same store, so that the ratio survives a loaded machine.

Prints one line per view and the dashboard process's peak resident memory (VmHWM).
Targets: every view under 1.5 s, the process under 500 MiB.

Run from the repository root:
  .venv/bin/python -m benchmarks.bench_dashboard_browser [--store PATH] [--repeats N] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_dashboard import build

# Resolves with ms from the click to the second paint after the view is complete.
_MEASURE = """
const [clickSelector, changedSelector, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const graphs = () => [...document.querySelectorAll('#app-page .js-plotly-plot')];
const before = new Map(graphs().map(g => [g, g.data]));
const firstRow = () => { const r = document.querySelector(changedSelector || '#none'); return r ? r.innerText : null; };
const rowBefore = firstRow();
const target = document.querySelector(clickSelector);
if (!target) { done(-1); return; }
const t0 = performance.now();
target.dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));
target.click();
let sawWork = false;
function ready() {
  if (performance.now() - t0 > 60000) return done(-2);
  const loading = document.querySelector('[data-dash-is-loading="true"]');
  const changed = !changedSelector || (firstRow() !== null && firstRow() !== rowBefore);
  sawWork = sawWork || !!loading || graphs().some(g => before.get(g) !== g.data) || (changedSelector && changed);
  const gs = graphs();
  // an empty dcc.Graph has a blank plot already: a view's figure always carries a title
  const fresh = gs.length > 0 && gs.every(g => g._fullLayout && g.layout && g.layout.title && g.layout.title.text
                                             && before.get(g) !== g.data);
  const rowsOk = [...document.querySelectorAll('#app-page .ag-root')].every(
    r => r.querySelector('.ag-row') || r.querySelector('.ag-overlay-no-rows-center'));
  // a page of tables only (runs & forwards) is drawn once a table shows rows (a grid's, or an
  // HTML table's for a baseline without grids)
  const content = fresh || (gs.length === 0 && !!document.querySelector('#app-page .ag-row, #app-page tbody tr'));
  if (!loading && sawWork && content && rowsOk && changed) {
    requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));
  } else {
    requestAnimationFrame(ready);
  }
}
requestAnimationFrame(ready);
"""


# Resolves with ms from the start of navigation (a typed URL or a shared link) to the page drawn.
_LOADED = """
const done = arguments[arguments.length - 1];
function ready() {
  if (performance.now() > 60000) return done(-2);
  const gs = [...document.querySelectorAll('#app-page .js-plotly-plot')];
  const drawn = gs.length > 0 ? gs.every(g => g.layout && g.layout.title && g.layout.title.text)
                              : !!document.querySelector('#app-page .ag-row, #app-page tbody tr');
  if (drawn && !document.querySelector('[data-dash-is-loading="true"]')) {
    requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now())));
  } else {
    requestAnimationFrame(ready);
  }
}
ready();
"""


def full_load(driver, url: str) -> float:
    driver.get("about:blank")
    driver.get(url)
    ms = driver.execute_async_script(_LOADED)
    if ms < 0:
        raise RuntimeError(f"{url} never drawn in 60 s")
    return ms / 1000


LOADS = [("Spectral (link opened, over time)", "/spectral?x=time"), ("Runs & forwards (link opened)", "/")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(python: str, cwd: str, store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "mythos_probe.cli", "dashboard", str(store.resolve()), "--port", str(port)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()  # "… http://127.0.0.1:PORT/ …" once it listens
    return proc, f"http://127.0.0.1:{port}"


def _status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def peak_rss_mib(pid: int) -> float:
    return _status(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    return _status(pid, "VmRSS")


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mythos-bench-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1440,1100", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(90)
    return driver, profile


def settle(driver, url: str, selector: str = "#app-page .js-plotly-plot, #app-page .ag-root, #app-page tbody tr") -> None:
    """Open `url` and wait for the page to finish its own callbacks."""
    driver.get(url)
    deadline = time.time() + 90
    while time.time() < deadline:
        if driver.execute_script(
            "return !!document.querySelector(arguments[0]) && !document.querySelector('[data-dash-is-loading=\"true\"]')",
            selector,
        ):
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} never settled")


def measure(driver, start_url: str, click: str, changed: str | None = None) -> float:
    settle(driver, start_url)
    ms = driver.execute_async_script(_MEASURE, click, changed)
    if ms < 0:
        raise RuntimeError(f"{click} on {start_url}: {'nothing to click' if ms == -1 else 'never drawn in 60 s'}")
    return ms / 1000


def nav(page: str) -> str:
    return f"#app-nav-{page}"


# (view, start path, what to click, row whose text must change). Navigation starts from the
# forward page: a light page, so that what is timed is the destination.
PAGE_VIEWS = [
    ("Runs & forwards (page)", "/forward", nav("forwards"), None),
    ("Convergence across forwards (page)", "/forward", nav("convergence"), None),
    ("Loop distribution (page)", "/forward", nav("loops"), None),
    ("Halting (page)", "/forward", nav("halting"), None),
    ("Spectral (page, over step)", "/forward", nav("spectral"), None),
    ("Experts (page)", "/forward", nav("experts"), None),
    ("Cost (page)", "/forward", nav("cost"), None),
    ("Coda lens & what-if (page)", "/forward", nav("lens"), None),
    ("Forward detail (page)", "/loops", nav("forward"), None),
    ("Depth profile (page)", "/forward", nav("depth"), None),
    ("Loop sweep (page)", "/forward", nav("sweep"), None),
    ("Compare two runs (page)", "/forward", nav("compare"), None),
]
_RADIO = "[id='{{\"key\":\"x\",\"type\":\"ctl\"}}'] input[value='{}']"
INTERACTIONS = [
    ("Spectral over time", "/spectral", _RADIO.format("time"), None),
    ("Spectral over time, grouped by run", "/spectral?group=run", _RADIO.format("time"), None),
    ("Spectral back to step", "/spectral?x=time", _RADIO.format("step"), None),
    ("Forwards grid: sort by start", "/", "#forwards-list .ag-header-cell[col-id='start_time'] .ag-header-cell-label",
     "#forwards-list .ag-row[row-index='0']"),
]


def link_interactions(driver, base: str, k: int, only: str = "") -> list[tuple[str, float]]:
    """Interactions that are a URL change (what a control writes): the what-if criterion switch
    (cached replay after the first), forward kind and grouping, timed like a click."""
    out = []
    for name, start, query in (
        ("What-if criterion switch", "/lens", "?criterion=rel_residual"),
        # a range never asked before in this run (k counts the repeats), then the same again
        ("What-if threshold range (new replay)", "/lens", f"?tmin={0.0001 * (k + 1):g}&tmax=1"),
        ("What-if same range again (cached)", "/lens", f"?tmin={0.0001 * (k + 1):g}&tmax=1"),
        ("Forward kind → every kind (loops)", "/loops", "?kind=all"),
        ("Group by endpoint (halting)", "/halting", "?group=attr%3Aendpoint"),
        ("Exit steps split by endpoint (loops)", "/loops", "?group=attr%3Aendpoint"),
        ("Depth profile split by endpoint", "/depth", "?group=attr%3Aendpoint"),
        ("Compare: other runs as A and B", "/compare", "?a=run-0&b=run-1"),
    ):
        if only not in name:
            continue
        settle(driver, base + start)
        # A link inside the app, as the sync callback would push: same path, new query.
        driver.execute_script(
            "const a = document.createElement('a'); a.id = 'bench-link'; a.href = arguments[0];"
            "a.onclick = (e) => { e.preventDefault(); history.pushState({}, '', arguments[0]);"
            " window.dispatchEvent(new CustomEvent('_dashprivate_pushstate')); };"
            "document.body.appendChild(a);", urljoin(start, query))
        ms = driver.execute_async_script(_MEASURE, "#bench-link", None)
        if ms < 0:
            raise RuntimeError(f"{name}: never drawn")
        out.append((name, ms / 1000))
    return out


def urljoin(path: str, query: str) -> str:
    return path.split("?")[0] + query


SWEEP_LOOPS = range(1, 17)


def ensure_sweep(path: Path) -> None:
    """One stored loop sweep (16 loop counts of 4 × 256 positions, as `mythos_probe.sweep` stores
    them) for the Loop sweep page, added to the store once."""
    import numpy as np

    from mythos_probe.collectors.store import Store
    from tests.dashboards.test_issue25_views import sweep_traces

    with Store(path) as store:
        if not store.query("SELECT 1 FROM forwards WHERE json_extract_string(attributes, '$.sweep') IS NOT NULL LIMIT 1").empty:
            return
        rng = np.random.default_rng(16)
        deepest = rng.integers(0, 256, size=(4, 256))
        preds = {n: np.where(rng.random(deepest.shape) < 0.5 ** n + 0.02 * (n > 12), deepest + 1, deepest) for n in SWEEP_LOOPS}
        newest = int(store.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0])
        store.write_traces(sweep_traces(rng, "bench-sweep", preds, newest + 1, targets=preds[12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--store", type=Path, default=Path("artifacts/bench_dashboard.duckdb"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout (with its .venv) to time interleaved on the same store")
    parser.add_argument("--baseline-store", type=Path, help="the baseline's copy of the store (an older checkout refuses a"
                        " store migrated by this one)")
    parser.add_argument("--only", default="", help="time only the views whose name contains this (e.g. What-if)")
    args = parser.parse_args()
    if not args.store.exists():
        args.store.parent.mkdir(parents=True, exist_ok=True)
        build(args.store, args.forwards)
    ensure_sweep(args.store)
    proc, base = start_dashboard(sys.executable, os.getcwd(), args.store)
    other = None
    if args.baseline:
        other = start_dashboard(str(Path(args.baseline) / ".venv/bin/python"), args.baseline, args.baseline_store or args.store)
    driver, profile = chromium()
    try:
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (others share this machine)")
        rows: list[tuple[str, list[float], list[float]]] = []
        for name, start, click, changed in PAGE_VIEWS + INTERACTIONS:
            if args.only not in name:
                continue
            mine, theirs = [], []
            for _ in range(args.repeats):
                mine.append(measure(driver, base + start, click, changed))
                if other and (name, start, click, changed) in PAGE_VIEWS:
                    try:
                        theirs.append(measure(driver, other[1] + start, click, changed))
                    except RuntimeError as exc:  # a page the baseline does not have
                        print(f"  baseline: {exc}")
            rows.append((name, mine, theirs))
            print(f"  {name}: {', '.join(f'{t:.2f}' for t in mine)} s; dashboard RSS {rss_mib(proc.pid):.0f} MiB", flush=True)
        for name, path in LOADS:
            if args.only not in name:
                continue
            mine = [full_load(driver, base + path) for _ in range(args.repeats)]
            # the baseline only where a link means the same view there (an older one may ignore the query)
            same = other and "?" not in path
            rows.append((name, mine, [full_load(driver, other[1] + path) for _ in range(args.repeats)] if same else []))
            print(f"  {name}: {', '.join(f'{t:.2f}' for t in mine)} s", flush=True)
        for k in range(args.repeats):  # the baseline's interleaved, each asked the same new range
            theirs = dict(link_interactions(driver, other[1], k, args.only)) if other else {}
            for name, seconds in link_interactions(driver, base, k, args.only):
                found = next((r for r in rows if r[0] == name), None)
                if found is None:
                    found = (name, [], [])
                    rows.append(found)
                found[1].append(seconds)
                if name in theirs:
                    found[2].append(theirs[name])
        head = f"{'view (click → drawn, median of ' + str(args.repeats) + ')':<44}{'this':>9}"
        print(head + (f"{'baseline':>10}{'ratio':>8}" if other else ""))
        for name, mine, theirs in rows:
            line = f"{name:<44}{statistics.median(mine):>8.2f}s"
            if theirs:
                line += f"{statistics.median(theirs):>9.2f}s{statistics.median(mine) / statistics.median(theirs):>8.2f}"
            print(line)
        print(f"dashboard peak RSS: {peak_rss_mib(proc.pid):.0f} MiB" +
              (f" (baseline: {peak_rss_mib(other[0].pid):.0f} MiB)" if other else ""))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for p in (proc, other[0] if other else None):
            if p is not None:
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
