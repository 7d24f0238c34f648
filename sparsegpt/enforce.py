"""Mask enforcement during fine-tuning: re-zeroes pruned entries of weights, fp32 master copies and Adam moments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsegpt.masks import MaskSet, mask_in_param_layout

# A pruned weight must stay exactly 0; the trainer has two independent guards:
# 1. gradient hooks (`MaskSet.grad_hooks`) zero the gradient at masked positions as autograd produces it, before
#    accumulation or ZeRO's reduce-scatter, so Adam's moments, its update and decoupled weight decay all stay 0
#    there (fp32 master weights included);
# 2. after every optimizer step `MaskEnforcer` re-zeroes the masked entries of the fp32 master weights, both Adam
#    moments and the (low-precision) model weights, touching only this rank's partition (no gather).
# "full" uses both; "hooks" (1 only), "step" (2 only) and "none" exist for benchmarks and negative-control tests.
ENFORCEMENT = ("full", "hooks", "step", "none")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class _Slot:
    """One masked, trainable weight and its keep-multiplier (1 = kept, 0 = pruned) for each copy to re-zero."""

    param: nn.Parameter
    keep: Tensor                # in the param's layout, device and dtype
    flat: Tensor | None = None  # float32 (CPU): this rank's slice of the flattened keep (ZeRO partition / fragment)
    _cache: dict = field(default_factory=dict)

    def flat_like(self, tensor: Tensor) -> Tensor:
        """`flat` on tensor's device and dtype, converted once."""
        key = (tensor.device, tensor.dtype)
        if key not in self._cache:
            self._cache[key] = self.flat.to(device=tensor.device, dtype=tensor.dtype)
        return self._cache[key]


class MaskEnforcer:
    """Re-zeroes masked entries of weights, fp32 master weights and Adam moments after an optimizer step,
    through DeepSpeed's fragment/partition accessors where DeepSpeed owns them, touching only local data.
    Zeroing is a multiply by the keep mask (several times faster than masked_fill_ on CPU; 0 stays 0)."""

    def __init__(self, model: nn.Module, masks: MaskSet, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.slots: list[_Slot] = []
        for name, module in masks.modules(model).items():
            param = module.weight
            if not param.requires_grad:
                continue
            keep = (~mask_in_param_layout(module, masks.masks[name])).float()
            slot = _Slot(param, keep.to(device=param.device, dtype=param.dtype))
            if hasattr(param, "ds_id"):  # ZeRO-3: rank r owns [r*n, (r+1)*n) of the flattened, padded weight
                from deepspeed import comm as dist

                n = param.ds_tensor.numel()
                rank = dist.get_rank(group=param.ds_process_group)
                padded = torch.zeros(n * dist.get_world_size(group=param.ds_process_group))
                padded[: keep.numel()] = keep.flatten()
                slot.flat = padded[rank * n:(rank + 1) * n].clone()
            elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer: a fragment
                address = param._hp_mapping.lp_fragment_address
                slot.flat = keep.flatten()[address.start:address.start + address.numel].clone()
            self.slots.append(slot)

    @torch.no_grad()
    def __call__(self) -> None:
        """Zero every masked entry this rank holds."""
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                self._zero3(slot)
                continue
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                _zero_flat(mapping.get_hp_fragment(), slot)
                if mapping.optim_fragment:  # linked by DeepSpeed after the first real step
                    for key in ADAM_STATES:
                        _zero_flat(mapping.get_hp_fragment(key), slot)
            elif not hasattr(param, "_hp_mapping"):  # plain torch optimizer owns the state
                for key in ADAM_STATES:
                    state = self.optimizer.state.get(param, {}).get(key)
                    if state is not None:
                        state.mul_(slot.keep)
            param.data.mul_(slot.keep)

    @staticmethod
    def _zero3(slot: _Slot) -> None:
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        param = slot.param
        safe_set_local_fp32_param(param, _zero_flat(safe_get_local_fp32_param(param), slot))
        for key in ADAM_STATES:
            state = safe_get_local_optimizer_state(param, key)
            safe_set_local_optimizer_state(param, _zero_flat(state, slot), key)
        _zero_flat(param.ds_tensor.data, slot)
        if param.data.numel() == slot.keep.numel():  # a persistent (never partitioned away) parameter
            param.data.mul_(slot.keep)

    @torch.no_grad()
    def revived(self) -> int:
        """Number of non-zero masked entries in this rank's copy of the model weights."""
        total = 0
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                local = param.ds_tensor.data.flatten()
                total += int(((local != 0) & (slot.flat_like(local) == 0)).sum())
            else:
                total += int(((param.data != 0) & (slot.keep == 0)).sum())
        return total


def _zero_flat(tensor: Tensor, slot: _Slot) -> Tensor:
    """Zero the masked entries of a flat local copy (partition / fragment) of slot's weight in place; returns it."""
    tensor.view(-1).mul_(slot.flat_like(tensor))
    return tensor
