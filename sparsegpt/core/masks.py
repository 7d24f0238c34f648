"""The mask set: which weights of the prunable linears are pruned (True = pruned, weight exactly 0).

Masks are kept on the CPU in (out, in) layout, whatever the module stores (GPT-2 `Conv1D` is (in, out)), one
per prunable matrix: a linear, or one expert of a fused MoE experts parameter (`...experts.gate_up_proj.3`,
see `architectures`). On disk they take 1 bit per weight: one `np.packbits` uint8 tensor per mask in a
safetensors file whose metadata holds the shapes. `grad_hooks` keeps training from reviving pruned weights: the
gradient is zeroed at masked positions before anything accumulates or reduces it, so optimizer moments and
updates stay 0 there. Training sees parameters, so `param_masks` stacks a fused parameter's per-expert masks
into one mask in the parameter's own 3-D layout. Each hook is a `KeepMask`, which the post-step enforcer shares:
packed bits (the whole weight's where the rank holds it whole, this rank's partition's under ZeRO-3), unpacked
for one parameter at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from sparsegpt.core.architectures import (
    ExpertLinear,
    linear_by_name,
    linear_shape,
    param_shape,
    prunable_linears,
    weight_as_linear,
)
from sparsegpt.core.atomic import atomic_file
from sparsegpt.core.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "sparsegpt-mask-v1"
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)  # set bits of each byte value


def mask_in_param_layout(module: nn.Module | ExpertLinear, mask: Tensor) -> Tensor:
    """The (out, in) mask laid out like `module.weight`: transposed for GPT-2 Conv1D; for one expert, the whole
    fused (experts, out, in) parameter's shape with only that expert's slice set (others kept)."""
    if isinstance(module, ExpertLinear):
        full = torch.zeros(param_shape(module.weight), dtype=torch.bool, device=mask.device)
        full[module.index] = mask.t() if module.transposed else mask
        return full
    return mask.t() if isinstance(module, Conv1D) else mask


def param_name(name: str, module: nn.Module | ExpertLinear) -> str:
    """The qualified parameter (state-dict key) a mask covers: `NAME.weight`, or the fused experts parameter."""
    return name.rpartition(".")[0] if isinstance(module, ExpertLinear) else f"{name}.weight"


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor flattened and packed 8 entries per uint8 byte, first entry in the high bit (np.packbits)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The first `numel` entries packed by `pack_bits`, as a flat bool tensor on packed's device."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(-1)[:numel].bool()


def unpack_keep(packed: Tensor, numel: int, like: Tensor) -> Tensor:
    """The keep multiplier (1 = kept, 0 = pruned) of the first `numel` entries packed by `pack_bits` (bits are
    pruned), flat, on like's device and in its dtype: one table lookup per byte (2-3x faster than `unpack_bits`
    and a cast; no bool temporary)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.int32, device=like.device)
    table = (((torch.arange(256, dtype=torch.int32, device=like.device)[:, None] >> shifts) & 1) == 0).to(like.dtype)
    return table.index_select(0, packed.to(like.device).int()).view(-1)[:numel]


