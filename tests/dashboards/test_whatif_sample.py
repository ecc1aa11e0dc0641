"""The what-if over a sample of forwards (`whatif.evaluate(sample=m)`, what the lens page replays
at a million forwards): its estimates are the full replay of the sampled forwards, its 95 %
intervals are the cluster-sample intervals worked out here in numpy, they cover the full
replay's figures, and the page says it is a sample and how large its error is."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mythos_probe import whatif as replay
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import whatif
from mythos_probe.dashboards.pages import lens
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.test_whatif_sql import lens_trace

FORWARDS, SAMPLE, MODELS = 240, 20, 6
T_19 = 2.093024  # Student's t, 97.5 % quantile, 19 degrees of freedom (from the tables)
TH = {"kl": [1e-3, 0.02, 0.3], "rel_residual": [0.05, 0.2, 0.5], "argmax_stable": [1, 2, 3]}


@pytest.fixture(scope="module")
def traces():
    # depths 3 to 8: forwards differ in budget, so a ratio of sums is not a mean of ratios
    return [lens_trace(seed, iterations=3 + seed % 5, model_id=f"m{seed % MODELS}") for seed in range(FORWARDS)]


@pytest.fixture(scope="module")
def store(traces, tmp_path_factory):
    with Store(tmp_path_factory.mktemp("sample") / "s.duckdb") as s:
        s.write_traces(traces)
        yield s


def _sampled_ids(store) -> list[str]:
    return store.query("SELECT trace_id FROM forwards ORDER BY hash(forward_id), forward_id LIMIT ?", [SAMPLE])["trace_id"].tolist()


def test_the_estimate_is_the_full_replay_of_the_sampled_forwards(store, traces):
    got = whatif.evaluate(store, Selection(), TH, sample=SAMPLE)
    assert (got["forwards_replayed"] == SAMPLE).all() and (got["forwards_selected"] == FORWARDS).all()
    picked = set(_sampled_ids(store))
    want = replay.evaluate([t for t in traces if t.trace_id in picked], TH)
    pd.testing.assert_frame_equal(got[replay.COLUMNS], want.astype({"positions": "int64"}), check_exact=False, rtol=1e-12)
    # and a different answer from the full replay: the sample is a sample
    full = whatif.evaluate(store, Selection(), TH)
    assert not np.allclose(got["agreement"], full["agreement"])


def test_the_intervals_are_the_cluster_sample_intervals(store, traces):
    """Per row, the 95 % half-width of a ratio estimate Σy/Σx over m of M forwards drawn without
    replacement: t(m − 1) · sqrt((1 − m/M) / (m (m − 1)) · Σ (y_i − r x_i)²) / mean x, in numpy from
    one replay per sampled forward."""
    got = whatif.evaluate(store, Selection(), TH, sample=SAMPLE).set_index(["criterion", "threshold"])
    picked = set(_sampled_ids(store))
    mine = [t for t in traces if t.trace_id in picked]
    per = [replay.evaluate([t], TH).set_index(["criterion", "threshold"]) for t in mine]
    z = T_19 * np.sqrt((1 - SAMPLE / FORWARDS) / (SAMPLE * (SAMPLE - 1)))
    for key in got.index:
        x = np.array([p.loc[key, "positions"] for p in per], float)
        budget = x * np.array([t.iterations for t in mine])  # every position may run the forward's iterations
        for column, y, base in (("agreement", [p.loc[key, "agreement"] * p.loc[key, "positions"] for p in per], x),
                                ("mean_iterations", [p.loc[key, "mean_iterations"] * p.loc[key, "positions"] for p in per], x),
                                ("iterations_saved", [p.loc[key, "mean_iterations"] * p.loc[key, "positions"] for p in per], budget)):
            y = np.asarray(y)
            r = y.sum() / base.sum()
            half = z * np.sqrt(((y - r * base) ** 2).sum()) / base.mean()
            assert got.loc[key, f"{column}_ci"] == pytest.approx(half, rel=1e-5, abs=1e-12), (key, column)
    assert (got["agreement_ci"] > 0).all()


def test_the_intervals_cover_the_full_replay(store):
    """95 % intervals cover the full replay's figure about 95 % of the time over samples: here
    one sample per model (six draws of 20 of its 40 forwards), every row and figure; at least
    90 % of them covered (rows of one draw share its luck, so not every one need be)."""
    covered = []
    for k in range(MODELS):
        sel = Selection(models=(f"m{k}",))
        got = whatif.evaluate(store, sel, TH, sample=SAMPLE)
        full = whatif.evaluate(store, sel, TH)
        assert (got["forwards_replayed"] == SAMPLE).all() and (got["forwards_selected"] == FORWARDS // MODELS).all()
        for column in ("agreement", "mean_iterations", "iterations_saved"):
            error = (got[column] - full[column]).abs()
            assert (error > 0).any(), column  # estimates, not the full figures
            covered += list(error <= got[f"{column}_ci"])
    assert len(covered) == MODELS * 3 * 9
    assert np.mean(covered) >= 0.9, np.mean(covered)


def test_a_sample_as_large_as_the_selection_is_the_full_replay_with_no_error(store):
    full = whatif.evaluate(store, Selection(), TH)
    got = whatif.evaluate(store, Selection(), TH, sample=FORWARDS)
    pd.testing.assert_frame_equal(got[replay.COLUMNS], full)
    assert (got[["mean_iterations_ci", "iterations_saved_ci", "agreement_ci"]] == 0).all().all()
    with pytest.raises(ValueError, match="at least 2"):
        whatif.evaluate(store, Selection(), TH, sample=1)


def test_the_page_says_it_is_a_sample_and_its_error(store, monkeypatch):
    monkeypatch.setattr(lens, "SAMPLE_FORWARDS", SAMPLE)
    lens._cache.clear()
    out = lens.update(store, dataclasses.replace(Selection(), kinds=()), "", "kl")
    text = str(out[4])
    assert f"sample of {SAMPLE:,} of the {FORWARDS:,} selected full-depth forwards" in text
    assert "agreement ± (95 %)" in text
    monkeypatch.setattr(lens, "SAMPLE_FORWARDS", FORWARDS)
    lens._cache.clear()
    assert "sample of" not in str(lens.update(store, dataclasses.replace(Selection(), kinds=()), "", "kl")[4])
    lens._cache.clear()
