"""DeepSpeed/accelerate configuration for fine-tuning: config dicts, plugins, CPU process-group handlers."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from torch import nn

from sparsegpt.config.recipe import Recipe
from sparsegpt.core.architectures import decoder_layers
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import COLLECTIVE_TIMEOUT
from sparsegpt.heal.config import FinetuneConfig

log = logging.getLogger(__name__)


def deepspeed_config(zero_stage: int, offload_optimizer: bool = False, offload_params: bool = False,
                     micro_batch: int | str = "auto", grad_accum: int | str = "auto",
                     max_grad_norm: float | None | str = "auto") -> dict:
    """A DeepSpeed config dict (what recipes/deepspeed/*.json hold); "auto" values are filled by accelerate/finetune.

    bf16/fp16 stay "auto": accelerate fills them from the Accelerator's mixed precision, i.e. the launch's
    --mixed_precision (an accelerate config file naming a deepspeed_config_file must not set mixed_precision:
    accelerate refuses that combination)."""
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise UserError(f"parameter offload needs ZeRO stage 3, got stage {zero_stage}; use zero_stage 3")
    if offload_optimizer and zero_stage == 0:
        raise UserError("optimizer offload needs ZeRO stage 1, 2 or 3; use zero_stage >= 1")
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": "auto",
                     "sub_group_size": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    clip = max_grad_norm if max_grad_norm == "auto" else (max_grad_norm or 0.0)
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": "auto", "gradient_clipping": clip,
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": zero, "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False}


def deepspeed_plugin_from_config(config: dict, *, zero3_init: bool) -> DeepSpeedPlugin:
    """An accelerate `DeepSpeedPlugin` for a ready DeepSpeed config dict (mixed precision comes from the Accelerator).

    `zero3_init`: let from_pretrained build the weights already sharded (deepspeed.zero.Init); only takes effect
    when the config is ZeRO stage 3."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=zero3_init and stage == 3)


def deepspeed_plugin(zero_stage: int, offload_optimizer: bool = False, offload_params: bool = False,
                     micro_batch: int = 1, grad_accum: int = 1, *, max_grad_norm: float | None = 1.0,
                     zero3_init: bool = False) -> DeepSpeedPlugin:
    """An accelerate `DeepSpeedPlugin` for these settings (mixed precision comes from the Accelerator)."""
    config = deepspeed_config(zero_stage, offload_optimizer, offload_params, micro_batch, grad_accum, max_grad_norm)
    return deepspeed_plugin_from_config(config, zero3_init=zero3_init)


def cpu_deepspeed_handlers(deepspeed: bool | None = None,
                           timeout: timedelta = COLLECTIVE_TIMEOUT) -> list[InitProcessGroupKwargs]:
    """Accelerator kwargs_handlers: the collective `timeout` (accelerate otherwise leaves NCCL and DeepSpeed at their
    10-minute defaults, shorter than rank 0 alone saving or verifying a large model while the others wait) and
    the gloo backend for DeepSpeed on a machine without CUDA (without it accelerate counts every rank as process 0
    of 1). `deepspeed` None = as `accelerate launch` said (ACCELERATE_USE_DEEPSPEED)."""
    if deepspeed is None:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    backend = "gloo" if deepspeed and not torch.cuda.is_available() else None
    return [InitProcessGroupKwargs(backend=backend, timeout=timeout)]


def make_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` that leaves the process's TF32 matmul setting as it was: with a dynamo backend and
    mixed_precision "no" on CUDA, accelerate switches TF32 on process-wide (accelerate/state.py), which would
    change the fp32 solver products, calibration forwards and perplexity of every later prune and eval here."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        return Accelerator(**kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def zero3_limits(model: nn.Module) -> dict[str, int]:
    """ZeRO-3's working-set limits sized by the model's largest decoder layer L (in parameters):
    max_live_parameters 2L (the layer being computed and the one prefetched), max_reuse_distance L (a parameter
    is not kept gathered across layers), sub_group_size 2L (the optimizer steps this rank's partition in tiles of
    2L, so the fp32 gradient copy and Adam's temporaries exist for one tile at a time). DeepSpeed's defaults (1e9
    each) keep every parameter of a model below 1 B parameters gathered on every rank from the first forward on
    (the whole model per rank) and step a rank's whole partition at once."""
    layer = max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in decoder_layers(model))
    return {"stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": layer, "sub_group_size": 2 * layer}


def configure_for_finetune(accelerator: Accelerator, cfg: FinetuneConfig, model: nn.Module) -> int:
    """Fill the accelerator's DeepSpeed config "auto" batch/clipping values from cfg (UserError on an explicit
    conflicting value) and, under ZeRO-3, gather 16-bit weights on save and size the working-set limits from
    the model where they are "auto" or unset (`zero3_limits`); returns the ZeRO stage, -1 without
    DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return -1
    ds = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes,
              "gradient_clipping": cfg.max_grad_norm or 0.0}
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3:
        wanted["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = True
        for key, value in zero3_limits(model).items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
        log.info("ZeRO-3 limits: max_live_parameters %d, max_reuse_distance %d, sub_group_size %d",
                 zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"], zero["sub_group_size"])
    for key, value in wanted.items():
        *parents, leaf = key.split(".")
        node = ds
        for parent in parents:
            node = node.setdefault(parent, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif current != value:
            raise UserError(f"DeepSpeed config has {key}={current} but fine-tuning needs {value}; "
                            'set it to "auto" in the DeepSpeed config')
    if stage == 0 and accelerator.mixed_precision == "fp16":
        raise UserError("DeepSpeed without ZeRO keeps fp16 master weights out of reach of mask enforcement; "
                        "use ZeRO stage 1-3, bf16, or plain DDP")
    return stage


def recipe_deepspeed_config(recipe: Recipe, world_size: int) -> dict | None:
    """The DeepSpeed config for a recipe's ZeRO settings, or None for zero_stage 0 (single process / DDP).

    Built on `deepspeed_config` (bucket sizes stay "auto" for accelerate to size from the model) with the batch
    geometry, clipping and precision made explicit."""
    dist = recipe.distributed
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if dist.zero_stage == 0:
        return None
    norms = [s.finetune.max_grad_norm for s in recipe.resolved_stages() if s.finetune is not None]
    config = deepspeed_config(dist.zero_stage, dist.offload_optimizer, dist.offload_params, dist.micro_batch_size,
                              dist.grad_accum, norms[0] if norms else None)  # one value across stages (checked)
    config["train_batch_size"] = dist.micro_batch_size * dist.grad_accum * world_size
    config["bf16"] = {"enabled": dist.mixed_precision == "bf16"}
    config["fp16"] = {"enabled": dist.mixed_precision == "fp16"}
    return config
