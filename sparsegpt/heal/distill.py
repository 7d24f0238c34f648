"""Knowledge-distillation losses (logit KL, SquareHead) and the frozen, possibly ZeRO-3-sharded teacher.

The trainer calls `check_compatible` once, `prepare_teacher` once, then per micro-batch runs both models
(`output_hidden_states=True` when `hidden_weight > 0`) and calls `kd_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsegpt.core.errors import UserError

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24  # logits elements per float32 KL chunk (64 MiB): keeps a 50k vocab cheap


@dataclass
class KDConfig:
    """Loss weights: total = ce_weight·CE + logit_weight·KL(teacher‖student)·T² + hidden_weight·SquareHead."""

    logit_weight: float = 0.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    ce_weight: float = 1.0
    layers: str | list[int] = "all"  # decoder layers for SquareHead: "all" or 0-based indices

    def __post_init__(self) -> None:
        for name in ("logit_weight", "hidden_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"KD {name} must be >= 0, got {getattr(self, name)}")
        if self.logit_weight == self.hidden_weight == self.ce_weight == 0:
            raise UserError("KD weights are all 0; set ce_weight, logit_weight or hidden_weight > 0")
        if not self.temperature > 0:
            raise UserError(f"KD temperature must be > 0, got {self.temperature}")
        layers = self.layers
        indices_ok = isinstance(layers, list) and layers and all(isinstance(i, int) and i >= 0 for i in layers)
        if layers != "all" and not indices_ok:
            raise UserError(f"KD layers must be 'all' or a non-empty list of 0-based layer indices, got {layers!r}")


def _chunk_kl_sum(student: Tensor, teacher: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """Σ_rows weight · KL(softmax(teacher/T) ‖ softmax(student/T)), computed in float32."""
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return ((log_t.exp() * (log_t - log_s)).sum(-1) * weight).sum()


def logit_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    attention_mask: Tensor | None = None,
    *,
    chunk_tokens: int | None = None,
) -> Tensor:
    """KL(teacher‖student) of the temperature-softened distributions × T², mean over real tokens (float32).

    Tokens are processed `chunk_tokens` at a time (default: 2**24 logits per chunk); with gradients on, each
    chunk is recomputed in backward, so float32 copies of the full (tokens × vocab) logits never coexist.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(
            f"teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}; "
            "student and teacher need the same vocabulary and batch"
        )
    if not temperature > 0:
        raise UserError(f"KD temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    weight = _token_weights(attention_mask, student_logits.shape[:-1], student.device)
    rows = chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and student.requires_grad
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], rows):
        args = (student[start : start + rows], teacher[start : start + rows], weight[start : start + rows], temperature)
        total = total + (checkpoint(_chunk_kl_sum, *args, use_reentrant=False) if recompute else _chunk_kl_sum(*args))
    return total / weight.sum() * temperature**2


def _token_weights(attention_mask: Tensor | None, token_shape: torch.Size, device: torch.device) -> Tensor:
    """Flat float32 per-token weights (1 = real token) from an optional attention mask; UserError if none is real."""
    if attention_mask is None:
        return torch.ones(token_shape.numel(), dtype=torch.float32, device=device)
    if attention_mask.shape != token_shape:
        raise UserError(f"attention_mask {tuple(attention_mask.shape)} != logits tokens {tuple(token_shape)}")
    weight = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if not weight.any():
        raise UserError("attention_mask marks no real token; KD needs at least one non-padding token")
    return weight


def squarehead(
    student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], attention_mask: Tensor | None = None
) -> Tensor:
    """SquareHead (Kurtic et al. 2023): mean over layers of MSE(student, teacher) / MSE(teacher, 0), float32.

    With an attention mask, both MSEs run over real tokens only (the token count cancels in the ratio).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise UserError(f"SquareHead needs the same non-zero number of layers, got {len(student_hidden)} student "
                        f"and {len(teacher_hidden)} teacher hidden states")
    ratios = []
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise UserError(f"teacher hidden state {tuple(t.shape)} != student hidden state {tuple(s.shape)}")
        s, t = s.float(), t.detach().float()
        w = _token_weights(attention_mask, s.shape[:-1], s.device).view(*s.shape[:-1], 1)
        ratios.append(((s - t).pow(2) * w).sum() / (t.pow(2) * w).sum())
    return torch.stack(ratios).mean()


def _hidden_states(out: Any, layers: str | list[int], who: str) -> tuple[Tensor, ...]:
    """The decoder-layer outputs of a model output (embedding output dropped), restricted to `layers`."""
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise UserError(f"hidden-state KD needs the {who} run with output_hidden_states=True")
    per_layer = tuple(hidden[1:])
    if layers == "all":
        return per_layer
    if max(layers) >= len(per_layer):
        raise UserError(f"KD layers {layers} out of range: the {who} has {len(per_layer)} decoder layers")
    return tuple(per_layer[i] for i in layers)


def kd_loss(
    student_out: Any, teacher_out: Any, ce_loss: Tensor | None, cfg: KDConfig, *, attention_mask: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Weighted KD objective and its parts as floats: "ce", "kd_logit", "kd_hidden" (if weighted) and "loss"."""
    terms: dict[str, tuple[float, Tensor]] = {}
    if cfg.ce_weight > 0:
        if ce_loss is None:
            raise UserError("KD ce_weight > 0 needs the student's cross-entropy loss; pass labels or set ce_weight 0")
        terms["ce"] = (cfg.ce_weight, ce_loss)
    if cfg.logit_weight > 0:
        kl = logit_kl(student_out.logits, teacher_out.logits, cfg.temperature, attention_mask)
        terms["kd_logit"] = (cfg.logit_weight, kl)
    if cfg.hidden_weight > 0:
        hidden = squarehead(
            _hidden_states(student_out, cfg.layers, "student"),
            _hidden_states(teacher_out, cfg.layers, "teacher"),
            attention_mask,
        )
        terms["kd_hidden"] = (cfg.hidden_weight, hidden)
    total = sum(w * value for w, value in terms.values())
    values = torch.stack([v.detach().float() for _, v in terms.values()] + [total.detach().float()]).tolist()
    return total, dict(zip([*terms, "loss"], values))


