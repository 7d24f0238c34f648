"""Per-family facts the calibration driver needs: where the decoder layers live, what runs after them
(final norm, lm_head), which linears read the same input (so they can share one Hessian), and which MoE
modules are routers or shared experts (not pruned unless asked).

Only facts live here, no per-family driver code. Every prunable matrix is seen as one (out, in) linear through
`weight_as_linear` / `set_weight_from_linear`: an `nn.Linear`, a GPT-2 `Conv1D` (stored (in, out)), a MoE router
(a module holding a 2-D `weight` it applies as `F.linear`), or one expert's slice of a fused experts parameter
(transformers 5.x keeps all experts of a layer in 3-D `gate_up_proj` / `up_proj` / `down_proj` parameters of
shape (experts, out, in)); the last is an `ExpertLinear` named `<experts module>.<parameter>.<expert index>`,
e.g. `model.layers.0.mlp.experts.gate_up_proj.3`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sparsegpt.core.errors import UserError

_LINEAR_TYPES = (nn.Linear, Conv1D)
FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")  # 3-D (experts, out, in) parameters, input side first


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its decoder layers, final modules, same-input linears and MoE routers."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str                            # e.g. "model.layers"
    final_paths: tuple[str, ...]                # applied in order after the last layer; a None attribute is skipped
    lm_head: str
    shared_inputs: tuple[tuple[str, ...], ...]  # names relative to one decoder layer
    routers: tuple[str, ...] = ()               # MoE routers / gates, relative to a layer: pruned only if asked
    shared_experts: tuple[str, ...] = ()        # always-active experts, relative to a layer: pruned only if asked


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")  # MoE families: their dense-MLP layers (mlp_only_layers)

FAMILIES: tuple[Family, ...] = (
    Family("opt", ("opt",), "model.decoder.layers",
           ("model.decoder.final_layer_norm", "model.decoder.project_out"), "lm_head", (_QKV,)),
    Family("bloom", ("bloom",), "transformer.h", ("transformer.ln_f",), "lm_head", ()),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                     "granite", "cohere", "stablelm"),
           "model.layers", ("model.norm",), "lm_head", (_QKV, _GATE_UP)),
    Family("gpt2", ("gpt2",), "transformer.h", ("transformer.ln_f",), "lm_head", ()),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("gpt_neox.final_layer_norm",), "lm_head", ()),
    Family("phi3", ("phi3",), "model.layers", ("model.norm",), "lm_head", ()),  # fused qkv_proj / gate_up_proj
    Family("phi", ("phi",), "model.layers", ("model.final_layernorm",), "lm_head", (_QKV,)),
    Family("starcoder2", ("starcoder2",), "model.layers", ("model.norm",), "lm_head", (_QKV,)),
    Family("falcon", ("falcon",), "transformer.h", ("transformer.ln_f",), "lm_head", ()),
    Family("moe", ("mixtral", "qwen3_moe", "olmoe"), "model.layers", ("model.norm",), "lm_head", (_QKV, _GATE_UP),
           routers=("mlp.gate",)),
    Family("qwen2_moe", ("qwen2_moe",), "model.layers", ("model.norm",), "lm_head",
           (_QKV, _GATE_UP, ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
           routers=("mlp.gate", "mlp.shared_expert_gate"), shared_experts=("mlp.shared_expert",)),
)


@dataclass(frozen=True, eq=False)
class ExpertLinear:
    """Expert `index`'s (out, in) matrix inside the fused 3-D parameter `param` of an experts module."""

    experts: nn.Module
    param: str
    index: int

    @property
    def weight(self) -> nn.Parameter:
        """The whole fused (experts, out, in) parameter; the expert's own matrix is `weight_as_linear(self)`."""
        return getattr(self.experts, self.param)

    @property
    def transposed(self) -> bool:
        """True when the experts module stores each matrix as (in, out) (`is_transposed`)."""
        return bool(getattr(self.experts, "is_transposed", False))


def family_of(model: nn.Module) -> Family:
    """The `Family` of a Hugging Face causal LM, by `config.model_type`; UserError naming the nearest one otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = [t for f in FAMILIES for t in f.model_types]
    nearest = difflib.get_close_matches(str(model_type), known, n=1, cutoff=0.0)
    supported = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise UserError(f"model_type {model_type!r} is not supported (nearest supported: {nearest[0]!r}); "
                    f"supported families (model_types): {supported}")


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
        raise UserError(f"--{what} {pattern!r} is not a valid regular expression ({e}); "
                        "e.g. 'mlp\\.' or 'q_proj|k_proj'")


def param_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of the module's fused 3-D expert parameters (empty for anything that is not a fused experts module)."""
    return [p for p in FUSED_EXPERT_PARAMS
            if isinstance(getattr(module, p, None), nn.Parameter) and len(param_shape(getattr(module, p))) == 3]


