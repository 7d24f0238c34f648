"""Mask enforcement during fine-tuning: re-zeroes pruned entries of weights, fp32 master copies and Adam moments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsegpt.core.masks import KeepMask, MaskSet, keep_mask_of

# A pruned weight must stay exactly 0; the trainer has two independent guards:
# 1. gradient hooks (`MaskSet.grad_hooks`) zero the gradient at masked positions as autograd produces it, before
#    accumulation or ZeRO's reduce-scatter, so Adam's moments, its update and decoupled weight decay all stay 0
#    there (fp32 master weights included);
# 2. after every optimizer step `MaskEnforcer` re-zeroes the masked entries of the fp32 master weights, both Adam
#    moments and the (low-precision) model weights, touching only this rank's partition (no gather).
# "full" uses both; "hooks" (1 only), "step" (2 only) and "none" exist for benchmarks and negative-control tests.
# Both guards share one `KeepMask` per parameter: an unpacked keep in the weight's dtype where every rank holds
# the weight whole, only this rank's packed bits under ZeRO-3 (unpacked for one parameter at a time).
ENFORCEMENT = ("full", "hooks", "step", "none")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class _Slot:
    """One masked, trainable parameter: its `KeepMask` (shared with its gradient hook, if any) and, for a ZeRO-1/2
    bf16 optimizer, this rank's fragment of the flattened keep (a view, or a copy on the fp32 fragment's device)."""

    mask: KeepMask
    fragment: Tensor | None = None

    @property
    def param(self) -> nn.Parameter:
        return self.mask.param

    @property
    def keep(self) -> Tensor | None:
        """The unpacked keep in the parameter's layout (None for a ZeRO-3 partitioned parameter)."""
        return self.mask.keep

    def fragment_on(self, device: torch.device) -> Tensor:
        if self.fragment.device != device:
            self.fragment = self.fragment.to(device)  # once: the fp32 fragments live on one device
        return self.fragment


class MaskEnforcer:
    """Re-zeroes masked entries of weights, fp32 master weights and Adam moments after an optimizer step,
    through DeepSpeed's fragment/partition accessors where DeepSpeed owns them, touching only local data.
    Zeroing is a multiply by the keep mask (several times faster than masked_fill_ on CPU; 0 stays 0).
    One slot per parameter (a fused experts parameter is one slot for all its experts); build it after
    `MaskSet.grad_hooks` to share the hooks' keeps."""

    def __init__(self, model: nn.Module, masks: MaskSet, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.slots: list[_Slot] = []
        for _, param, mask in masks.iter_param_masks(model):
            if not param.requires_grad:
                continue
            slot = _Slot(keep_mask_of(param) or KeepMask(param, mask))
            mapping = getattr(param, "_hp_mapping", None)
            if not hasattr(param, "ds_id") and mapping is not None:  # ZeRO-1/2, bf16 optimizer: a fragment
                address = mapping.lp_fragment_address
                slot.fragment = slot.keep.view(-1)[address.start:address.start + address.numel]
            self.slots.append(slot)

    @torch.no_grad()
    def __call__(self) -> None:
        """Zero every masked entry this rank holds."""
        for slot in self.slots:
            param, keep = slot.param, slot.keep
            if hasattr(param, "ds_id"):
                self._zero3(slot.mask)
                continue
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                _mul_flat(mapping.get_hp_fragment(), slot)
                if mapping.optim_fragment:  # linked by DeepSpeed after the first real step
                    for key in ADAM_STATES:
                        _mul_flat(mapping.get_hp_fragment(key), slot)
            elif not hasattr(param, "_hp_mapping"):  # plain torch optimizer owns the state
                for key in ADAM_STATES:
                    state = self.optimizer.state.get(param, {}).get(key)
                    if state is not None:
                        state.mul_(keep)
            param.data.mul_(keep)

    @staticmethod
    def _zero3(keep: KeepMask) -> None:
        """This rank's partition: fp32 master, Adam moments, the partitioned weight (and a persistent weight)."""
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        local: dict[tuple, Tensor] = {}  # this parameter's unpacked local keep, per (device, dtype), this call only

        def zero(tensor: Tensor) -> Tensor:
            key = (tensor.device, tensor.dtype)
            if key not in local:
                local[key] = keep.local_keep(tensor)
            tensor.view(-1).mul_(local[key])
            return tensor

        param = keep.param
        safe_set_local_fp32_param(param, zero(safe_get_local_fp32_param(param)))
        for key in ADAM_STATES:
            safe_set_local_optimizer_state(param, zero(safe_get_local_optimizer_state(param, key)), key)
        zero(param.ds_tensor.data)
        if keep.keep is not None and param.data.numel() == keep.numel:  # a persistent (never partitioned) one
            param.data.mul_(keep.keep)

    @torch.no_grad()
    def revived(self) -> int:
        """Number of non-zero masked entries in this rank's copy of the model weights."""
        total = 0
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                local = param.ds_tensor.data.view(-1)
                total += int(((local != 0) & (slot.mask.local_keep(local) == 0)).sum())
            else:
                total += int(((param.data != 0) & (slot.keep == 0)).sum())
        return total

    def held_bytes(self) -> int:
        """Bytes of the mask tensors this enforcer and the live gradient hooks of its parameters keep alive, each
        storage counted once (a fragment view of a keep is the keep)."""
        storages = {}
        for slot in self.slots:
            tensors = slot.mask.tensors() + ([slot.fragment] if slot.fragment is not None else [])
            hook = keep_mask_of(slot.param)
            if hook is not None and hook is not slot.mask:
                tensors += hook.tensors()
            for tensor in tensors:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def _mul_flat(tensor: Tensor, slot: _Slot) -> Tensor:
    """Zero the masked entries of this rank's flat fp32 fragment of slot's weight in place (keep in the weight's
    dtype: 0/1 are exact in every float dtype); returns it."""
    tensor.view(-1).mul_(slot.fragment_on(tensor.device))
    return tensor
