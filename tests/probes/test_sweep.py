"""`sweep`: accuracy and agreement against the loop count, each row equal to a hand computation
from separate fixed-depth forwards, with a target set where the best depth is not the deepest."""

import pytest
import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer


def test_sweep_rows_equal_fixed_depth_forwards():
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        preds = {n: model(ids, n_loops=n, exit="fixed").argmax(-1) for n in (1, 2, 3, 5)}
    targets = preds[2].clone()  # depth 2 is right everywhere it is kept: extra loops can only hurt
    targets[0, :3] = -100
    frame = mythos_probe.sweep(model, ids, loops=[5, 1, 3, 2], targets=targets)
    assert frame["loops"].tolist() == [1, 2, 3, 5]
    keep = targets != -100
    for _, row in frame.iterrows():
        n = int(row["loops"])
        assert row["positions"] == int(keep.sum()) == 21
        assert row["correct"] == int((preds[n] == targets)[keep].sum())
        assert row["agreement"] == pytest.approx(float((preds[n] == preds[5])[keep].float().mean()))
    assert frame.loc[frame["loops"] == 2, "accuracy"].item() == 1.0
    assert frame.loc[frame["loops"] == 5, "agreement"].item() == 1.0
    assert frame["best"].tolist()[1] and frame["accuracy"].max() == 1.0
    with pytest.raises(ValueError, match="positive loop counts"):
        mythos_probe.sweep(model, ids, loops=[0, 1])


def test_stored_sweep_reads_back_the_same_curve_from_the_store(tmp_path):
    """`sweep(..., on_trace=...)` records one shadow forward per loop count with its sweep tags;
    the dashboard's SQL over a real store gives back the sweep's own agreement and accuracy."""
    from mythos_probe.collectors.store import Store
    from mythos_probe.dashboards import queries
    from mythos_probe.dashboards.queries import Selection

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(ids, n_loops=2, exit="fixed").argmax(-1)
    recorded = []
    frame = mythos_probe.sweep(model, ids, loops=[1, 2, 3, 5], targets=targets, on_trace=[recorded.append],
                               sweep_id="tiny", attributes={"task": "random"})
    assert [t.attributes["sweep_loops"] for t in recorded] == [1, 2, 3, 5]
    assert {t.kind for t in recorded} == {"shadow"} and {t.attributes["task"] for t in recorded} == {"random"}
    assert [t.attributes["sweep_correct"] for t in recorded] == frame["correct"].tolist()
    with Store(tmp_path / "sweep.duckdb") as store:
        store.write_traces(recorded)
        stored = queries.sweep_curves(store, Selection()).set_index("loops")
    assert stored.index.tolist() == [1, 2, 3, 5] and set(stored["sweep"]) == {"tiny"}
    assert stored["agreement"].tolist() == pytest.approx(frame["agreement"].tolist())
    assert stored["accuracy"].tolist() == pytest.approx(frame["accuracy"].tolist())
    assert stored["best"].tolist() == frame["best"].tolist()
    assert (stored["positions"] == ids.numel()).all()


def test_stored_sweep_refuses_an_output_the_lens_does_not_give():
    """With ACT the output mixes iterations: the lens argmax at the last iteration is not the
    prediction, so a stored agreement would be wrong; the sweep says so instead of recording."""
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="exit='fixed'"):
        mythos_probe.sweep(model, ids, loops=[2, 4], on_trace=[lambda t: None], exit="act")
