"""Probes add no host synchronisation inside the forward.

No GPU runs in CI, so the check is made where syncs originate: every read of a device value by
the host goes through an aten op that produces a Python scalar or a data-dependent shape
(`_local_scalar_dense` behind .item()/bool()/int(), `nonzero`, `unique`, ...). A dispatch mode
records them during a forward with and without probes; the probes must add none. The one
device-to-host copy per forward happens after the forward, when traces are read."""

import torch

import mythos_probe
from mythos_probe.probes.reductions import PROBES
from mythos_probe.model import LoopedConfig, LoopedTransformer
from tests.conftest import SyncCounter


def count_syncs(model, ids, **attach_kwargs):
    with torch.no_grad():
        with mythos_probe.attach(model, **attach_kwargs) as rec:
            with SyncCounter() as counter:
                model(ids, n_loops=4)
        assert rec.traces  # the transfer happens here, outside the counted forward
        return counter.syncs


def test_probes_add_no_host_sync_inside_the_forward():
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig.variant("tiny-mla")).eval()
    # A probed forward runs the masked loop (hooks need full-shape tensors), an unprobed one may
    # compact exited rows, which syncs to decide: compare like with like, the masked loop.
    model.recurrent.compact_below = 0
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), SyncCounter() as plain:
        model(ids, n_loops=4)
    assert plain.syncs  # the model itself syncs (MoE expert counts, ACT early break): the counter sees them
    probes = [p for p in PROBES if p != "jacobian"]  # opt-in and documented to re-run the step
    for detail in ("summary", "positions"):
        chosen = [p for p in probes if detail == "positions" or p != "trajectory"]  # trajectory: positions only
        assert count_syncs(model, ids, probes=chosen, detail=detail) == plain.syncs
