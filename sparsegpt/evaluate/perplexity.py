"""Perplexity (the SparseGPT protocol) with its windows split over the ranks, whole model or one decoder layer at
a time (so no model has to fit one device), and the two helpers every evaluation shares: where the model runs
(`place`) and eval mode without gradients (`eval_mode`).

A world of several ranks (`world.World.current()`): every rank calls `perplexity` / `distributed_perplexity` with
the same windows, evaluates its contiguous share, and one gather of (NLL sum, tokens, windows) gives every rank the
same result. `world.on_every_rank` is that gather's pattern for any step that can fail on some ranks only: a failure
anywhere makes every rank raise, so none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sparsegpt.core.errors import UserError
from sparsegpt.core.world import World, on_every_rank
from sparsegpt.prune.capture import layerwise_hidden_states

T = TypeVar("T")


# -- steps every rank takes together ------------------------------------------------------------------------

# -- perplexity ---------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: `device` (the model is moved there) or, when None, where the model is."""
    if device is None:
        return _model_device(model)
    model.to(device)
    return torch.device(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad (not inference_mode: parameters moved to a device inside must stay trainable)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _logits_batches(model, input_ids, batch_size, device, layerwise) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(window ids, logits) batch by batch, the whole model at once or one decoder layer at a time."""
    if not layerwise:
        dev = place(model, device)
        for ids in input_ids.split(batch_size):
            yield ids, model(ids.to(dev), use_cache=False).logits
        return
    dev = torch.device(device) if device is not None else _model_device(model)
    hidden = layerwise_hidden_states(model, input_ids, device=dev, batch_size=batch_size)
    head = model.get_output_embeddings()
    home = head.weight.device
    head.to(dev)
    try:
        start = 0
        for h in hidden:
            yield input_ids[start:start + h.shape[0]], head(h.to(dev, head.weight.dtype))
            start += h.shape[0]
    finally:
        head.to(home)
    if start != input_ids.shape[0]:
        raise RuntimeError(f"layerwise_hidden_states returned {start} windows for {input_ids.shape[0]} inputs")


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity with what it was computed from: NLL summed over every rank, tokens, each rank's windows."""

    value: float
    nll: float           # summed negative log-likelihood (float64)
    tokens: int          # predicted tokens: windows * (seqlen - 1)
    windows: list[int]   # windows each rank evaluated, in rank order


def _share_nll(model, input_ids, batch_size, device, layerwise) -> tuple[float, int]:
    """NLL sum (float64) and predicted-token count of these windows; (0, 0) for none, without touching the model."""
    if input_ids.shape[0] == 0:
        return 0.0, 0
    nll, count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model):
        for ids, logits in _logits_batches(model, input_ids, batch_size, device, layerwise):
            labels = ids[:, 1:].to(logits.device)
            losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none")
            nll += losses.double().sum().cpu()
            count += labels.numel()
    return nll.item(), count


def distributed_perplexity(model: nn.Module, input_ids: torch.Tensor | Callable[[], torch.Tensor], *,
                           batch_size: int = 4, device: str | torch.device | None = None, layerwise: bool = False,
                           world: World | None = None) -> PerplexityResult:
    """`perplexity` with the (n, seqlen) windows split over the ranks of `world` (default `World.current()`).

    Every rank calls it with the same windows (or a function that loads them: it runs inside the step that catches
    a rank's failure); rank r evaluates `world.share(n)` (a rank may get none), then one gather sums the float64
    NLL sums and token counts in rank order, so every rank returns the same value, equal to one process's up to
    float64 summation order. A gather rather than an all-reduce: it also carries each rank's failure and share."""
    world = world or World.current()

    def own_share() -> tuple[float, int, int]:
        ids = input_ids() if callable(input_ids) else input_ids
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
            raise UserError(f"perplexity needs input_ids shaped (windows, seqlen >= 2), got {tuple(ids.shape)}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if layerwise and getattr(model.config, "final_logit_softcapping", None):
            raise UserError("layerwise perplexity applies only the lm_head, but this model soft-caps its logits; "
                            "use layerwise=False")
        rows = world.share(ids.shape[0])
        return (*_share_nll(model, ids[rows.start:rows.stop], batch_size, device, layerwise), len(rows))

    parts = on_every_rank(world, own_share)
    nll, tokens = math.fsum(p[0] for p in parts), sum(p[1] for p in parts)
    return PerplexityResult(math.exp(nll / tokens), nll, tokens, [p[2] for p in parts])


def perplexity(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 4,
               device: str | torch.device | None = None, layerwise: bool = False, world: World | None = None) -> float:
    """exp(mean NLL) over every predicted token of the (n, seqlen) windows: n·(seqlen−1) predictions. In a world
    of several ranks, every rank calls it and evaluates its share (`distributed_perplexity`)."""
    return distributed_perplexity(model, input_ids, batch_size=batch_size, device=device, layerwise=layerwise,
                                  world=world).value
