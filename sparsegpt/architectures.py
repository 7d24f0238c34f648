"""Per-family facts the calibration driver needs: where the decoder layers live, what runs after them
(final norm, lm_head), and which linears read the same input (so they can share one Hessian).

Only facts live here, no per-family driver code. GPT-2's `Conv1D` stores its weight as (in, out);
`weight_as_linear` / `set_weight_from_linear` hide that so everything else sees (out, in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sparsegpt.errors import UserError

_LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its decoder layers, final modules and same-input linears."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str                            # e.g. "model.layers"
    final_paths: tuple[str, ...]                # applied in order after the last layer; a None attribute is skipped
    lm_head: str
    shared_inputs: tuple[tuple[str, ...], ...]  # names relative to one decoder layer


FAMILIES: tuple[Family, ...] = (
    Family("opt", ("opt",), "model.decoder.layers",
           ("model.decoder.final_layer_norm", "model.decoder.project_out"), "lm_head",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)),
    Family("bloom", ("bloom",), "transformer.h", ("transformer.ln_f",), "lm_head", ()),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", ("model.norm",), "lm_head",
           (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))),
    Family("gpt2", ("gpt2",), "transformer.h", ("transformer.ln_f",), "lm_head", ()),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("gpt_neox.final_layer_norm",), "lm_head", ()),
)


def family_of(model: nn.Module) -> Family:
    """The `Family` of a Hugging Face causal LM, by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise UserError(f"model_type {model_type!r} is not supported; supported families (model_types): {supported}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    return model.get_submodule(family_of(model).layers_path)


def final_modules(model: nn.Module) -> list[nn.Module]:
    """Modules applied to the last decoder layer's output before the lm_head (final norm, OPT's project_out)."""
    modules = []
    for path in family_of(model).final_paths:
        parent, _, attr = path.rpartition(".")
        module = getattr(model.get_submodule(parent), attr)  # AttributeError = a wrong table entry, not user input
        if module is not None:
            modules.append(module)
    return modules


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection to the vocabulary."""
    return model.get_submodule(family_of(model).lm_head)


def compile_filter(pattern: str | None, what: str) -> re.Pattern | None:
    """Compile an --include/--exclude regex; UserError naming the flag when it is invalid."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"--{what} {pattern!r} is not a valid regular expression ({e}); e.g. 'mlp\\.' or 'q_proj|k_proj'")


def prunable_linears(module: nn.Module, include: str | None = None,
                     exclude: str | None = None) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside the decoder layers (or inside `module` if it is not a whole model),
    by qualified name, filtered by regex `include` / `exclude` (re.search on the name)."""
    inc, exc = compile_filter(include, "include"), compile_filter(exclude, "exclude")
    if isinstance(module, PreTrainedModel):
        path = family_of(module).layers_path
        named = ((f"{path}.{n}", m) for n, m in module.get_submodule(path).named_modules())
    else:
        named = module.named_modules()
    return {name: m for name, m in named
            if isinstance(m, _LINEAR_TYPES)
            and (inc is None or inc.search(name)) and not (exc is not None and exc.search(name))}


def weight_as_linear(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view sharing storage (GPT-2 Conv1D stores (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.detach().t()
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def set_weight_from_linear(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an (out, in) weight into the module, transposing for Conv1D and casting to its dtype."""
    current = weight_as_linear(module)
    if tuple(weight.shape) != tuple(current.shape):
        raise UserError(f"weight shape {tuple(weight.shape)} does not match the layer's (out, in) = "
                        f"{tuple(current.shape)}")
    with torch.no_grad():
        current.copy_(weight.to(device=current.device, dtype=current.dtype))
