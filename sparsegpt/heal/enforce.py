"""Mask enforcement during fine-tuning: re-zeroes pruned entries of weights, fp32 master copies and Adam moments."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsegpt.core.masks import KeepMask, MaskSet, keep_mask_of, pack_bits, unpack_keep

# A pruned weight must stay exactly 0; the trainer has two independent guards:
# 1. gradient hooks (`MaskSet.grad_hooks`) zero the gradient at masked positions as autograd produces it, before
#    accumulation or ZeRO's reduce-scatter, so Adam's moments, its update and decoupled weight decay all stay 0
#    there (fp32 master weights included);
# 2. after every optimizer step `MaskEnforcer` re-zeroes the masked entries of the fp32 master weights, both Adam
#    moments and the (low-precision) model weights, touching only this rank's partition (no gather).
# "full" uses both; "hooks" (1 only), "step" (2 only) and "none" exist for benchmarks and negative-control tests.
# Both guards share one `KeepMask` per parameter, which holds packed bits (1 bit per weight: the whole weight's
# where every rank holds it, this rank's partition's under ZeRO-3), unpacked for one parameter at a time.
ENFORCEMENT = ("full", "hooks", "step", "none")
ADAM_STATES = ("exp_avg", "exp_avg_sq")
log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One masked, trainable parameter: its `KeepMask` (shared with its gradient hook, if any) and, for a ZeRO-1/2
    bf16 optimizer whose fp32 fragment lives on another device (offload_optimizer), that fragment's packed bits
    there, made on first use."""

    mask: KeepMask
    fragment_bits: Tensor | None = None

    @property
    def param(self) -> nn.Parameter:
        return self.mask.param

    def fragment_keep(self, keep: Tensor, fragment: Tensor, address) -> Tensor:
        """The keep multiplier of this rank's flat fp32 fragment, on its device: a view of the parameter's unpacked
        `keep` on the same device, else unpacked from bits kept on the fragment's device (copied there once)."""
        if fragment.device == keep.device:
            return keep.view(-1)[address.start:address.start + address.numel]
        if self.fragment_bits is None or self.fragment_bits.device != fragment.device:
            pruned = keep.view(-1)[address.start:address.start + address.numel] == 0
            self.fragment_bits = pack_bits(pruned.cpu()).to(fragment.device)
        return unpack_keep(self.fragment_bits, address.numel, fragment)


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
            if param.requires_grad:
                self.slots.append(_Slot(keep_mask_of(param) or KeepMask(param, mask)))

    @torch.no_grad()
    def __call__(self) -> None:
        """Zero every masked entry this rank holds."""
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                self._zero3(slot.mask)
                continue
            keep = slot.mask.keep_like(param.data)  # this parameter's only unpacked keep, for this call
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:  # ZeRO-1/2 bf16 optimizer: this rank's flat fp32 fragment
                address = mapping.lp_fragment_address
                keys = (None, *ADAM_STATES) if mapping.optim_fragment else (None,)  # moments linked after a step
                for key in keys:
                    fragment = mapping.get_hp_fragment(key) if key else mapping.get_hp_fragment()
                    fragment.view(-1).mul_(slot.fragment_keep(keep, fragment, address))
            elif not hasattr(param, "_hp_mapping"):  # plain torch optimizer owns the state
                for key in ADAM_STATES:
                    state = self.optimizer.state.get(param, {}).get(key)
                    if state is not None:
                        state.mul_(keep)
            param.data.mul_(keep)

    @staticmethod
    def _zero3(keep: KeepMask) -> None:
        """This rank's partition: fp32 master, Adam moments, the partitioned weight (and a persistent weight)."""
        local: dict[tuple, Tensor] = {}  # this parameter's unpacked local keep, per (device, dtype), this call only

        def zero(tensor: Tensor) -> Tensor:
            key = (tensor.device, tensor.dtype)
            if key not in local:
                local[key] = keep.local_keep(tensor)
            tensor.view(-1).mul_(local[key])
            return tensor

        param = keep.param
        offloaded = _offloaded_partition(param)
        if offloaded is not None:
            for tensor in offloaded:
                zero(tensor)
        else:
            from deepspeed.utils import (
                safe_get_local_fp32_param,
                safe_get_local_optimizer_state,
                safe_set_local_fp32_param,
                safe_set_local_optimizer_state,
            )

            safe_set_local_fp32_param(param, zero(safe_get_local_fp32_param(param)))
            for key in ADAM_STATES:
                safe_set_local_optimizer_state(param, zero(safe_get_local_optimizer_state(param, key)), key)
        zero(param.ds_tensor.data)
        if keep.bits is not None and param.data.numel() == keep.numel:  # a persistent (never partitioned) one
            param.data.mul_(keep.keep_like(param.data))

    @torch.no_grad()
    def revived(self) -> int:
        """Number of non-zero masked entries in this rank's copy of the model weights (a ZeRO-3 partition's
        padding, uninitialised on the last rank, is not a weight and is not counted)."""
        total = 0
        for slot in self.slots:
            param, mask = slot.param, slot.mask
            if hasattr(param, "ds_id"):
                local = param.ds_tensor.data.view(-1)[:mask.local_valid]
                total += int(((local != 0) & (mask.local_keep(local)[:mask.local_valid] == 0)).sum())
            else:
                total += int(((param.data != 0) & (mask.keep_like(param.data) == 0)).sum())
        return total

    def held_bytes(self) -> int:
        """Bytes of the mask tensors this enforcer and the live gradient hooks of its parameters keep alive, each
        storage counted once."""
        storages = {}
        for slot in self.slots:
            tensors = slot.mask.tensors() + ([slot.fragment_bits] if slot.fragment_bits is not None else [])
            hook = keep_mask_of(slot.param)
            if hook is not None and hook is not slot.mask:
                tensors += hook.tensors()
            for tensor in tensors:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def _offloaded_partition(param: nn.Parameter) -> list[Tensor] | None:
    """ZeRO-3 with offload_optimizer: views of this rank's fp32 master and Adam moments of `param` in the
    optimizer's CPU flat buffers, to zero in place. DeepSpeed's safe_get/set_local_* copy each of the three to
    the GPU and back, with a stream synchronize each time (stage3.py get_local_fp32_param / set_local_hp_param):
    about 24 B per weight over PCIe per step. The CPU step is synchronous, so nothing is in flight here. None
    where this does not apply (no offload, NVMe-swapped subgroups) or DeepSpeed's internals differ: the safe
    API then does the same work, slower."""
    opt = getattr(param, "_z3_optimizer", None)
    if opt is None or not getattr(opt, "offload_optimizer", False):
        return None
    try:
        group, offset, numel = opt.grad_position[opt.get_param_id(param)]
        if opt._swappable_optimizer_subgroup(group):
            return None
        flat = opt.fp32_partitioned_groups_flat[group]
        state = opt.optimizer.state.get(flat, {})
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        log.debug("offloaded ZeRO-3 partition not reachable directly (%s): using DeepSpeed's accessors", e)
        return None
    return [t.narrow(0, offset, numel) for t in (flat, *(state[k] for k in ADAM_STATES if k in state))]
