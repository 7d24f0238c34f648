"""Magnitude and Wanda baselines: exact counts, the right entries, N:M patterns, base masks, errors."""

import pytest
import torch

from sparsegpt.core.errors import UserError
from sparsegpt.prune.baselines import PRUNERS, magnitude_prune, wanda_prune
from sparsegpt.prune.solver import prune_matrix


def problem(rows=8, cols=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, cols, generator=g) * torch.logspace(-1, 1, cols)
    return torch.randn(rows, cols, generator=g), X.T @ X, g


def test_registry_names_the_three_methods():
    assert PRUNERS == {"sparsegpt": prune_matrix, "wanda": wanda_prune, "magnitude": magnitude_prune}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_magnitude_prunes_smallest_over_whole_matrix(sparsity):
    W, H, _ = problem()
    out, mask = magnitude_prune(W, H, sparsity, blocksize=16, percdamp=0.1)
    k = round(sparsity * W.numel())
    assert int(mask.sum()) == k
    expected = torch.zeros(W.numel(), dtype=torch.bool)
    expected[W.abs().flatten().argsort()[:k]] = True
    assert torch.equal(mask.flatten(), expected)
    assert torch.equal(out, W.masked_fill(mask, 0))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_wanda_prunes_lowest_scores_per_row(sparsity):
    W, H, _ = problem()
    out, mask = wanda_prune(W, H, sparsity)
    score = W.double().abs() * H.double().diagonal().sqrt()
    k = round(sparsity * W.shape[1])
    assert (mask.sum(1) == k).all()
    for r in range(W.shape[0]):
        assert set(score[r].argsort()[:k].tolist()) == set(torch.nonzero(mask[r]).flatten().tolist())
    assert torch.equal(out, W.masked_fill(mask, 0))


@pytest.mark.parametrize("prune", [magnitude_prune, wanda_prune])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_exact_and_base_kept(prune, n, m):
    W, H, g = problem()
    base = torch.zeros(8, 24 // m, m, dtype=torch.bool)
    base[..., 0] = torch.rand(8, 24 // m, generator=g) < 0.5
    base = base.reshape(8, 24)
    out, mask = prune(W, H, 0.0, prune_n=n, prune_m=m, base_mask=base)
    assert (mask.reshape(8, -1, m).sum(-1) == n).all()
    assert mask[base].all() and (out[mask] == 0).all()


def test_magnitude_base_forced_in_then_filled_with_smallest():
    W, H, _ = problem()
    base = torch.zeros_like(W, dtype=torch.bool)
    base[:, 0] = True
    W[:, 0] = 100.0  # a plain magnitude score would keep this column
    out, mask = magnitude_prune(W, H, 0.5, base_mask=base)
    assert mask[:, 0].all() and (out[:, 0] == 0).all() and int(mask.sum()) == 96
    rest, rest_mask = W[:, 1:].abs(), mask[:, 1:]
    assert rest[rest_mask].max() < rest[~rest_mask].min()


def test_wanda_base_forced_in_then_each_row_filled_with_lowest():
    W, H, _ = problem()
    base = torch.zeros_like(W, dtype=torch.bool)
    base[:, 0] = True
    W[:, 0] = 100.0
    out, mask = wanda_prune(W, H, 0.5, base_mask=base)
    assert mask[:, 0].all() and (out[:, 0] == 0).all() and (mask.sum(1) == 12).all()
    rest, rest_mask = W[:, 1:].abs() * H.diagonal()[1:].sqrt(), mask[:, 1:]
    for r in range(W.shape[0]):
        assert rest[r][rest_mask[r]].max() < rest[r][~rest_mask[r]].min()


def test_half_precision_weight_keeps_dtype():
    W, H, _ = problem()
    for prune in (magnitude_prune, wanda_prune):
        out, mask = prune(W.half(), H, 0.5)
        assert out.dtype == torch.float16 and (out[mask] == 0).all()


@pytest.mark.parametrize("prune", [magnitude_prune, wanda_prune])
def test_base_mask_denser_than_target_raises(prune):
    W, H, _ = problem()
    base = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.8
    with pytest.raises(UserError, match=r"base mask has 0\.\d+ sparsity > target 0\.5"):
        prune(W, H, 0.5, base_mask=base)


def test_wanda_needs_matching_hessian():
    W, _, _ = problem()
    with pytest.raises(UserError, match=r"wanda needs a \(24, 24\) hessian"):
        wanda_prune(W, torch.eye(5), 0.5)
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_prune(W, None, 1.5)
