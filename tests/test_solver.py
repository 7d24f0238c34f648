"""SparseGPT solver against a plain unblocked float64 OBS reference, plus masks, dtypes, errors and damping."""

import logging
import math

import pytest
import torch

from sparsegpt.core.errors import UserError
from sparsegpt.prune.baselines import magnitude_prune, wanda_prune
from sparsegpt.prune.solver import (
    add_gram_,
    inverse_hessian_factor,
    prune_group_with_factor,
    prune_matrix,
    prune_with_factor,
    reconstruction_error,
)


def reference_obs(W, H, sparsity, *, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01, base_mask=None):
    """Textbook OBS: unstructured masks per block (N:M per group of M) from the current weights, then each column
    updates all later ones at once."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    scale = H.diagonal()[~dead].mean()
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1.0
        W[:, j] = 0.0
    H += percdamp * scale * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    forced = torch.zeros(rows, cols, dtype=torch.bool) if base_mask is None else base_mask.clone()
    forced[:, dead] = True
    if prune_m:
        blocksize = math.ceil(blocksize / prune_m) * prune_m
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not prune_m:  # unstructured: the whole block's mask from the weights at the block start
            score = W[:, i1:i2] ** 2 / U.diagonal()[i1:i2] ** 2
            score[forced[:, i1:i2]] = -math.inf
            k = max(round(sparsity * rows * (i2 - i1)), int(forced[:, i1:i2].sum()))
            block = torch.zeros(rows, i2 - i1, dtype=torch.bool)
            block.view(-1)[torch.argsort(score.flatten())[:k]] = True
            mask[:, i1:i2] = block
        for i in range(i1, i2):
            if prune_m and (i - i1) % prune_m == 0:  # N:M: each group of M from the weights updated so far
                score = W[:, i:i + prune_m] ** 2 / U.diagonal()[i:i + prune_m] ** 2
                score[forced[:, i:i + prune_m]] = -math.inf
                for r in range(rows):
                    k = max(prune_n, int(forced[r, i:i + prune_m].sum()))
                    mask[r, i + torch.argsort(score[r])[:k]] = True
            err = torch.where(mask[:, i], W[:, i], 0.0) / U[i, i]
            W[:, i:] -= torch.outer(err, U[i, i:])
    W[mask] = 0.0
    return W, mask


def make_problem(rows, cols, seed, *, samples=None, dead=()):
    """Random float64 weight and H = X^T X from correlated inputs with unequal column scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = (torch.randn(samples or 4 * cols, cols, generator=g) @ mix) * torch.logspace(-0.5, 0.5, cols)
    X[:, list(dead)] = 0
    return torch.randn(rows, cols, generator=g, dtype=torch.float64), X.double().T @ X.double(), g


