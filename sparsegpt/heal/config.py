"""The fine-tuning configuration (`FinetuneConfig`): one module that the trainer, its checkpoints and the DeepSpeed
configuration all import, so none of them imports another for it."""

from __future__ import annotations

from dataclasses import dataclass

from sparsegpt.core.errors import UserError
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.enforce import ENFORCEMENT
from sparsegpt.heal.lora import LoraSettings

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. `kd`: distill from a teacher (on when a logit/hidden weight is > 0); `lora`: train
    sparse-merging LoRA adapters instead of the weights. `mask_enforcement`: "full" (hooks + post-step
    re-zeroing); the partial modes ("hooks", "step", "none") exist for benchmarks and negative-control tests only."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    kd: KDConfig | None = None
    lora: LoraSettings | None = None
    checkpoint_every: int = 0
    checkpoint_final: bool = True  # also after the last step (the scheduler, which saves the model next, does not)
    log_every: int = 10
    mask_enforcement: str = "full"

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "lr": self.lr}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"finetune {name} must be > 0, got {value}")
        for name in ("weight_decay", "warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise UserError(f"finetune {name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.steps:
            raise UserError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}; use at most {self.steps}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}")
        if self.mask_enforcement not in ENFORCEMENT:
            raise UserError(f"mask_enforcement {self.mask_enforcement!r} is unknown; use one of {ENFORCEMENT}")

    @property
    def distills(self) -> bool:
        """Whether KD is on: kd is set and weights the logit or hidden-state term > 0."""
        return self.kd is not None and (self.kd.logit_weight > 0 or self.kd.hidden_weight > 0)