def _is_router(module: nn.Module) -> bool:
    """A router: a module holding a 2-D `weight` (experts, hidden) that it applies as F.linear."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and len(param_shape(weight)) == 2 and not isinstance(module, nn.Embedding)


def _matrices(root: nn.Module, routers: tuple[str, ...]):
    """(relative name, matrix) for every linear, listed router and fused expert slice inside `root`."""
    for name, module in root.named_modules():
        if isinstance(module, _LINEAR_TYPES) or (name in routers and _is_router(module)):
            yield name, module
        for param in fused_expert_params(module):
            for index in range(param_shape(getattr(module, param))[0]):
                yield f"{name}.{param}.{index}", ExpertLinear(module, param, index)


def prunable_linears(module: nn.Module, include: str | None = None, exclude: str | None = None, *,
                     routers: bool = False, shared_experts: bool = False) -> dict[str, nn.Module | ExpertLinear]:
    """Every prunable matrix inside the decoder layers (or inside `module` if it is not a whole model), by
    qualified name: nn.Linear / Conv1D modules and one `ExpertLinear` per expert of each fused experts parameter.
    For a whole model, MoE routers and shared experts (family table) are left out unless `routers` /
    `shared_experts`; then regex `include` / `exclude` filter the names (re.search)."""
    inc, exc = compile_filter(include, "include"), compile_filter(exclude, "exclude")
    if isinstance(module, PreTrainedModel):
        family = family_of(module)
        skip = (() if routers else family.routers) + (() if shared_experts else family.shared_experts)
        wanted = family.routers if routers else ()
        named = ((f"{family.layers_path}.{i}.{n}", m)
                 for i, layer in enumerate(module.get_submodule(family.layers_path))
                 for n, m in _matrices(layer, wanted)
                 if not any(n == s or n.startswith(s + ".") for s in skip))
    else:
        named = _matrices(module, ())
    return {name: m for name, m in named
            if (inc is None or inc.search(name)) and not (exc is not None and exc.search(name))}


def linear_by_name(model: nn.Module, name: str) -> nn.Module | ExpertLinear | None:
    """The module `name` names, or the `ExpertLinear` of `<experts>.<param>.<index>`; None when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    owner, _, rest = name.rpartition(".")
    path, _, param = owner.rpartition(".")
    if not rest.isdigit() or not path:
        return None
    try:
        experts = model.get_submodule(path)
    except AttributeError:
        return None
    if param in fused_expert_params(experts) and int(rest) < param_shape(getattr(experts, param))[0]:
        return ExpertLinear(experts, param, int(rest))
    return None


def linear_shape(module: nn.Module | ExpertLinear) -> tuple[int, int]:
    """The (out, in) shape of a prunable matrix, also when ZeRO-3 has partitioned its parameter away."""
    shape = param_shape(module.weight)
    if isinstance(module, ExpertLinear):
        return shape[:0:-1] if module.transposed else shape[1:]
    return shape[::-1] if isinstance(module, Conv1D) else shape


def weight_as_linear(module: nn.Module | ExpertLinear) -> torch.Tensor:
    """The weight as (out, in), a view sharing storage (GPT-2 Conv1D stores (in, out); an expert is a slice)."""
    if isinstance(module, ExpertLinear):
        weight = module.weight.detach()[module.index]
        return weight.t() if module.transposed else weight
    if isinstance(module, Conv1D):
        return module.weight.detach().t()
    if isinstance(module, nn.Linear) or _is_router(module):
        return module.weight.detach()
    raise TypeError(f"expected nn.Linear, Conv1D, a router or an ExpertLinear, got {type(module).__name__}")


def set_weight_from_linear(module: nn.Module | ExpertLinear, weight: torch.Tensor) -> None:
    """Copy an (out, in) weight into the module (or the expert's slice), transposing where stored (in, out)."""
    current = weight_as_linear(module)
    if tuple(weight.shape) != tuple(current.shape):
        raise UserError(f"weight shape {tuple(weight.shape)} does not match the layer's (out, in) = "
                        f"{tuple(current.shape)}")
    with torch.no_grad():
        current.copy_(weight.to(device=current.device, dtype=current.dtype))
