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
