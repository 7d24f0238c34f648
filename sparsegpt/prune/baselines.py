"""Baseline pruners with the solver's signature: magnitude and Wanda (Sun et al. 2023). No weight update."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparsegpt.core.errors import UserError
from sparsegpt.prune._select import (
    check_base_budget,
    check_nm_base,
    check_prune_args,
    lowest_with_forced,
    nm_mask,
    unstructured_mask,
)
from sparsegpt.prune.solver import prune_matrix


def magnitude_prune(weight: Tensor, hessian: Tensor | None, sparsity: float, *, prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                    base_mask: Tensor | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Prune the smallest |W| over the whole matrix (N:M: per row group); hessian/blocksize/percdamp/dtype unused."""
    base = check_prune_args(weight, sparsity, prune_n, prune_m, base_mask)
    score = weight.detach().float().abs()
    if prune_m:
        check_nm_base(base, prune_n, prune_m)
        mask = nm_mask(score, prune_n, prune_m, base)
    else:
        check_base_budget(base, round(sparsity * weight.numel()), sparsity, 1)
        mask = unstructured_mask(score, sparsity, base)
    return weight.detach().masked_fill(mask, 0), mask


def wanda_prune(weight: Tensor, hessian: Tensor, sparsity: float, *, prune_n: int = 0, prune_m: int = 0,
                blocksize: int = 128, percdamp: float = 0.01, base_mask: Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Prune by |W| * ||x|| (||x||^2 = diag H), round(sparsity * cols) per output row (N:M: per row group)."""
    base = check_prune_args(weight, sparsity, prune_n, prune_m, base_mask)
    cols = weight.shape[1]
    if hessian is None or hessian.shape != (cols, cols):
        raise UserError(f"wanda needs a ({cols}, {cols}) hessian, got "
                        f"{None if hessian is None else tuple(hessian.shape)}")
    act_sq = hessian.detach().diagonal().to(device=weight.device, dtype=torch.float64)
    if not torch.isfinite(act_sq).all() or (act_sq < 0).any():
        raise UserError("hessian diagonal must be finite and >= 0 (H = sum x x^T)")
    score = weight.detach().double().abs() * act_sq.sqrt()
    if prune_m:
        check_nm_base(base, prune_n, prune_m)
        mask = nm_mask(score, prune_n, prune_m, base)
    else:
        k = round(sparsity * cols)
        check_base_budget(base, k * weight.shape[0], sparsity, weight.shape[0])
        mask = lowest_with_forced(score, k, base)
    return weight.detach().masked_fill(mask, 0), mask


PRUNERS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "sparsegpt": prune_matrix,
    "wanda": wanda_prune,
    "magnitude": magnitude_prune,
}
