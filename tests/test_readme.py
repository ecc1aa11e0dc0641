"""The README's snippets run as written, and where an option is missing the tool says which
(issue 23): the notebook snippet (lens plots included), `presets.find`, the positions frame at
summary detail, and the Parquet query line, which needs only what the installs bring."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mythos_probe
from mythos_probe import presets
from mythos_probe.model import LoopedConfig, LoopedTransformer

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_notebook_snippet_runs_and_its_plots_and_frames_are_not_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(python_block("## In a notebook"), scope)
    rec = scope["rec"]
    assert (tmp_path / "runs.duckdb").exists()
    trace = rec.traces[0]
    positions = rec.frame("positions")
    assert len(positions) == trace.batch * trace.seq_len * trace.iterations
    for figure in (rec.plot.coda_lens(), rec.plot.whatif(), rec.plot.convergence_heatmap()):
        assert any(getattr(t, "x", None) is not None and len(t.x) for t in figure.data), figure.layout.title
    assert {"lens_kl_final", "lens_top1_agree"} <= set(trace.iteration_metrics)


@pytest.fixture(scope="module")
def summary_rec():
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with mythos_probe.attach(model, detail="summary") as rec:
        model(torch.randint(0, 256, (2, 8)), n_loops=3)
    return model, rec


def test_positions_frame_at_summary_detail_raises_naming_the_option(summary_rec):
    _, rec = summary_rec
    with pytest.raises(ValueError, match=r"detail='positions'"):
        rec.frame("positions")


def test_lens_plots_without_the_lens_probe_name_it(summary_rec):
    _, rec = summary_rec
    with pytest.raises(ValueError, match=r"probes=\[\*DEFAULT_PROBES, 'lens'\]"):
        rec.plot.coda_lens()
    with pytest.raises(ValueError, match="'lens'"):
        rec.plot.whatif()


def test_presets_find_on_our_own_model_says_it_needs_no_spec(summary_rec):
    model, _ = summary_rec
    with pytest.raises(ValueError, match="needs no spec"):
        presets.find(model)
    assert presets.find(torch.nn.Linear(2, 2)) is None


def test_the_parquet_reading_snippet_runs_on_a_recorded_folder(tmp_path, summary_rec):
    """The README's way for other engines to read a store folder (its committed files, not a glob)
    runs as written, with DuckDB; the Spark line is the interop test's."""
    _, rec = summary_rec
    rec.to_parquet(str(tmp_path / "runs"))
    block = README.split("Other engines read the committed files", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "duckdb -c" not in README
    code = "\n".join(l for l in block.strip().splitlines() if not l.startswith("spark."))
    code = "import duckdb\n" + code.replace("/shared/runs", str(tmp_path / "runs")).replace(
        'runs=["run-7"]', f"runs=[{rec.traces[0].run_id!r}]").replace("duckdb.sql(", "print(duckdb.sql(").rstrip() + ")"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    mean = sum(t.iterations for t in rec.traces) / len(rec.traces)  # one rank: one row, this mean
    assert "avg(iterations)" in run.stdout and f" {mean:.1f} " in run.stdout, run.stdout