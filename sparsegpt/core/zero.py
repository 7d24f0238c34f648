"""ZeRO-3 facts the model loaders need: whether a ZeRO-3 plugin is active, whether `from_pretrained` now builds
partitioned models, and a context for whole (unsharded) models while one is active."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config


def zero3_plugin(accelerator: Accelerator) -> DeepSpeedPlugin | None:
    """The accelerator's DeepSpeed plugin if it runs ZeRO stage 3, else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin if plugin is not None and plugin.zero_stage == 3 else None


def loads_sharded(accelerator: Accelerator) -> bool:
    """Whether `from_pretrained` now builds models already partitioned over the ranks (deepspeed.zero.Init): a
    ZeRO-3 plugin with zero3_init registered its config. Rank 0 then reads the checkpoint and every rank keeps
    only its partition, so no rank ever holds the whole model (nor converts its dtype) in host memory."""
    return zero3_plugin(accelerator) is not None and is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def whole_models(accelerator: Accelerator) -> Iterator[None]:
    """Whole (unsharded) models although a ZeRO-3 plugin is active: loads for the main process's pruning and
    evaluation. transformers loads into zero.Init shards whenever a stage-3 HfDeepSpeedConfig is registered, and
    `generate` then syncs every step with all ranks (`synced_gpus`), which hangs a hook the main process runs
    alone; so the registration is lifted for the duration."""
    plugin = zero3_plugin(accelerator)
    if plugin is None:
        yield
        return
    registered = is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered:
            plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def torch_linear_kept() -> Iterator[None]:
    """torch.nn.functional.linear as it was on entry, restored on exit (usable as a decorator). Entering
    deepspeed.zero.Init with memory_efficient_linear (its default) replaces it process-wide with
    `zero3_linear_wrap` and never restores it (deepspeed/runtime/zero/partition_parameters.py: "This will persist
    unless manually reset"); that wrapper adds the bias after the matmul, so every later prune and evaluation of a
    biased model (OPT, Qwen2's qkv) in this process would differ in the last bits from a fresh process's."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
