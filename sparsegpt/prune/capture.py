"""What each decoder layer receives from the model's own forward: layer 0's input hidden states and, for every
layer, the other positional and keyword arguments the model passes it — attention masks (sliding-window or full,
per layer type), position ids, rotary cos/sin (per layer type for Gemma-3's local/global rope), ALiBi, ...

One pass of the model's forward per batch, with every decoder layer temporarily replaced in its ModuleList by a
stand-in that records its arguments and hands its input straight back; the last stand-in stops the forward. No
layer computes and no hook of a real layer fires; each layer is later replayed with exactly its own arguments.
Tensors the model shares between layers (one mask for all full-attention layers) stay shared when stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from sparsegpt.core.architectures import decoder_layers, final_modules
from sparsegpt.core.errors import UserError
from sparsegpt.core.progress import progress_disabled


@dataclass
class LayerBatch:
    """One batch: the hidden states entering the current layer, and per decoder layer its other arguments."""

    hidden: Tensor
    inputs: list[tuple[tuple, dict] | None]  # per layer: (positional args after the hidden states, keyword args)


class _Captured(Exception):
    """Raised by the last stand-in to stop the model's forward once every layer's arguments are recorded."""


class _CaptureError(Exception):
    """A stand-in was called in a way the driver cannot replay."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place during capture: records its call, returns its input, and reads every other
    attribute (attention_type, self_attn, ...) from the real layer. The real layer stays its child, so code that
    walks the module tree on the first forward (transformers 5.x installs its output-recording hooks, e.g. for
    MoE router logits, that way) still reaches every real module."""

    def __init__(self, layer: nn.Module, record):
        super().__init__()
        self.real = layer
        object.__setattr__(self, "_record", record)

    def forward(self, *args, **kwargs):
        return self._record(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("real"), name)


def to_device(obj, device, memo: dict | None = None):
    """Move tensors inside (nested) tuples/lists/dicts to device; with `memo`, a tensor seen twice moves once."""
    if isinstance(obj, Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # holding obj keeps its id from being reused
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def _no_cache(obj):
    """Replace KV caches by None: calibration forwards never read or fill one."""
    return None if isinstance(obj, Cache) else obj


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, *,
                         batch_size: int | list[int], store_device: torch.device | str) -> list[LayerBatch]:
    """Run the model's own forward per batch of `batch_size` rows (or per batch of each size in a list) with
    stand-ins for `layers`; keep layer 0's hidden states and every layer's other arguments on `store_device`.
    UserError naming the layer class when the forward does not call each layer once, in order, as
    layer(hidden_states, ...)."""
    if input_ids.ndim != 2:
        raise UserError(f"input ids must be (nsamples, seqlen), got shape {tuple(input_ids.shape)}")
    real = list(layers)
    what = f"the decoder layers ({type(real[0]).__name__})"
    state: dict = {}

    def record(index, *args, **kwargs):
        inputs = state["inputs"]
        if len(inputs) != index:
            raise _CaptureError(f"layer {index} was called after {len(inputs)} of the layers before it")
        if not args or not isinstance(args[0], Tensor):
            raise _CaptureError(f"layer {index} was called without its hidden states as first positional argument")
        memo = state["memo"]
        if index == 0:
            state["hidden"] = to_device(args[0], store_device, memo)
        kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.append((to_device(tuple(_no_cache(a) for a in args[1:]), store_device, memo),
                       to_device(kwargs, store_device, memo)))
        if index == len(real) - 1:
            raise _Captured
        return args[0]

    embed_device = model.get_input_embeddings().weight.device
    batches = []
    try:
        for i, layer in enumerate(real):
            layers[i] = _StandIn(layer, partial(record, i))
        for ids in input_ids.split(batch_size):
            state.update(inputs=[], hidden=None, memo={})
            try:
                model(ids.to(embed_device), use_cache=False)
            except _Captured:
                batches.append(LayerBatch(state["hidden"], state["inputs"]))
                continue
            except _CaptureError as e:
                raise UserError(f"cannot capture the inputs of {what}: {e}; the driver replays layers called in "
                                "order as layer(hidden_states, ...)") from None
            except Exception as e:
                if not state["inputs"]:
                    raise  # it failed before reaching the layers: not a capture problem
                raise UserError(f"cannot capture the inputs of {what}: the model's forward failed after layer "
                                f"{len(state['inputs']) - 1} returned its input unchanged ({_first_line(e)}); the "
                                "driver needs layer(hidden_states, ...) -> hidden_states") from e
            raise UserError(f"cannot capture the inputs of {what}: the model's forward called "
                            f"{len(state['inputs'])} of its {len(real)} decoder layers")
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    return batches


def forward_layer(layer: nn.Module, index: int, batch: LayerBatch, device,
                  autocast: torch.dtype | None = None) -> Tensor:
    """Decoder layer `index`'s output hidden states for one batch, called with its own captured arguments; with
    `autocast` (bfloat16) under torch.autocast: matmuls in it over the layer's own weights, the rest as autocast
    keeps it (norms, softmax and the residual stream stay float32 for float32 weights)."""
    args, kwargs = batch.inputs[index]
    dev = torch.device(device)
    with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = layer(batch.hidden.to(dev), *to_device(args, dev), **to_device(kwargs, dev))
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer: nn.Module, index: int, batches: list[LayerBatch], device, store_device,
              autocast: torch.dtype | None = None) -> list[LayerBatch]:
    """Forward every batch through layer `index`; the outputs, in the inputs' dtype, become the next layer's
    inputs."""
    return [replace(b, hidden=forward_layer(layer, index, b, device, autocast).to(store_device, b.hidden.dtype))
            for b in batches]


def release(batches: list[LayerBatch], index: int) -> None:
    """Drop layer `index`'s stored arguments once it will not run again (frees masks only it used)."""
    for b in batches:
        b.inputs[index] = None


def module_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where the module's parameters live (`default` for a module without any, e.g. OLMo's LayerNorm)."""
    param = next(module.parameters(), None)
    return torch.device(default) if param is None else param.device


def synchronize(device) -> None:
    """Wait for queued kernels so wall-clock timings are honest on CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def layerwise_hidden_states(model: nn.Module, input_ids: Tensor, *, device: torch.device | str,
                            batch_size: int = 8, offload: bool = False) -> list[Tensor]:
    """Final hidden states (after the final norm), per batch of `batch_size` rows, on CPU — computed one
    decoder layer at a time on `device`, so models larger than the device can be evaluated."""
    layers = decoder_layers(model)
    store_device = "cpu" if offload else device
    was_training = model.training
    model.eval()
    try:
        batches = capture_layer_inputs(model, layers, input_ids, batch_size=batch_size, store_device=store_device)
        for i, layer in enumerate(tqdm(layers, desc="layerwise forward", disable=progress_disabled())):
            home = module_device(layer)
            layer.to(device)
            batches = run_layer(layer, i, batches, device, store_device)
            release(batches, i)
            layer.to(home)
        hidden = [b.hidden for b in batches]
        for module in final_modules(model):
            home = module_device(module, device)
            module.to(device)
            hidden = [module(h.to(device)).to(store_device) for h in hidden]
            module.to(home)
    finally:
        model.train(was_training)
    return [h.cpu() for h in hidden]