class KeepMask:
    """The keep multiplier (1 = kept, 0 = pruned) of one masked parameter: its gradient hook (an instance is the
    hook) and the state `MaskEnforcer` re-zeroes with, shared by both. It holds packed bits only, 1 bit per
    weight (DESIGN.md's mask budget: an unpacked keep in the weight's dtype was 2-4 B per weight on every rank);
    an unpacked keep exists only inside one call, for one parameter at a time.

    A parameter every rank holds whole (no ZeRO-3, or a ZeRO-3 persistent one) gets `bits`, the whole mask on
    the parameter's device (`keep_like`). A ZeRO-3 partitioned one gets `local_bits`: the pruned bits of this
    rank's partition [rank*n, (rank+1)*n) of the flattened, padded parameter (padding counts as pruned; the first
    `local_valid` entries are real weights), unpacked by `local_keep`, or by `full_keep` in the hook, which sees
    the gathered parameter's full-size gradient."""

    def __init__(self, param: nn.Parameter, mask: Tensor):
        self.param, self.numel = param, mask.numel()
        self.bits: Tensor | None = None
        self.local_bits: Tensor | None = None
        self.local_numel = self.local_valid = 0
        self._local_copies: dict[torch.device, Tensor] = {}
        if hasattr(param, "ds_id"):
            from deepspeed import comm as dist

            n = param.ds_tensor.numel()
            start = dist.get_rank(group=param.ds_process_group) * n
            local = torch.ones(n, dtype=torch.bool)
            piece = mask.reshape(-1)[start:start + n]
            local[:piece.numel()] = piece
            self.local_bits, self.local_numel = pack_bits(local).to(param.ds_tensor.device), n
            self.local_valid = piece.numel()
            if param.data.numel() != self.numel:  # partitioned away: no rank holds this weight whole
                return
        self.bits = pack_bits(mask.cpu()).to(param.device)

    def tensors(self) -> list[Tensor]:
        """The tensors this keep holds alive."""
        return [t for t in (self.bits, self.local_bits, *self._local_copies.values()) if t is not None]

    def keep_like(self, like: Tensor) -> Tensor:
        """The whole parameter's keep multiplier shaped like `like` (the weight or its gradient), on its device and
        in its dtype (a fresh tensor)."""
        return unpack_keep(self.bits, self.numel, like).view(like.shape)

    def local_keep(self, like: Tensor) -> Tensor:
        """ZeRO-3: this rank's flat keep multiplier on like's device, in its dtype (a fresh tensor). The bits are
        copied to a new device once (the offloaded fp32 partition lives on the CPU), not on every call."""
        bits = self.local_bits
        if bits.device != like.device:
            if like.device not in self._local_copies:
                self._local_copies[like.device] = bits.to(like.device)
            bits = self._local_copies[like.device]
        return unpack_keep(bits, self.local_numel, like)

    def full_keep(self, like: Tensor) -> Tensor:
        """ZeRO-3: the whole parameter's flat keep multiplier, gathered from every rank's bits (a collective)."""
        from deepspeed import comm as dist

        group = self.param.ds_process_group
        bits = self.local_bits.to(like.device)
        parts = [torch.empty_like(bits) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, bits, group=group)
        pruned = torch.cat([unpack_bits(part, self.local_numel) for part in parts])[:self.numel]
        del parts
        return (~pruned).to(like.dtype)

    def __call__(self, grad: Tensor) -> Tensor:
        """The gradient hook: zero the masked entries of `grad` in place."""
        if self.bits is not None and grad.numel() == self.numel:
            return grad.mul_(self.keep_like(grad))
        if self.local_bits is None or grad.numel() != self.numel:
            raise RuntimeError(f"mask hook got a gradient of shape {tuple(grad.shape)} for a parameter of "
                               f"{self.numel} elements")
        return grad.mul_(self.full_keep(grad).view(grad.shape))


@contextlib.contextmanager
def _gathered(param: Tensor) -> Iterator[None]:
    """The whole parameter for the duration, also when ZeRO-3 has partitioned it (a collective then: every rank
    must enter, in the same order); nothing to do otherwise."""
    if not hasattr(param, "ds_id"):
        yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters([param], modifier_rank=None):
        yield


def keep_mask_of(param: Tensor) -> KeepMask | None:
    """The `KeepMask` gradient hook registered on `param` by `MaskSet.grad_hooks`, if any (and not removed)."""
    hooks = getattr(param, "_backward_hooks", None) or {}
    return next((hook for hook in hooks.values() if isinstance(hook, KeepMask)), None)


