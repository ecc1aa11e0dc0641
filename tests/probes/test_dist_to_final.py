"""dist_to_final keeps a bfloat16 copy of a position sample instead of every state; it must stay
within the bound its description states, ‖h_t‖/‖h_T‖ · 2⁻⁸ (per position, so also for the mean),
against the exact value from every cached state, over a long loop."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.records import ITERATION_METRICS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with torch.no_grad():
        m.recurrent.injection.log_A.normal_(0, 1)  # a trajectory that moves, then settles
    return m


def test_dist_to_final_is_within_its_stated_bound_over_64_loops(model):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    sample = [0, 13, 26, 39]  # 1 in 16 of 40 positions is 3: the floor of 4, evenly spaced
    with torch.no_grad():
        with mythos_probe.attach(model, probes=["convergence"]) as rec:
            model(ids, n_loops=64, exit="fixed")
        _, cache = model.run_with_cache(ids, n_loops=64, exit="fixed", names_filter="recurrent.hook_state_out")
    h = cache.stack("recurrent.hook_state_out").double().numpy()[:, :, sample]  # (I, B, P, D)
    norm_final = np.linalg.norm(h[-1], axis=-1)
    exact = (np.linalg.norm(h - h[-1], axis=-1) / norm_final).mean((1, 2))
    bound = 2.0**-8 * (np.linalg.norm(h, axis=-1) / norm_final).mean((1, 2))
    got = rec.traces[0].iteration_metrics["dist_to_final"]
    assert got.shape == (64,) and got[-1] == 0
    assert (np.abs(got - exact) <= bound + 1e-6).all()
    assert exact[0] > 10 * bound[0]  # the bound is tight enough to say something


def test_the_bound_is_stated_in_the_metric_description():
    description = next(m.description for m in ITERATION_METRICS if m.name == "dist_to_final")
    assert "2⁻⁸" in description and "bfloat16" in description
