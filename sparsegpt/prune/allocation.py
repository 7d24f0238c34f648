"""Per-layer sparsity targets: uniform, or OWL (Yin et al. 2024) where outlier-rich layers are pruned less."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from sparsegpt.core.errors import UserError


def _check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise UserError(f"target sparsity must be in [0, 1), got {target}")


def uniform(layer_ids: Iterable[int], target: float) -> dict[int, float]:
    """Every layer gets the same target sparsity."""
    _check_target(target)
    return {i: target for i in layer_ids}


def outlier_ratio(weight: Tensor | Sequence[Tensor], act_norm: Tensor | Sequence[Tensor], M: float = 5.0) -> float:
    """Fraction of |W| * ||x|| entries above M times their mean (OWL's layerwise outlier distribution).

    Pass lists (one weight (out, in) and one input-norm vector (in,) per linear) to pool a whole decoder layer.
    """
    weights = [weight] if isinstance(weight, Tensor) else list(weight)
    norms = [act_norm] if isinstance(act_norm, Tensor) else list(act_norm)
    if not weights or len(weights) != len(norms):
        raise UserError(f"outlier_ratio needs one act_norm per weight, got {len(weights)} weights, {len(norms)} norms")
    scores = []
    for w, n in zip(weights, norms):
        if w.ndim != 2 or n.shape != (w.shape[1],):
            raise UserError(f"act_norm must have shape ({w.shape[-1]},) for a weight of shape {tuple(w.shape)}, "
                            f"got {tuple(n.shape)}")
        scores.append((w.detach().double().abs() * n.detach().to(w.device).double()).flatten())
    score = torch.cat([s.cpu() for s in scores])
    return float((score > M * score.mean()).double().mean())


def owl(outlier_ratio: dict[int, float], target: float, *, lam: float = 0.08,
        floors: dict[int, float] | None = None) -> dict[int, float]:
    """OWL targets: map outlier ratios linearly and inverted into [target-lam, target+lam], mean exactly target.

    `floors` are per-layer minimum sparsities (e.g. what an earlier stage already pruned); layers raised to their
    floor are paid for by lowering the other layers uniformly, so the mean stays the target.
    """
    _check_target(target)
    if not outlier_ratio:
        raise UserError("owl needs the outlier ratio of at least one layer")
    if lam < 0:
        raise UserError(f"owl lam must be >= 0, got {lam}")
    floors = floors or {}
    if not set(floors) <= set(outlier_ratio):
        raise UserError(f"owl floors name layers {sorted(set(floors) - set(outlier_ratio))} with no outlier ratio")
    ids = sorted(outlier_ratio)
    lo, hi = min(outlier_ratio.values()), max(outlier_ratio.values())
    span = hi - lo
    raw = {i: target + lam - (2 * lam * (outlier_ratio[i] - lo) / span if span > 0 else lam) for i in ids}
    shift = sum(raw.values()) / len(ids) - target
    sparsity = {i: raw[i] - shift for i in ids}
    floor = {i: max(floors.get(i, 0.0), 0.0) for i in ids}
    if sum(floor.values()) > target * len(ids) + 1e-12:
        raise UserError(f"owl floors average {sum(floor.values()) / len(ids):.4g} > target {target:.4g}; "
                        "the target must be at least the earlier stage's sparsity")
    result = _fill_to_floors(sparsity, floor, target)
    worst = max(result, key=result.get)
    if result[worst] >= 1:
        raise UserError(f"owl gives layer {worst} sparsity {result[worst]:.4g} >= 1; lower lam ({lam}) or the target")
    return result


def _fill_to_floors(sparsity: dict[int, float], floor: dict[int, float], target: float) -> dict[int, float]:
    """Raise layers below their floor to it and lower the free layers uniformly so the mean stays target."""
    clamped = {i for i in sparsity if sparsity[i] < floor[i]}
    while True:
        free = [i for i in sparsity if i not in clamped]
        if not free:
            return dict(floor)
        drop = (sum(sparsity[i] for i in free) + sum(floor[i] for i in clamped) - target * len(sparsity)) / len(free)
        below = {i for i in free if sparsity[i] - drop < floor[i]}
        if not below:
            return {i: floor[i] if i in clamped else sparsity[i] - drop for i in sparsity}
        clamped |= below
