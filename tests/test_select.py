"""Issue 24 (8e), mask selection without a host sync: `lowest_with_forced` (every N:M group of the solver's column
loop, every unstructured block, Wanda's rows) chooses on the device. It selects what a float64 reference selects
(each slice's forced entries, then its lowest scores, up to max(k, forced count)), and exactly what the selection
before the fix (kept below, verbatim) selected, but where scores tie at a slice's k-th lowest; dead columns push
some groups past N forced entries. No tensor is read on the host during a selection, and the solver's N:M loop
reads as many as before whatever the number of groups (before: one per group of M columns)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sparsegpt.prune._select import lowest_with_forced, nm_mask, unstructured_mask
from sparsegpt.prune.solver import prune_matrix

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")  # what copies a value to the host


def selection_before_the_fix(score, k, forced):
    """main's lowest_with_forced before 2026-12 (int(quota.max()) on the host), as the reference of identity."""
    score = score.masked_fill(forced, float("-inf"))
    quota = forced.sum(dim=-1, keepdim=True).clamp(min=k)
    most = int(quota.max()) if quota.numel() else 0
    mask = torch.zeros_like(forced)
    if most:
        if bool((quota == most).all()):
            mask.scatter_(-1, score.topk(most, dim=-1, largest=False, sorted=False).indices, True)
        else:
            lowest = score.topk(most, dim=-1, largest=False, sorted=True).indices
            mask.scatter_(-1, lowest, torch.arange(most, device=score.device) < quota)
    return mask


def float64_reference(score, k, forced):
    """Rank every entry of a slice (forced first, then by score, ties by position); keep rank < max(k, forced)."""
    ranked = score.double().masked_fill(forced, float("-inf")).argsort(dim=-1, stable=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(score.shape[-1]).expand_as(ranked))
    return rank < forced.sum(dim=-1, keepdim=True).clamp(min=k)


def nm_case(seed: int, *, ties: bool, dead: bool = True, rows=16, groups=32, n=2, m=4):
    """Scores (rows, groups, M), at most N base entries per row group, plus dead columns (forced in every row)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, groups, m)
    score = torch.randint(0, 3, shape, generator=gen).float() if ties else torch.rand(shape, generator=gen)
    base = torch.rand(shape, generator=gen).argsort(-1).argsort(-1) < torch.randint(0, n + 1, (rows, groups, 1),
                                                                                     generator=gen)
    return score, base | (torch.rand(1, groups, m, generator=gen) < 0.3) & dead


def selected_scores(score, mask):
    """Per slice, the scores of its selected entries, sorted (inf fills the unselected)."""
    return score.double().masked_fill(~mask, float("inf")).sort(-1).values


@pytest.mark.parametrize("seed", range(20))
def test_nm_selection_equals_the_reference_and_the_old_one(seed):
    score, forced = nm_case(seed, ties=False)
    assert (forced.sum(-1) > 2).any() and (forced.sum(-1) < 2).any()  # quotas above N and at N in one call
    new = lowest_with_forced(score, 2, forced)
    assert torch.equal(new, float64_reference(score, 2, forced))
    assert torch.equal(new, selection_before_the_fix(score, 2, forced))


@pytest.mark.parametrize("seed", range(20))
def test_tied_scores_select_as_low_as_the_reference(seed):
    """With dead columns: as many entries, as low, as the reference and the old selection (which of two equal
    scores goes may differ); without (no group past N forced: the old call was the same topk): the same entries."""
    score, forced = nm_case(seed, ties=True)
    new, old = lowest_with_forced(score, 2, forced), selection_before_the_fix(score, 2, forced)
    reference = float64_reference(score, 2, forced)
    assert torch.equal(new.sum(-1), reference.sum(-1)) and not (forced & ~new).any()
    assert torch.equal(selected_scores(score, new), selected_scores(score, reference))
    assert torch.equal(selected_scores(score, new), selected_scores(score, old))
    score, forced = nm_case(seed, ties=True, dead=False)
    assert torch.equal(lowest_with_forced(score, 2, forced), selection_before_the_fix(score, 2, forced))


@pytest.mark.parametrize("ties", [False, True])
def test_unstructured_selection_is_the_old_one_even_with_ties(ties):
    score, forced = nm_case(7, ties=ties, groups=8)
    score, forced = score.reshape(16, 32), forced.reshape(16, 32)
    for sparsity in (0.0, 0.1, 0.5, 0.9):  # below and above the forced share (~0.4)
        k = round(sparsity * score.numel())
        new = unstructured_mask(score, sparsity, forced)
        assert torch.equal(new, selection_before_the_fix(score.reshape(1, -1), k, forced.reshape(1, -1))
                           .reshape(16, 32))
        assert int(new.sum()) == max(k, int(forced.sum()))


@contextlib.contextmanager
def host_reads(monkeypatch, counts: dict[str, int] | None = None):
    """Every tensor-to-host read counted in `counts`, or refused (AssertionError) when counts is None."""
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(self, *args, _name=name, _original=original, **kwargs):
                if counts is None:
                    raise AssertionError(f"host sync: Tensor.{_name} during the selection")
                counts[_name] = counts.get(_name, 0) + 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, read)
        yield


def test_selection_reads_nothing_on_the_host(monkeypatch):
    score, forced = nm_case(3, ties=True)
    flat_score, flat_forced = score.reshape(16, -1), forced.reshape(16, -1)
    with host_reads(monkeypatch):
        nm = nm_mask(flat_score, 2, 4, flat_forced)
        unstructured = unstructured_mask(flat_score, 0.5, flat_forced)
        rows = lowest_with_forced(flat_score, 40, flat_forced)
    assert nm.shape == unstructured.shape == rows.shape == flat_score.shape


def test_nm_solver_reads_the_host_the_same_whatever_the_group_count(monkeypatch):
    """prune_matrix's checks read a few values once per call; the column loop none (before: one per group)."""
    reads = []
    for cols in (64, 512):
        gen = torch.Generator().manual_seed(cols)
        weight, x = torch.randn(8, cols, generator=gen), torch.randn(4 * cols, cols, generator=gen)
        counts: dict[str, int] = {}
        with host_reads(monkeypatch, counts):
            pruned, mask = prune_matrix(weight, x.t() @ x, 0.5, prune_n=2, prune_m=4, blocksize=32)
        assert torch.equal(mask.reshape(8, -1, 4).sum(-1), torch.full((8, cols // 4), 2))
        reads.append(sum(counts.values()))
    assert reads[0] == reads[1], f"host reads: {reads[0]} with 16 groups a row, {reads[1]} with 128"
