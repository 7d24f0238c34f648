"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning of one weight matrix. Pure tensor math."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsegpt.core.errors import UserError
from sparsegpt.prune._select import check_base_budget, check_nm_base, check_prune_args, nm_mask, unstructured_mask

log = logging.getLogger(__name__)

INNER_BLOCK = 16          # columns per rank-1 sub-block of the column loop (bench/prune/results_profile.md)
GRAM_BLOCK = 128          # rows per GEMM of the Gram sums' upper block triangle (bench/prune/results_profile.md)
DAMP_RETRIES = 12         # extra Cholesky attempts, each with twice the damping: float32 Gram products leave H
DAMP_STEP = 2             # indefinite by rounding (~1e-5 of its largest eigenvalue) where a few outlier
                          # features make mean(diag) small; the least damping that factors is the best solve
FIRST_RETRY_PERCDAMP = 1e-4  # damping of the first retry when percdamp was 0


@dataclass
class InverseFactor:
    """Upper Cholesky factor of (H + damp I)^-1, shared by all linears that read the same input."""

    hinv: Tensor  # (cols, cols) upper triangular, float32/float64
    dead: Tensor  # (cols,) bool, diag(H) == 0
    damp: float   # damping finally added to the diagonal (after retries)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise UserError(f"solver dtype must be torch.float32 or torch.float64, got {dtype}")


def inverse_hessian_factor(hessian: Tensor, percdamp: float = 0.01, *,
                           dtype: torch.dtype = torch.float32) -> InverseFactor:
    """Dampen H = sum x x^T by percdamp * mean(diag H) and return the upper Cholesky factor of its inverse."""
    _check_dtype(dtype)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise UserError(f"hessian must be square (cols, cols), got shape {tuple(hessian.shape)}")
    if percdamp < 0:
        raise UserError(f"percdamp must be >= 0, got {percdamp}")
    H = hessian.detach().to(dtype=dtype, copy=True)
    if not torch.isfinite(H).all():
        raise UserError("hessian has NaN/inf entries; check the calibration activations")
    diag = H.diagonal()
    if (diag < 0).any():
        raise UserError("hessian has negative diagonal entries; expected H = sum x x^T")
    dead = diag == 0
    scale = diag[~dead].mean().item() if not dead.all() else 1.0  # dead columns are decoupled: keep them out
    diag[dead] = 1.0
    p = percdamp
    for attempt in range(DAMP_RETRIES + 1):
        if attempt:
            p = DAMP_STEP * p if p > 0 else FIRST_RETRY_PERCDAMP
        damp = p * scale
        eye = torch.eye(len(H), dtype=dtype, device=H.device)
        # H + damp·I with rows and columns reversed (J H J) = L Lᵀ, so H + damp·I = R Rᵀ with R = J L J upper, and
        # (H + damp·I)⁻¹ = R⁻ᵀ R⁻¹: its upper Cholesky factor is R⁻¹ = J L⁻¹ J. One factorization and one
        # triangular inverse instead of cholesky -> cholesky_inverse -> cholesky (the inverse alone took 15 % of
        # a CPU pass: bench/prune/results_profile.md).
        chol, info = torch.linalg.cholesky_ex((H + damp * eye).flip(0, 1))
        if info == 0:
            hinv = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if torch.isfinite(hinv).all():
                if attempt:
                    log.warning("hessian not positive definite with percdamp=%g; succeeded with percdamp=%g",
                                percdamp, p)
                return InverseFactor(hinv=hinv, dead=dead, damp=damp)
    raise UserError(f"hessian is not positive definite even with percdamp={p:g}; "
                    "check the calibration inputs or raise percdamp")