class PackedMasks(MutableMapping[str, Tensor]):
    """Module name -> bool mask, held packed at 1 bit per weight (as on disk): every rank of a job keeps a
    MaskSet, so an unpacked bool (8x larger) per rank would be the largest host buffer after the model. Each
    lookup unpacks a fresh CPU tensor (no one shares it); storing a mask packs it (the pruning pass collects its
    masks here, one linear at a time); the pruned counts are kept, so sparsity needs no unpacking."""

    def __init__(self) -> None:
        self._packed: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._pruned: dict[str, int] = {}

    def add(self, name: str, mask: Tensor) -> None:
        # count_nonzero: a bool tensor's sum() would first promote it to an int64 copy, 8 bytes per weight
        self.add_packed(name, pack_bits(mask.cpu()), tuple(mask.shape), int(torch.count_nonzero(mask)))

    def add_packed(self, name: str, packed: Tensor, shape: tuple[int, ...], pruned: int) -> None:
        self._packed[name], self._shapes[name], self._pruned[name] = packed, tuple(shape), pruned

    def __getitem__(self, name: str) -> Tensor:
        numel = int(np.prod(self._shapes[name]))
        bits = np.unpackbits(self._packed[name].numpy(), count=numel)
        return torch.from_numpy(bits.view(np.bool_)).reshape(self._shapes[name])

    def __setitem__(self, name: str, mask: Tensor) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise UserError(f"mask for {name} must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        self._packed.pop(name, None)  # a re-stored name moves to the end, as in a dict
        self.add(name, mask)

    def __delitem__(self, name: str) -> None:
        del self._packed[name], self._shapes[name], self._pruned[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def shape(self, name: str) -> tuple[int, int]:
        return self._shapes[name]

    def pruned(self, name: str) -> int:
        return self._pruned[name]

    def packed(self, name: str) -> Tensor:
        return self._packed[name]

    def nbytes(self) -> int:
        """Bytes of the packed masks held."""
        return sum(t.numel() for t in self._packed.values())


class MaskSet:
    """Module name -> bool mask (CPU, (out, in), True = pruned) for the prunable linears of one model; `masks`
    maps names to masks (unpacked on lookup, held 1 bit per weight)."""

    def __init__(self, masks: Mapping[str, Tensor]):
        if isinstance(masks, PackedMasks):  # already packed (and checked when stored): adopted as is
            self.masks = masks
            return
        self.masks = PackedMasks()
        for name, mask in masks.items():
            self.masks[name] = mask

    @classmethod
    def from_model(cls, model: nn.Module, include: str | None = None, exclude: str | None = None, *,
                   routers: bool = False, shared_experts: bool = False) -> MaskSet:
        """The exact zeros of every prunable matrix (`architectures.prunable_linears` with the same arguments)."""
        masks = {}
        for name, module in prunable_linears(model, include, exclude, routers=routers,
                                             shared_experts=shared_experts).items():
            with _gathered(module.weight):  # a ZeRO-3 partition: every rank gathers one weight at a time
                masks[name] = (weight_as_linear(module) == 0).cpu()
        if not masks:
            raise UserError(f"no prunable linear matches include={include!r} exclude={exclude!r}; loosen the filters")
        return cls(masks)

    def modules(self, model: nn.Module) -> dict[str, nn.Module | ExpertLinear]:
        """The masked modules (or expert slices) of `model`, by name; UserError when one is missing."""
        found = {name: linear_by_name(model, name) for name in self.masks}
        missing = [name for name, module in found.items() if module is None]
        if missing:
            raise UserError(f"{len(missing)} masked modules are not in the model (first: {missing[0]}); "
                            "use the mask saved with this model")
        return found

    def param_masks(self, model: nn.Module) -> dict[str, tuple[nn.Parameter, Tensor]]:
        """Qualified parameter name -> (parameter, bool mask in the parameter's own layout): Conv1D transposed, a
        fused experts parameter as one (experts, out, in) mask stacked from its experts' masks (an expert without
        a mask is all kept). One entry per parameter, so hooks and enforcement touch each parameter once."""
        return {key: (param, mask) for key, param, mask in self.iter_param_masks(model)}

    def iter_param_masks(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        """`param_masks` one parameter at a time: (name, parameter, mask), so at most one stacked fused-experts
        mask exists at a time."""
        groups: dict[str, list[tuple[str, nn.Module | ExpertLinear]]] = {}
        for name, module in self.modules(model).items():
            groups.setdefault(param_name(name, module), []).append((name, module))
        for key, members in groups.items():
            name, module = members[0]
            if not isinstance(module, ExpertLinear):
                yield key, module.weight, mask_in_param_layout(module, self.masks[name])
                continue
            mask = torch.zeros(param_shape(module.weight), dtype=torch.bool)
            for name, expert in members:
                mask[expert.index] = self.masks[name].t() if expert.transposed else self.masks[name]
            yield key, module.weight, mask

    def check_shapes(self, model: nn.Module) -> None:
        """UserError unless every masked module exists and its (out, in) weight shape equals its mask's."""
        for name, module in self.modules(model).items():
            shape = linear_shape(module)
            if shape != self.masks.shape(name):
                raise UserError(f"mask for {name} is {self.masks.shape(name)} but the weight is (out, in) = "
                                f"{shape}; use the mask saved with this model")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the masked weights in place."""
        self.check_shapes(model)
        for name, module in self.modules(model).items():
            weight = weight_as_linear(module)
            weight.masked_fill_(self.masks[name].to(weight.device), 0)

    @torch.no_grad()
    def verify(self, model: nn.Module) -> dict[str, float]:
        """Per-linear sparsity of the model; UserError if any masked weight is non-zero (a revived weight)."""
        self.check_shapes(model)
        sparsity = {}
        for name, module in self.modules(model).items():
            weight = weight_as_linear(module)
            revived = int(torch.count_nonzero(weight[self.masks[name].to(weight.device)]))
            if revived:
                raise UserError(f"{revived} pruned weights of {name} are non-zero; the mask was not preserved "
                                "(apply the mask, or fine-tune with mask enforcement)")
            sparsity[name] = float((weight == 0).float().mean())
        return sparsity

    def sparsity(self) -> float:
        """Fraction of pruned weights over all masked linears."""
        pruned = sum(self.masks.pruned(name) for name in self.masks)
        total = sum(int(np.prod(self.masks.shape(name))) for name in self.masks)
        return pruned / total if total else 0.0

    def per_module(self) -> dict[str, float]:
        """Fraction of pruned weights of each masked linear."""
        return {name: self.masks.pruned(name) / int(np.prod(self.masks.shape(name))) for name in self.masks}

    def grad_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Zero every masked weight's gradient at masked positions as autograd produces it (before accumulation,
        all-reduce or ZeRO partitioning); frozen weights get no hook. Register them once the weights have their
        final device and dtype (after accelerate's prepare): each hook is a `KeepMask`, which holds packed bits and
        multiplies the gradient in place by a keep mask (1 = kept) unpacked for that call in the gradient's dtype
        (faster than masked_fill on CPU; a weight's gradient is a fresh matmul result that nothing else holds).
        Under ZeRO-3 a partitioned weight's hook holds only this rank's bits and gathers the whole mask for the
        duration of one call. One hook per parameter (a fused experts parameter's keep covers all its experts);
        `MaskEnforcer` reuses the hooks' keeps. Remove the returned handles when done."""
        self.check_shapes(model)
        handles = []
        for _, weight, mask in self.iter_param_masks(model):
            if weight.requires_grad:
                handles.append(weight.register_hook(KeepMask(weight, mask)))
        log.debug("registered %d gradient mask hooks", len(handles))
        return handles

    def save(self, path: str | os.PathLike) -> None:
        """Write the masks packed 1 bit per weight (safetensors, shapes in the metadata), atomically."""
        path = Path(path)
        tensors = {name: self.masks.packed(name) for name in self.masks}
        shapes = {name: list(self.masks.shape(name)) for name in self.masks}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read masks written by `save`."""
        if not Path(path).is_file():
            raise UserError(f"mask file {path} does not exist; expected a mask.safetensors written by sparsegpt")
        try:
            return cls._read(path)
        except SafetensorError as e:
            raise UserError(f"mask file {path} is truncated, damaged or not a safetensors file "
                            f"({str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}); restore it "
                            "from the model it was saved with") from e

    @classmethod
    def _read(cls, path: str | os.PathLike) -> MaskSet:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"{path} is not a sparsegpt mask file (format {meta.get('format')!r}, "
                                f"expected {FORMAT!r})")
            shapes = json.loads(meta["shapes"])
            out = cls({})
            for name, shape in shapes.items():
                numel = int(np.prod(shape))
                packed = f.get_tensor(name)
                if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8 or len(shape) != 2:
                    # unpackbits would silently pad a short tensor with "kept"
                    raise UserError(f"{path}: mask {name} holds {packed.numel()} {packed.dtype} values, shape {shape} "
                                    f"needs {(numel + 7) // 8} uint8 bytes; the file is truncated or corrupt")
                pruned = int(_POPCOUNT[packed.numpy()].sum(dtype=np.int64))  # pack_bits pads with 0 = kept
                out.masks.add_packed(name, packed.clone(), tuple(shape), pruned)
        return out
