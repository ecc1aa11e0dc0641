"""The lens probe refuses a model output that is not logits over the lens's vocabulary (a model
returning its hidden states, say), with a message naming the fix, rather than failing on a tensor
shape deep in the KL or, worse, comparing unrelated tensors of a shape that happens to fit."""

from __future__ import annotations

import pytest
import torch

from mythos_probe import LoopSpec
from tests.probes.test_spec_adapter_pins import WithHead, error_of, record


class ReturnsHidden(WithHead):
    """WithHead's loop and head, whose forward returns the loop's last state (B, T, 8), not the
    head's (B, T, 32) logits."""

    def __init__(self, output=lambda self, h: h):
        super().__init__()
        self.output = output

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h = self.step(h)
        return self.output(self, h)


SPEC = LoopSpec(step="step", readout="head", readout_is_output=False)  # a partial lens: nothing checks it otherwise


@pytest.mark.parametrize("output, shape", [
    (lambda self, h: h, (2, 5, 8)),  # hidden states
    (lambda self, h: self.head(h)[0], (5, 32)),  # one batch row's logits: the vocabulary fits, the batch does not
    (lambda self, h: self.head(h)[:1], (1, 5, 32)),
    (lambda self, h: torch.cat([self.head(h)] * 2, dim=1), (2, 10, 32)),  # more positions than the input
    (lambda self, h: self.head(h)[:, :0], (2, 0, 32)),  # no position at all
    (lambda self, h: self.head(h)[..., :31], (2, 5, 31)),  # another vocabulary
])
def test_an_output_that_is_not_the_models_logits_is_refused_naming_the_fix(output, shape):
    message = error_of(ReturnsHidden(output), SPEC, probes=["lens"])
    assert message == (
        "mythos_probe: the lens compares each iteration's readout, logits over 32 tokens, with the model's output "
        f"logits (batch 2, at most 5 positions, 32), but the model's output is {shape}. Select its logits among its "
        "outputs (LoopSpec logits=...), or leave 'lens' out of the probes.")


@pytest.mark.parametrize("kept", [2, 1])
def test_the_logits_of_the_last_positions_only_are_still_read(kept):
    """`logits_to_keep` in generate: fewer positions than the input, down to one, is a model's real output."""
    (trace,) = record(ReturnsHidden(lambda self, h: self.head(h)[:, -kept:]), SPEC, probes=["lens"],
                      lens_positions="last")
    kl = trace.iteration_metrics["lens_kl_final"]
    assert len(kl) == 3 and kl[-1] == pytest.approx(0, abs=1e-6) and kl[0] > 1e-4


def test_an_output_holding_no_logits_warns_that_the_lens_has_nothing_to_compare():
    """In full, and at the user's line that ran the model (not inside mythos_probe or torch)."""
    import warnings

    from tests.probes.test_spec_adapter_pins import ids
    from tests.probes.test_spec_adapter_pins2 import line_of

    import mythos_probe

    model = ReturnsHidden(lambda self, h: {"hidden": h})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
            mythos_probe.attach(model, spec=SPEC, probes=["lens", "convergence"]) as rec:
        warnings.simplefilter("always")
        model(ids)
    (warning,) = [w for w in caught if "lens" in str(w.message)]
    assert str(warning.message) == (
        "mythos_probe: the lens ran, but the model's output holds no logits tensor to compare it with, so this "
        "forward has no lens metrics. Select the logits among its outputs (LoopSpec logits=...), or leave 'lens' "
        "out of the probes.")
    assert (warning.filename, warning.lineno) == line_of(
        test_an_output_holding_no_logits_warns_that_the_lens_has_nothing_to_compare, "        model(ids)")
    (trace,) = rec.traces
    assert "lens_kl_final" not in trace.iteration_metrics and "rel_residual" in trace.iteration_metrics