def prune_with_factor(weight: Tensor, factor: InverseFactor, sparsity: float, *, prune_n: int = 0,
                      prune_m: int = 0, blocksize: int = 128, base_mask: Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Prune weight (out, in) with a precomputed inverse-Hessian factor; return (pruned weight, mask True=pruned).

    For N:M the blocksize is rounded up to a multiple of M so that no group straddles two blocks.
    """
    (out, mask), = prune_group_with_factor([weight], factor, sparsity, prune_n=prune_n, prune_m=prune_m,
                                           blocksize=blocksize, base_masks=[base_mask], dtype=dtype)
    return out, mask


def prune_group_with_factor(weights: list[Tensor], factor: InverseFactor, sparsity: float, *, prune_n: int = 0,
                            prune_m: int = 0, blocksize: int = 128, base_masks: list[Tensor | None] | None = None,
                            dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """Prune several weights that read the same input (q/k/v, gate/up) with one factor.

    Each weight gets exactly the mask and values `prune_with_factor` would give it alone (masks are chosen per
    weight); the OBS updates act row by row, so the weights are stacked and share one column loop — a third of
    the small-op overhead for q/k/v.
    """
    _check_dtype(dtype)
    base_masks = base_masks or [None] * len(weights)
    if len(base_masks) != len(weights):
        raise UserError(f"got {len(base_masks)} base masks for {len(weights)} weights; give one (or None) per weight")
    cols = weights[0].shape[-1]
    if factor.hinv.shape != (cols, cols):
        raise UserError(f"inverse-Hessian factor is {tuple(factor.hinv.shape)}, weight needs ({cols}, {cols})")
    if blocksize < 1:
        raise UserError(f"blocksize must be >= 1, got {blocksize}")
    if prune_m:
        blocksize = -(-blocksize // prune_m) * prune_m
    bases, offsets = [], [0]
    for weight, base_mask in zip(weights, base_masks):
        base = check_prune_args(weight, sparsity, prune_n, prune_m, base_mask)
        if weight.shape[-1] != cols:
            raise UserError(f"weights pruned with one factor need {cols} columns, got shape {tuple(weight.shape)}")
        if prune_m:
            check_nm_base(base, prune_n, prune_m)
        else:
            rows = weight.shape[0]
            starts = range(0, cols, blocksize)
            check_base_budget(base, sum(round(sparsity * rows * (min(s + blocksize, cols) - s)) for s in starts),
                              sparsity, len(starts))
        bases.append(base)
        offsets.append(offsets[-1] + weight.shape[0])
    bounds = list(zip(offsets[:-1], offsets[1:]))  # each weight's rows in the stacked matrix

    W = torch.cat([w.detach().to(dtype=dtype) for w in weights])
    hinv = factor.hinv.to(device=W.device, dtype=dtype)
    dead = factor.dead.to(W.device)
    W[:, dead] = 0
    forced = torch.cat(bases) | dead.unsqueeze(0)
    mask = torch.zeros_like(forced)
    inner = max(1, INNER_BLOCK // prune_m) * prune_m if prune_m else INNER_BLOCK  # whole N:M groups
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, h1 = W[:, i1:i2], hinv[i1:i2, i1:i2]  # W1 is a view: updates land in W
        d = h1.diagonal()
        if prune_m:  # chosen group by group inside the column loop, from the weights updated so far (as the paper)
            mask1 = torch.zeros_like(forced[:, i1:i2])
        else:  # the whole block at its start; the quota is per weight, as if each were pruned alone
            score = W1.square() / d.square()
            mask1 = torch.cat([unstructured_mask(score[r0:r1], sparsity, forced[r0:r1, i1:i2]) for r0, r1 in bounds])
        err1 = torch.empty_like(W1)
        _block_columns(W1, h1, d, mask1, err1, inner, prune_n, prune_m, forced[:, i1:i2])
        mask[:, i1:i2] = mask1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update: only later, unfinished columns
    W.masked_fill_(mask, 0)
    results = []
    for weight, (r0, r1) in zip(weights, bounds):
        out = W[r0:r1].to(weight.dtype, copy=True)
        if not torch.isfinite(out).all():
            raise UserError(f"SparseGPT produced non-finite {weight.dtype} weights (damping {factor.damp:g}); "
                            "raise percdamp or use a wider weight dtype")
        results.append((out, mask[r0:r1]))
    return results


def _block_columns(W1: Tensor, h1: Tensor, d: Tensor, mask1: Tensor, err1: Tensor, inner: int, prune_n: int,
                   prune_m: int, forced1: Tensor) -> None:
    """The column loop of one block, in place: err1[:, i] = (pruned part of column i) / d[i], and every later
    column of the block minus err1[:, i] ⊗ h1[i]. Rank-1 updates reach only the rest of an `inner`-column
    sub-block; a matrix product then applies the sub-block's errors to the block's later columns at once (the
    paper's lazy batch update, nested), so each column costs two small ops and the bulk runs as GEMMs. Column i
    has received every earlier column's update when it is read, as in the unblocked loop. Masked entries keep
    their value until the caller zeroes them: no later column reads them."""
    width = W1.shape[1]
    for j1 in range(0, width, inner):
        j2 = min(j1 + inner, width)
        scale = None if prune_m else mask1[:, j1:j2] / d[j1:j2]  # 1/d where pruned, else 0
        for i in range(j1, j2):
            if prune_m and (i - j1) % prune_m == 0:  # each group of M from the weights updated so far
                g = slice(i, i + prune_m)
                mask1[:, g] = nm_mask(W1[:, g].square() / d[g].square(), prune_n, prune_m, forced1[:, g])
                scale = mask1[:, g] / d[g]
            err = torch.mul(W1[:, i], scale[:, (i - j1) % prune_m if prune_m else i - j1], out=err1[:, i])
            if i + 1 < j2:
                W1[:, i + 1:j2].addr_(err, h1[i, i + 1:j2], alpha=-1)
        if j2 < width:
            W1[:, j2:].addmm_(err1[:, j1:j2], h1[j1:j2, j2:], alpha=-1)


def prune_matrix(weight: Tensor, hessian: Tensor, sparsity: float, *, prune_n: int = 0, prune_m: int = 0,
                 blocksize: int = 128, percdamp: float = 0.01, base_mask: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """SparseGPT-prune weight (out, in) given H = sum x x^T (in, in); return (pruned weight, mask True=pruned)."""
    if hessian.shape != (weight.shape[-1],) * 2:
        raise UserError(f"hessian must be ({weight.shape[-1]}, {weight.shape[-1]}) for a weight of shape "
                        f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    factor = inverse_hessian_factor(hessian.to(weight.device), percdamp, dtype=dtype)
    return prune_with_factor(weight, factor, sparsity, prune_n=prune_n, prune_m=prune_m, blocksize=blocksize,
                             base_mask=base_mask, dtype=dtype)


def add_gram_(total: Tensor, x: Tensor, *, block: int = GRAM_BLOCK, dtype: torch.dtype | None = None) -> Tensor:
    """total += Σ_t x_t x_tᵀ over the tokens of x (..., seqlen, cols) in place; total is float64 (cols, cols).

    One product per sequence (each slice along the leading dims; a 2-D x is one sequence) in x's dtype widened to at
    least float32, added to the float64 total sequence by sequence. Only the upper block triangle is multiplied
    (one GEMM per `block` rows: about half the FLOPs) and the lower triangle is then copied from the upper one. A
    sequence's product depends only on that sequence, so the total does not depend on how sequences are batched
    (bit for bit) or split over ranks (up to the float64 order of the rank sums) — as summing float64 copies of x
    did, at a quarter of its cost (float64 GEMMs run at half the float32 rate and need the copy). A float32
    product over s tokens is within ~s·2⁻²⁴ of exact (relative to Σ|x||x|); H is cast to float32 for the solve.
    `dtype` bfloat16 (`PruneConfig.hessian_dtype`, opt-in) multiplies in bf16 instead: torch's CPU GEMMs return bf16,
    so each sequence's product is rounded to 8 mantissa bits (~2⁻⁹ relative) before the float64 sum; 2.5× faster
    Hessian sums on an AVX512-BF16 CPU, at the cost of an H that can be indefinite by more than 1 % damping covers
    (the solver's retries double it; bench/RESULTS.md has the measured effect)."""
    cols = x.shape[-1]
    compute = dtype or torch.promote_types(x.dtype, torch.float32)
    starts = range(0, cols, block)
    with torch.autocast(x.device.type, enabled=False):  # called from hooks inside autocast forwards: stay `compute`
        for seq in x.reshape(-1, x.shape[-2], cols) if x.ndim > 2 else x.unsqueeze(0):
            seq = seq.to(compute)
            for b in starts:
                total[b:b + block, b:].add_(seq[:, b:b + block].t() @ seq[:, b:])
    for b in starts:  # lower := upperᵀ, a block at a time (no cols² temporary)
        diag = total[b:b + block, b:b + block]
        diag.copy_(diag.triu() + diag.triu(1).t())
        total[b + block:, b:b + block].copy_(total[b:b + block, b + block:].t())
    return total


def never_ran(leaders: list[str]) -> UserError:
    """The error for linears the decoder layer's forward never called (no Hessian can be built for them)."""
    return UserError(f"{', '.join(leaders)} never ran in the decoder layer's forward; exclude it (--exclude) or "
                     "report the architecture")


def hessians_from_sums(sums: dict[str, Tensor], counts: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Per group leader of a layer, H = 2/N Σxxᵀ in float32 from its (all-reduced) float64 sum, popped from `sums` so
    one float64 sum is converted at a time, and its stats {tokens: N, expert: None, pooled_weight: 0}; UserError
    naming the leaders whose linears never ran in the layer's forward (N = 0)."""
    silent = [k for k in sums if not counts[k]]
    if silent:
        raise never_ran(silent)
    info = {k: {"tokens": counts[k], "expert": None, "pooled_weight": 0.0} for k in sums}
    return {k: sums.pop(k).mul_(2.0 / counts[k]).float() for k in list(sums)}, info


def reconstruction_error(w_old: Tensor, w_new: Tensor, hessian: Tensor) -> float:
    """Layer-wise squared error on the calibration set: trace((W_old - W_new) H (W_old - W_new)^T). A statistic
    (logged, summed in reports): the product runs in the inputs' dtype widened to at least float32 (relative error
    ~1e-6; in float64 it took 4 % of a CPU pass) and the trace sums in float64; a float64 H keeps it float64."""
    if w_old.shape != w_new.shape or hessian.shape != (w_old.shape[-1],) * 2:
        raise UserError(f"reconstruction_error needs equal weight shapes and a matching square hessian, got "
                        f"{tuple(w_old.shape)}, {tuple(w_new.shape)}, {tuple(hessian.shape)}")
    dtype = torch.promote_types(torch.promote_types(w_old.dtype, hessian.dtype), torch.float32)
    delta = w_old.to(dtype) - w_new.to(w_old.device, dtype)
    return float(((delta @ hessian.to(delta.device, dtype)) * delta).sum(dtype=torch.float64))