def _text_config(model: nn.Module) -> Any:
    """The (text) config holding vocab_size / hidden_size / num_hidden_layers."""
    return model.config.get_text_config()


def check_compatible(student: nn.Module, teacher: nn.Module, cfg: KDConfig | None = None) -> None:
    """UserError unless the teacher can teach the student: same vocab; same width/depth for hidden-state KD."""
    s, t = _text_config(student), _text_config(teacher)
    if s.vocab_size != t.vocab_size:
        raise UserError(
            f"teacher vocab {t.vocab_size} != student vocab {s.vocab_size}; distill from a teacher sharing the "
            "student's tokenizer"
        )
    if cfg is None or cfg.hidden_weight == 0:
        return
    for attr in ("hidden_size", "num_hidden_layers"):
        if getattr(s, attr) != getattr(t, attr):
            raise UserError(
                f"teacher {attr} {getattr(t, attr)} != student {attr} {getattr(s, attr)}; hidden-state KD "
                "(hidden_weight > 0) needs equal sizes — use logit KD only (hidden_weight 0)"
            )
    if cfg.layers != "all" and max(cfg.layers) >= s.num_hidden_layers:
        raise UserError(f"KD layers {cfg.layers} out of range: the model has {s.num_hidden_layers} decoder layers")


def teacher_ds_config(ds_config: dict, hidden_size: int) -> dict:
    """Inference-only ZeRO-3 DeepSpeed config for the teacher, derived from the student's (no optimizer, no grads)."""
    zero = ds_config.get("zero_optimization", {})
    inherited = ("offload_param", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                 "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    teacher_zero = {"stage": 3, "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                    "stage3_param_persistence_threshold": 10 * hidden_size}
    teacher_zero.update({k: zero[k] for k in inherited if k in zero and zero[k] != "auto"})
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                              "zero_optimization": teacher_zero}
    for precision in ("bf16", "fp16"):
        if ds_config.get(precision, {}).get("enabled") is True:
            config[precision] = {"enabled": True}
    return config


def prepare_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Freeze the teacher (no grads, eval mode: no dropout) and place it: ZeRO-3-sharded or moved to the device.

    Under DeepSpeed ZeRO-3 the returned object is a DeepSpeed engine: every rank must run each teacher forward.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) != 3:
        # accelerate autocasts only prepared models, and ZeRO-1/2 casts only the student engine's weights: an fp32
        # teacher would run in fp32 beside a bf16 student (2x its memory, slower). bf16: the weights in bf16 (HF
        # norms and softmax upcast inside); fp16: fp32 weights under autocast, as the student's DDP forward runs.
        if accelerator.mixed_precision == "bf16":
            return teacher.to(device=accelerator.device, dtype=torch.bfloat16)
        if accelerator.mixed_precision == "fp16":  # torch's autocast: accelerate's is a no-op under DeepSpeed
            teacher.forward = torch.autocast(accelerator.device.type, dtype=torch.float16)(teacher.forward)
        return teacher.to(accelerator.device)
    misplaced = [(n, p.device) for n, p in teacher.named_parameters()
                 if hasattr(p, "ds_id") and p.device != accelerator.device]
    if misplaced:  # a gather would then copy each weight off the GPU (the multi-GPU crash of issue 24)
        raise RuntimeError(f"ZeRO-3 teacher parameter {misplaced[0][0]} is on {misplaced[0][1]}, not "
                           f"{accelerator.device}: load it with models.load_for_training")
    import deepspeed

    config = teacher_ds_config(plugin.deepspeed_config, _text_config(teacher).hidden_size)
    log.info("sharding the KD teacher with inference-only ZeRO-3: %s", config)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def release_teacher(teacher: nn.Module | None) -> None:
    """Give back what `prepare_teacher` built: a ZeRO-3 teacher engine's hooks and partition coordinator hold the
    model alive until destroyed (each stage builds its own teacher, so each must be released)."""
    destroy = getattr(teacher, "destroy", None)  # DeepSpeedEngine
    if callable(destroy):
        destroy()