def random_base(rows, cols, sparsity, prune_n, prune_m, g):
    """A base mask the target can hold: ~sparsity/2 of entries, or at most one per N:M row group."""
    if prune_m:
        base = torch.zeros(rows, cols // prune_m, prune_m, dtype=torch.bool)
        pick = torch.randint(prune_m, (rows, cols // prune_m), generator=g)
        base.scatter_(2, pick.unsqueeze(-1), torch.rand(rows, cols // prune_m, 1, generator=g) < 0.5)
        return base.reshape(rows, cols)
    return torch.rand(rows, cols, generator=g) < sparsity / 2


def block_counts(mask, blocksize):
    return [int(mask[:, i:i + blocksize].sum()) for i in range(0, mask.shape[1], blocksize)]


PATTERNS = [(0.0, 0, 0), (0.3, 0, 0), (0.5, 0, 0), (0.9, 0, 0), (0.0, 2, 4), (0.0, 4, 8)]


@pytest.mark.parametrize("rows,cols", [(5, 16), (8, 40), (6, 136)])
@pytest.mark.parametrize("blocksize", [1, 16, 128])
@pytest.mark.parametrize("sparsity,prune_n,prune_m", PATTERNS)
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_unblocked_reference(rows, cols, blocksize, sparsity, prune_n, prune_m, with_base):
    W, H, g = make_problem(rows, cols, seed=rows * cols + blocksize)
    base = random_base(rows, cols, sparsity, prune_n, prune_m, g) if with_base else None
    if base is not None:
        W[base] = 0
    kw = dict(prune_n=prune_n, prune_m=prune_m, blocksize=blocksize, base_mask=base)
    out, mask = prune_matrix(W, H, sparsity, dtype=torch.float64, **kw)
    ref, ref_mask = reference_obs(W, H, sparsity, **kw)

    assert mask.dtype == torch.bool and out.dtype == W.dtype and out.shape == W.shape
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9 * ref.abs().max().item())
    assert (out[mask] == 0).all()
    if base is not None:
        assert mask[base].all()
    if prune_m:
        assert (mask.reshape(rows, -1, prune_m).sum(-1) == prune_n).all()
    else:
        target = [round(sparsity * rows * (min(i + blocksize, cols) - i)) for i in range(0, cols, blocksize)]
        in_base = block_counts(base, blocksize) if base is not None else [0] * len(target)
        assert block_counts(mask, blocksize) == [max(t, b) for t, b in zip(target, in_base)]


def test_float32_close_to_float64_reference():
    W, H, _ = make_problem(16, 96, seed=3)
    out, mask = prune_matrix(W.float(), H.float(), 0.6, blocksize=32)
    ref, ref_mask = reference_obs(W, H, 0.6, blocksize=32)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_earlier_blocks_never_revived():
    W, H, _ = make_problem(8, 64, seed=4)
    out, mask = prune_matrix(W, H, 0.7, blocksize=8, percdamp=0.0)
    assert (out[mask] == 0).all()
    assert (out[~mask] != 0).all()  # the lazy update really touched the later columns


def test_dead_columns_zeroed_and_pruned():
    dead = (0, 5, 17)
    W, H, _ = make_problem(6, 24, seed=5, dead=dead)
    out, mask = prune_matrix(W, H, 0.5, blocksize=8, dtype=torch.float64)
    ref, ref_mask = reference_obs(W, H, 0.5, blocksize=8)
    assert mask[:, dead].all() and (out[:, dead] == 0).all()
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9 * ref.abs().max().item())


def test_base_mask_exceeding_a_block_keeps_all_base_entries():
    W, H, _ = make_problem(4, 32, seed=6)
    base = torch.zeros(4, 32, dtype=torch.bool)
    base[:, :12] = True  # 75 % of the first 16-column block, 0 % of the second
    out, mask = prune_matrix(W, H, 0.4, blocksize=16, base_mask=base)
    assert mask[base].all() and (out[base] == 0).all()
    assert block_counts(mask, 16) == [48, round(0.4 * 64)]


def test_base_mask_rounding_slack_is_one_entry_per_block():
    W, H, _ = make_problem(4, 10, seed=13)
    base = torch.zeros(4, 10, dtype=torch.bool)
    base.view(-1)[:21] = True  # a 0.5 target prunes 20 entries in the single block
    out, mask = prune_matrix(W, H, 0.5, base_mask=base)
    assert torch.equal(mask, base) and (out[base] == 0).all()
    base.view(-1)[21] = True
    with pytest.raises(UserError, match="base mask has 0.55 sparsity > target 0.5"):
        prune_matrix(W, H, 0.5, base_mask=base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_round_trip(dtype):
    W, H, _ = make_problem(8, 32, seed=7)
    W = W.to(dtype)
    out, mask = prune_matrix(W, H, 0.5, blocksize=16)
    expected, expected_mask = prune_matrix(W.float(), H, 0.5, blocksize=16)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(mask, expected_mask)
    assert torch.equal(out, expected.to(dtype))
    assert (out[mask] == 0).all()


def test_hessian_scale_does_not_matter():
    W, H, _ = make_problem(6, 24, seed=8, dead=(3,))
    out, mask = prune_matrix(W, H, 0.5, dtype=torch.float64)
    out_scaled, mask_scaled = prune_matrix(W, 1e6 * H, 0.5, dtype=torch.float64)
    assert torch.equal(mask, mask_scaled)
    torch.testing.assert_close(out, out_scaled, rtol=0, atol=1e-6)


def test_shared_factor_equals_separate_solves():
    W, H, g = make_problem(6, 24, seed=9)
    W2 = torch.randn(10, 24, generator=g)
    factor = inverse_hessian_factor(H)
    for w in (W, W2):
        torch.testing.assert_close(prune_with_factor(w, factor, 0.5)[0], prune_matrix(w, H, 0.5)[0])


@pytest.mark.parametrize("sparsity,prune_n,prune_m", [(0.6, 0, 0), (0.0, 2, 4)])
@pytest.mark.parametrize("with_base", [False, True])
def test_group_solve_equals_solving_each_weight_alone(sparsity, prune_n, prune_m, with_base):
    """q/k/v-style groups share one column loop; every weight must come out as if pruned alone."""
    W, H, g = make_problem(6, 40, seed=11, dead=(3,))
    weights = [W, torch.randn(10, 40, generator=g, dtype=torch.float64), torch.randn(3, 40, generator=g,
                                                                                   dtype=torch.float64)]
    bases = [random_base(w.shape[0], 40, sparsity, prune_n, prune_m, g) if with_base else None for w in weights]
    factor = inverse_hessian_factor(H, dtype=torch.float64)
    kw = dict(prune_n=prune_n, prune_m=prune_m, blocksize=16, dtype=torch.float64)
    group = prune_group_with_factor(weights, factor, sparsity, base_masks=bases, **kw)
    for w, base, (out, mask) in zip(weights, bases, group):
        alone, alone_mask = prune_with_factor(w, factor, sparsity, base_mask=base, **kw)
        assert torch.equal(mask, alone_mask)
        torch.testing.assert_close(out, alone, rtol=1e-12, atol=1e-12)


def test_reconstruction_error_is_squared_output_error():
    g = torch.Generator().manual_seed(10)
    X, A, B = torch.randn(50, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g)
    expected = ((A.double() - B.double()) @ X.double().T).square().sum().item()
    assert reconstruction_error(A, B, X.T @ X) == pytest.approx(expected, rel=1e-5)


def test_sparsegpt_beats_wanda_beats_magnitude():
    W, H, _ = make_problem(32, 64, seed=11, samples=512)
    errors = [reconstruction_error(W, prune(W, H, 0.5)[0], H) for prune in (prune_matrix, wanda_prune, magnitude_prune)]
    assert errors[0] < 0.95 * errors[1] < errors[2]


def test_cholesky_retry_on_singular_hessian(caplog):
    g = torch.Generator().manual_seed(12)
    X = torch.randn(4, 32, generator=g)  # rank 4 < 32 columns
    W = torch.randn(8, 32, generator=g)
    with caplog.at_level(logging.WARNING, logger="sparsegpt.prune.solver"):
        factor = inverse_hessian_factor(X.T @ X, percdamp=0.0)
        out, mask = prune_with_factor(W, factor, 0.5)
    assert factor.damp > 0 and "not positive definite" in caplog.text
    assert torch.isfinite(out).all() and (out[mask] == 0).all()


def test_indefinite_hessian_raises_after_retries():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(UserError, match="not positive definite"):
        prune_matrix(torch.ones(2, 2), H, 0.5, percdamp=0.0)


W8, H8 = torch.randn(4, 8), torch.eye(8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(prune_n=2), "needs both prune_n and prune_m"),
    (dict(prune_m=4), "needs both prune_n and prune_m"),
    (dict(prune_n=4, prune_m=4), "0 < N < M"),
    (dict(prune_n=-1, prune_m=4), "0 < N < M"),
    (dict(prune_n=1, prune_m=-2), "0 < N < M"),
    (dict(prune_n=2, prune_m=3), "multiple of 3"),
    (dict(hessian=torch.eye(7)), r"hessian must be \(8, 8\)"),
    (dict(hessian=torch.eye(8) * float("nan")), "NaN/inf"),
    (dict(base_mask=torch.zeros(4, 7, dtype=torch.bool)), "base_mask must be a bool tensor"),
    (dict(base_mask=torch.zeros(4, 8)), "base_mask must be a bool tensor"),
    (dict(base_mask=torch.ones(4, 8, dtype=torch.bool)), "base mask has 1 sparsity > target 0.5"),
    (dict(base_mask=torch.ones(4, 8, dtype=torch.bool), prune_n=2, prune_m=4), "4 pruned entries in one row group"),
    (dict(blocksize=0), "blocksize must be >= 1"),
    (dict(percdamp=-1.0), "percdamp must be >= 0"),
    (dict(dtype=torch.float16), "solver dtype must be"),
    (dict(weight=torch.randn(8)), "2-D"),
])
def test_bad_inputs_raise_user_error(kwargs, match):
    args = dict(weight=W8, hessian=H8, sparsity=0.5) | kwargs
    with pytest.raises(UserError, match=match):
        prune_matrix(args.pop("weight"), args.pop("hessian"), args.pop("sparsity"), **args)


def test_gram_sums_per_sequence_match_float64_and_ignore_batching():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 40, 24, generator=g) * torch.logspace(-1, 1, 24)
    reference = sum(s.double().T @ s.double() for s in x)
    whole = add_gram_(torch.zeros(24, 24, dtype=torch.float64), x, block=5)  # upper block rows of 5, 5, ..., 4
    torch.testing.assert_close(whole, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
    assert torch.equal(whole, whole.T)
    one_block = add_gram_(torch.zeros(24, 24, dtype=torch.float64), x)
    torch.testing.assert_close(one_block, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
    batched = torch.zeros(24, 24, dtype=torch.float64)
    for batch in x.split(4):  # batches of 4 and 2 sequences, in order: bit for bit the same sums
        add_gram_(batched, batch, block=5)
    assert torch.equal(batched, whole)
    flat = add_gram_(torch.zeros(24, 24, dtype=torch.float64), x[0])  # a 2-D input is one sequence
    assert torch.equal(flat, add_gram_(torch.zeros(24, 24, dtype=torch.float64), x[:1]))
    wide = add_gram_(torch.zeros(24, 24, dtype=torch.float64), x.double())  # float64 inputs: float64 products
    torch.testing.assert_close(wide, reference, rtol=1e-12, atol=0.0)
