"""Mask selection shared by the SparseGPT solver and the baselines: argument checks, top-k with forced entries, N:M."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsegpt.core.errors import UserError


def check_prune_args(weight: Tensor, sparsity: float, prune_n: int, prune_m: int,
                     base_mask: Tensor | None) -> Tensor:
    """Validate the arguments every pruner shares; return the base mask (all False when none was given)."""
    if weight.ndim != 2:
        raise UserError(f"weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise UserError("weight has NaN/inf entries; prune a finite weight")
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    if (prune_n != 0) != (prune_m != 0):
        raise UserError(f"N:M needs both prune_n and prune_m (got prune_n={prune_n}, prune_m={prune_m}); "
                        "set both, e.g. 2 and 4, or neither")
    if prune_m and not 0 < prune_n < prune_m:
        raise UserError(f"N:M sparsity needs 0 < N < M, got {prune_n}:{prune_m}")
    cols = weight.shape[1]
    if prune_m and cols % prune_m:
        raise UserError(f"{prune_n}:{prune_m} sparsity needs the column count ({cols}) to be a multiple of {prune_m}")
    if base_mask is None:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if base_mask.dtype != torch.bool or base_mask.shape != weight.shape:
        raise UserError(f"base_mask must be a bool tensor shaped like the weight {tuple(weight.shape)}, "
                        f"got {base_mask.dtype} {tuple(base_mask.shape)}")
    return base_mask.to(weight.device)


def check_base_budget(base: Tensor, budget: int, sparsity: float, units: int) -> None:
    """Raise if the base mask prunes more entries than this call would, beyond one entry per rounding unit.

    The slack lets a stage re-prune at the sparsity an earlier stage measured (per-block or per-row rounding
    differs by at most one entry per unit); wherever the base exceeds a unit's quota, all base entries are kept.
    """
    count = int(base.sum())
    if count > budget + units:
        raise UserError(f"base mask has {count / base.numel():.4g} sparsity > target {sparsity:.4g}; "
                        "a stage cannot revive weights, so raise its target to at least the earlier one")


def check_nm_base(base: Tensor, prune_n: int, prune_m: int) -> None:
    """Raise if some row group of M columns has more than N base (already pruned) entries."""
    worst = int(base.reshape(base.shape[0], -1, prune_m).sum(-1).max()) if base.numel() else 0
    if worst > prune_n:
        raise UserError(f"base mask has {worst} pruned entries in one row group of {prune_m} columns, "
                        f"more than {prune_n}:{prune_m} allows; use an N:M with N >= {worst}")


def lowest_with_forced(score: Tensor, k: int, forced: Tensor) -> Tensor:
    """Mask the k lowest-score entries of each slice along the last dim, forced ones first.

    A slice with more than k forced entries keeps all of them (pruned weights are never revived). No host sync
    (on a GPU the N:M column loop calls this once per group of M columns): forced entries score -inf, so a slice's
    k lowest are its forced ones first, and OR-ing in every forced entry covers a slice with more than k of them.
    One unsorted partial sort (topk) whatever the slices' forced counts; until 2026-12 the largest quota was read
    on the host (`int(quota.max())`) to size a sorted topk. The two choose the same entries but where scores tie
    at a slice's k-th lowest (which of the equal entries goes is then topk's choice).
    """
    mask = forced.clone()
    k = min(k, score.shape[-1])
    if k:  # one partial sort (topk) instead of ranking every entry: the hot spot of the solver's mask choice
        lowest = score.masked_fill(forced, float("-inf")).topk(k, dim=-1, largest=False, sorted=False).indices
        mask.scatter_(-1, lowest, True)
    return mask


def nm_mask(score: Tensor, prune_n: int, prune_m: int, forced: Tensor) -> Tensor:
    """In every group of M consecutive columns, mask the N lowest-score entries of each row, forced ones first."""
    rows, cols = score.shape
    groups = (rows, cols // prune_m, prune_m)
    return lowest_with_forced(score.reshape(groups), prune_n, forced.reshape(groups)).reshape(rows, cols)


def unstructured_mask(score: Tensor, sparsity: float, forced: Tensor) -> Tensor:
    """Mask round(sparsity * numel) lowest-score entries of the whole matrix, forced ones first."""
    k = round(sparsity * score.numel())
    return lowest_with_forced(score.reshape(1, -1), k, forced.reshape(1, -1)).reshape(score.shape)
