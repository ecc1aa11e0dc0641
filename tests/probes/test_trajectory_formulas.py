"""mythos_probe/metrics/trajectory.py called directly on small hand-built tensors: the Gram matrix
and its rounding floor against numpy in float64, the principal paths against an SVD of the
centred states, and `settled` against the rule written out by hand, on inputs where a boundary
decides (an eigenvalue exactly at the floor, a step exactly at the tolerance, positions that differ
along the batch, a trajectory shorter than the directions kept, a position that never moved).

Fast, no model. tests/probes/test_trajectory.py checks the same quantities as the probe reports
them from a forward; these are the tests `scripts/mutation.sh mythos_probe/metrics/` runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mythos_probe.metrics import trajectory

RNG = np.random.default_rng(11)


def test_constants_are_pinned():
    assert trajectory.COMPONENTS == 3 and trajectory.FIXED_POINT_TOL == 1e-3


@pytest.mark.parametrize("dtype, unit", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)])
def test_gram_and_floor_equal_numpy_in_float64(dtype, unit):
    # (I, B, T, D) with a large common offset per position: centring must come before the products
    states = RNG.normal(size=(4, 2, 3, 5)) + RNG.normal(size=(1, 2, 3, 5)) * 100
    states = states.astype(np.float32)
    gram, floor = trajectory.centred_gram(torch.from_numpy(states), dtype)
    assert gram.dtype == torch.float64 and gram.shape == (2, 3, 4, 4)
    assert floor.dtype == torch.float64 and floor.shape == (2, 3)
    x = states.astype(np.float64)
    centred = x - x.mean(axis=0)
    want = np.einsum("ibtd,jbtd->btij", centred, centred)
    np.testing.assert_allclose(gram.numpy(), want, rtol=1e-4, atol=1e-4)  # centred in float32
    # the floor: (4 u)² ‖X‖_F², the uncentred states' float32 squares summed in float64
    energy = (states**2).astype(np.float64).sum(axis=(0, -1))
    np.testing.assert_allclose(floor.numpy(), (4 * unit) ** 2 * energy, rtol=1e-12)


def paths_of(x):
    """Hand reference: an SVD of each position's centred (I, D) states, oriented end ≥ start."""
    I, B, T, _ = x.shape
    proj = np.zeros((3, I, B, T))
    share = np.zeros((3, B, T))
    for b in range(B):
        for p in range(T):
            c = x[:, b, p] - x[:, b, p].mean(0)
            u, s, _ = np.linalg.svd(c, full_matrices=False)
            m = min(3, len(s))
            for j in range(m):
                path = u[:, j] * s[j]
                proj[j, :, b, p] = path if path[-1] >= path[0] else -path
                share[j, b, p] = s[j] ** 2 / (s**2).sum()
    return proj, share


def test_principal_paths_equal_an_svd_of_the_centred_states():
    x = RNG.normal(size=(6, 2, 2, 4))
    gram, floor = trajectory.centred_gram(torch.from_numpy(x.astype(np.float32)))
    proj, share = trajectory.principal_paths(gram, floor)
    want_proj, want_share = paths_of(x.astype(np.float32).astype(np.float64))
    assert proj.shape == (3, 6, 2, 2) and proj.dtype == torch.float32
    np.testing.assert_allclose(share.numpy(), want_share, rtol=1e-4)
    np.testing.assert_allclose(proj.numpy(), want_proj, rtol=1e-4, atol=1e-5)
    assert (proj[:, -1] >= proj[:, 0]).all()  # every path ends at or above where it starts


def test_principal_paths_read_the_symmetric_part_of_the_gram_matrix():
    """eigh reads one triangle only; an asymmetric input (rounding) is made symmetric first, so
    G + A with A antisymmetric reads as G."""
    x = RNG.normal(size=(4, 1, 1, 3))
    gram, floor = trajectory.centred_gram(torch.from_numpy(x.astype(np.float32)))
    skew = torch.from_numpy(RNG.normal(size=(1, 1, 4, 4)))
    skew = skew - skew.transpose(-1, -2)
    got = trajectory.principal_paths(gram + skew, floor)
    want = trajectory.principal_paths(gram, floor)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_direction_exactly_at_the_floor_is_rounding():
    """Eigenvalues 4, 1 and exactly the floor (0.25): the third direction reads 0 (share and path),
    the shares of the others are over the two kept (4/5, 1/5); just above the floor it is kept."""
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))[None, None]
    proj, share = trajectory.principal_paths(gram, torch.tensor([[0.25]], dtype=torch.float64))
    assert share[:, 0, 0].tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert proj[2].abs().max().item() == 0.0 and proj[0].abs().max().item() == pytest.approx(2.0)
    _, above = trajectory.principal_paths(gram, torch.tensor([[0.25 - 1e-9]], dtype=torch.float64))
    assert above[:, 0, 0].tolist() == pytest.approx([4 / 5.25, 1 / 5.25, 0.25 / 5.25])


def test_a_trajectory_shorter_than_the_directions_kept_pads_with_zero_or_nan():
    """Two iterations hold one direction: the other two read share 0 (NaN where the position never
    moved: no variance to explain) and path 0."""
    x = np.zeros((2, 1, 2, 3), dtype=np.float32)
    x[1, 0, 0] = [3.0, 4.0, 0.0]  # position 0 moves by 5; position 1 never moves
    gram, floor = trajectory.centred_gram(torch.from_numpy(x))
    proj, share = trajectory.principal_paths(gram, floor)
    assert proj.shape == (3, 2, 1, 2) and share.shape == (3, 1, 2)
    assert share[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert np.isnan(share[:, 0, 1].numpy()).all()
    np.testing.assert_allclose(proj[0, :, 0, 0].numpy(), [-2.5, 2.5], rtol=1e-6)  # end ≥ start
    assert proj[1:].abs().max().item() == 0.0 and proj[:, :, 0, 1].abs().max().item() == 0.0


def settled_by_hand(steps, tol):
    I = steps.shape[0]
    out = np.zeros_like(steps)
    for idx in np.ndindex(steps.shape[1:]):
        s = steps[(slice(None), *idx)]
        for t in range(I):
            later = s[t + 1:] if t < I - 1 else s[I - 1:]
            out[(t, *idx)] = float(all(v <= tol for v in later))  # NaN is never still
    return out


def test_settled_equals_the_rule_by_hand_position_by_position():
    """Steps at, just above and below the tolerance and NaN, different along batch and sequence."""
    tol = trajectory.FIXED_POINT_TOL
    choices = np.array([tol, tol * 1.5, tol / 2, 0.5, np.nan])
    steps = choices[RNG.integers(0, len(choices), size=(5, 3, 4))]
    steps[2:, 0, 0] = tol  # exactly at the tolerance: still
    steps[:, 1, 1] = [np.nan, 0.3, 0.2, tol, tol]
    got = trajectory.settled(torch.from_numpy(steps))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), settled_by_hand(steps, tol))
    assert got[:, 0, 0].tolist()[1:] == [1.0, 1.0, 1.0, 1.0] and got[:, 1, 1].tolist() == [0, 0, 1, 1, 1]
    assert len({tuple(got[:, b, p].tolist()) for b in range(3) for p in range(4)}) > 3  # positions differ
    loose = trajectory.settled(torch.from_numpy(steps), tol=0.4)
    np.testing.assert_array_equal(loose.numpy(), settled_by_hand(steps, 0.4))
