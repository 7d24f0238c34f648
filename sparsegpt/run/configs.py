"""What a recipe's stage asks of the library: the pruning and trainer configs built from its sections, the
precision `mixed_precision: auto` resolves to, and the Accelerator (with its DeepSpeed plugin) the run uses."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import Accelerator

from sparsegpt.config.recipe import Recipe, ResolvedStage, to_dataclass
from sparsegpt.core.precision import resolve_mixed_precision
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.dsconfig import (
    cpu_deepspeed_handlers,
    deepspeed_plugin_from_config,
    make_accelerator,
    recipe_deepspeed_config,
)
from sparsegpt.heal.lora import LoraSettings
from sparsegpt.prune.sequential import PruneConfig

log = logging.getLogger(__name__)


def prune_config(stage: ResolvedStage) -> PruneConfig:
    """The driver's config for a stage: its prune settings plus its target."""
    return to_dataclass(PruneConfig, stage.prune, sparsity=stage.sparsity, prune_n=stage.prune_n,
                        prune_m=stage.prune_m)


def finetune_config(stage: ResolvedStage, recipe: Recipe, *, world_size: int, seqlen: int,
                    lr: float | None = None) -> FinetuneConfig:
    """The trainer's config for a stage: tokens and warmup_ratio become steps; the seed is recipe seed + index;
    `lr` (required when the stage says `lr: auto`) replaces the recipe's."""
    f, d = stage.finetune, recipe.distributed
    if (lr := f.lr if lr is None else lr) == "auto":
        raise ValueError(f"stage {stage.name} has lr: auto; resolve it (lr_search.search_lr) and pass lr")
    steps = f.num_steps(world_size, micro_batch_size=d.micro_batch_size, grad_accum=d.grad_accum, seqlen=seqlen)
    warmup = f.warmup_steps if f.warmup_ratio is None else round(f.warmup_ratio * steps)
    # no checkpoint after the last step: the stage model is saved right after it (a kill in between redoes the
    # steps since the previous checkpoint, bit for bit), and a 13B checkpoint is ~150 GB written to be deleted
    return to_dataclass(FinetuneConfig, f, steps=steps, warmup_steps=warmup or 0, seed=recipe.seed + stage.index,
                        checkpoint_final=False, lr=lr,
                        micro_batch_size=d.micro_batch_size, grad_accum=d.grad_accum,
                        kd=to_dataclass(KDConfig, f.kd) if f.kd is not None else None,
                        lora=to_dataclass(LoraSettings, f.lora) if f.lora is not None else None)


def with_mixed_precision(recipe: Recipe) -> Recipe:
    """The recipe with `mixed_precision: auto` replaced by what this hardware runs fast (logged); else unchanged.
    The run dir records the picked value, so resuming where `auto` picks another precision is refused (another
    precision is another run), not silently continued in different numerics."""
    if recipe.distributed.mixed_precision != "auto":
        return recipe
    value, why = resolve_mixed_precision("auto", recipe.dtype)
    log.info("mixed precision auto -> %s (%s)", value, why)
    return recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"mixed_precision": value})})


def build_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """An Accelerator whose DeepSpeed plugin (if any) is built from the recipe's `distributed` settings."""
    dist = recipe.distributed
    ds = recipe_deepspeed_config(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    plugin = deepspeed_plugin_from_config(ds, zero3_init=dist.zero_stage == 3) if ds is not None else None
    kwargs = cpu_deepspeed_handlers(deepspeed=plugin is not None)  # + world.COLLECTIVE_TIMEOUT (NCCL's is 10 min)
    return make_accelerator(mixed_precision=dist.mixed_precision, deepspeed_plugin=plugin,
                       gradient_accumulation_steps=dist.grad_accum, kwargs_handlers=kwargs,
                       log_with=list(recipe.trackers) or None, project_dir=str(run_dir / "trackers"))
