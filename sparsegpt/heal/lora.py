"""Sparse LoRA: peft adapters on the pruned linears and their merge back without densifying the weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sparsegpt.core import architectures
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet

if TYPE_CHECKING:  # peft is imported where it is used (policy: optional heavy dependencies stay lazy)
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA rank r (>= 1), alpha (scale = alpha / r), dropout, target module names (None = all pruned linears)."""

    r: int
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.r >= 1:
            raise UserError(f"LoRA rank r must be > 0, got {self.r}; for no LoRA leave the LoRA settings out (None)")
        if not self.alpha >= 1:
            raise UserError(f"LoRA alpha must be >= 1 (scale = alpha / r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def _decoder_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module for every module inside the decoder layers."""
    path = architectures.family_of(model).layers_path
    return {f"{path}.{n}": m for n, m in architectures.decoder_layers(model).named_modules() if n}


def _target_names(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the modules to adapt: the prunable linears of the decoder layers, or those matching `targets`.

    A target matches a module whose full name equals it or ends with "." + target (peft's rule). Without targets,
    fused MoE expert matrices are skipped with a warning (LoRA on fused 3-D experts is not supported).
    """
    candidates = _decoder_modules(model)
    if targets is None:
        found = architectures.prunable_linears(model)
        names = [name for name, m in found.items() if not isinstance(m, architectures.ExpertLinear)]
        if len(names) < len(found):
            log.warning("LoRA skips the %d fused expert matrices (LoRA on fused 3-D MoE experts is not supported); "
                        "they stay frozen", len(found) - len(names))
    else:
        names = [name for name in candidates if any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise UserError(f"no module inside the decoder layers matches LoRA targets {targets}; use suffixes of "
                        "linear names such as 'q_proj' or leave targets unset for all pruned linears")
    for name in names:
        if not isinstance(candidates[name], nn.Linear):
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items() if isinstance(m, nn.Linear)})
            instead = f"target nn.Linear modules instead, e.g. {linears}" if linears else \
                "this model has none in its decoder layers, so fine-tune without LoRA"
            raise UserError(f"LoRA target {name} is a {type(candidates[name]).__name__}, not an nn.Linear "
                            f"(sparse LoRA merges into (out, in) Linear weights only); {instead}")
    return names


def add_sparse_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with peft LoRA adapters on the target linears; every base weight is frozen."""
    from peft import LoraConfig, get_peft_model

    names = _target_names(model, settings.targets)
    log.info("adding LoRA r=%d alpha=%s to %d linears", settings.r, settings.alpha, len(names))
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    return get_peft_model(model, config)


def merge_sparse_lora(model: PeftModel, masks: MaskSet | Mapping[str, Tensor]) -> nn.Module:
    """Merge the adapters as W + keep ⊙ (scale·B@A) and return the plain transformers model, zeros unchanged.

    The delta is dense while training; its pruned positions are discarded here, so the merged model has exactly
    the mask's zeros (peft's own `merge_and_unload` would fill them in).
    `masks` is a MaskSet or a dict of plain module names (as in the unwrapped model) -> bool tensor, True = pruned.
    The model must hold full parameters (unwrap it and gather ZeRO-3 shards first).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_sparse_lora needs the PeftModel from add_sparse_lora, got {type(model).__name__}")
    mask_of = masks if isinstance(masks, Mapping) else masks.masks
    # named_modules of the inner model gives the plain names (no "base_model.model." prefix) the masks use
    lora_layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    for name, layer in lora_layers.items():
        _merge_one(name, layer, mask_of.get(name))
    log.info("merged %d LoRA adapters sparsely", len(lora_layers))
    return model.unload()


@torch.no_grad()
def _merge_one(name: str, layer: LoraLayer, mask: Tensor | None) -> None:
    """W ← W + keep ⊙ Σ_adapters delta, in float32, cast back to W's dtype; masked entries must already be 0."""
    weight = layer.get_base_layer().weight
    if hasattr(weight, "ds_id"):
        raise ValueError(f"{name} holds a ZeRO-3 shard; merge LoRA on the unwrapped model with gathered parameters")
    if mask is None:
        raise UserError(f"LoRA adapter on {name} has no mask; pass the stage's masks or target only pruned linears")
    if mask.shape != weight.shape:
        raise UserError(f"mask for {name} is {tuple(mask.shape)} but the weight is {tuple(weight.shape)}")
    if layer.merged:
        raise ValueError(f"LoRA on {name} is already merged densely; merge with merge_sparse_lora only")
    pruned = mask.to(device=weight.device, dtype=torch.bool)
    stray = int(torch.count_nonzero(weight[pruned]))
    if stray:
        raise UserError(f"{name} has {stray} non-zero weights at pruned positions; apply the mask before merging")
    delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
    weight.copy_((weight.float() + delta.masked_fill(pruned, 0.0)).to(weight.dtype))
