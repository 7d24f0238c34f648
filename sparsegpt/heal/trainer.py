"""transformers `Trainer` (and TRL `SFTTrainer`) integration: `SparseMaskCallback` keeps a mask exact through the
Trainer's own loop, and `DistillationMixin` / `DistillingTrainer` add logit-KD / SquareHead to its loss.

Why a callback is exact here (transformers 5.x `Trainer._run_epoch` / `_prepare_for_training`):
- `on_train_begin` runs after `_prepare_for_training`: `deepspeed_init` and `accelerator.prepare` have wrapped,
  partitioned and cast the model, built the (DeepSpeed) optimizer, and a `resume_from_checkpoint` has loaded the
  weights and optimizer state. The guard attaches there, so its keeps take the weights' final layout and the
  enforcer reaches the restored fp32 masters and moments.
- Gradient accumulation: each micro-batch's backward fires the gradient hooks before the gradient is accumulated
  (or reduce-scattered by ZeRO), so the accumulated gradient is 0 at pruned positions whatever the count.
  Gradient checkpointing recomputes the forward inside backward; the weights' gradients still go through the
  hooked parameters.
- `on_optimizer_step` runs once per optimizer step, right after the update: under plain PyTorch / accelerate after
  `optimizer.step()`; under DeepSpeed the Trainer's `optimizer.step()` is a no-op wrapper and the engine stepped
  inside `accelerator.backward` of the boundary micro-batch, which precedes it. It runs before the scheduler, the
  logging and the checkpoint save of that step, so every saved checkpoint holds enforced state. An fp16 step that
  the loss scaler skipped changed nothing; enforcing again is a no-op.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from torch import nn
from transformers import Trainer, TrainerCallback

from sparsegpt.core.errors import UserError
from sparsegpt.heal.distill import KDConfig, check_compatible, kd_loss, prepare_teacher, release_teacher
from sparsegpt.heal.guard import MaskGuard, MaskSource

log = logging.getLogger(__name__)


class SparseMaskCallback(TrainerCallback):
    """`Trainer(..., callbacks=[SparseMaskCallback(mask)])`: every pruned weight stays exactly 0 in the weights,
    fp32 masters and both Adam moments (see the module docstring for why the hooks it uses are the exact ones).

    `mask`: anything `guard.load_mask` reads (a pruned model folder, a run's stage folder, a compact checkpoint, a
    mask.safetensors, a MaskSet), or None for the exact zeros of the Trainer's model when training begins.
    `verify_at_end`: gather and check every pruned entry when training ends (UserError naming what drifted).
    The gradient hooks come off when training ends; after an exception in `train`, `callback.guard.detach()`."""

    def __init__(self, mask: MaskSource = None, *, verify_at_end: bool = True):
        self.guard = MaskGuard(mask)
        self.verify_at_end = verify_at_end

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer: Any = None,
                       **kwargs) -> None:
        if getattr(args, "fsdp", None):
            raise UserError("SparseMaskCallback does not support FSDP (it flattens and shards parameters the mask "
                            "enforcement cannot address); use DeepSpeed ZeRO-3: TrainingArguments(deepspeed=...)")
        self.guard.attach(model, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.guard.step()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.verify_at_end:
            report = self.guard.verify()
            log.info("mask exact after training: %s", report)
        self.guard.detach()


def cpu_deepspeed_arguments() -> dict[str, Any]:
    """Extra `TrainingArguments` kwargs for `deepspeed=...` on a machine without CUDA (tests, examples): joins the
    launch's processes over gloo first, which the Trainer would not do (it would count every rank as process 0
    of 1 and DeepSpeed's batch check fails). Call it on every rank before building each `TrainingArguments`
    (it drops the previous Trainer's accelerator state, as `TrainingArguments` itself does); on a machine with
    CUDA it returns {} and does nothing."""
    if torch.cuda.is_available():
        return {}
    AcceleratorState._reset_state(reset_partial_state=False)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # PartialState reads it to start DeepSpeed's process group
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"accelerator_config": {"use_configured_state": True}}


class DistillationMixin:
    """Mix into a `Trainer` subclass (`class KD(DistillationMixin, SFTTrainer)`) to train on
    ce_weight·CE + logit_weight·KL(teacher‖student) + hidden_weight·SquareHead (`distill.kd_loss`).

    The teacher is frozen and placed as `distill.prepare_teacher` does (inference-only ZeRO-3 under the Trainer's
    ZeRO-3 config, where every rank runs each teacher forward; moved to the device otherwise) on the first loss,
    once the Trainer's DeepSpeed config is final, and released when `train` returns. The loss is a per-micro-batch
    mean, so the Trainer divides it by the accumulation steps (`loss_is_scaled_for_ga = False`). It replaces the
    base trainer's loss (and with it TRL's token-accuracy metrics)."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher: nn.Module, kd: KDConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if not (kd.logit_weight > 0 or kd.hidden_weight > 0):
            raise UserError("distillation needs kd.logit_weight or kd.hidden_weight > 0; or use the plain Trainer")
        check_compatible(self.model, teacher, kd)
        self.kd, self._teacher, self._prepared = kd, teacher, None

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """The KD loss of one micro-batch: the student's own CE on the batch's labels (-100 ignored), not the base
        trainer's loss (TRL's fused-head loss returns no differentiable logits), plus the KD terms."""
        if "labels" not in inputs:
            raise UserError("distillation needs labels in every batch (the CE term); use a collator that sets them")
        if self._prepared is None:
            self._prepared = prepare_teacher(self._teacher, self.accelerator)
        hidden = self.kd.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=hidden)
        with torch.no_grad():
            teacher_out = self._prepared(**{k: v for k, v in inputs.items() if k != "labels"},
                                         output_hidden_states=hidden)
        loss, _ = kd_loss(outputs, teacher_out, outputs.loss, self.kd, attention_mask=inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            release_teacher(self._prepared)
            self._prepared = None


class DistillingTrainer(DistillationMixin, Trainer):
    """`Trainer` with KD: `DistillingTrainer(model=..., args=..., teacher=dense, kd=KDConfig(logit_weight=1))`."""
