"""Mask-preserving fine-tuning ("healing") of a pruned model over accelerate: its config and the training loop."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.precision import check_master_weights
from sparsegpt.core.progress import progress_disabled
from sparsegpt.core.signals import Preempted, stop_point
from sparsegpt.core.world import World
from sparsegpt.heal.checkpoint import resume, save_checkpoint
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig, check_compatible, kd_loss, prepare_teacher, release_teacher
from sparsegpt.heal.dsconfig import configure_for_finetune
from sparsegpt.heal.enforce import MaskEnforcer
from sparsegpt.heal.lora import add_sparse_lora, merge_sparse_lora

log = logging.getLogger(__name__)

@dataclass
class FinetuneResult:
    """What a fine-tuning run did: optimizer steps, per-step mean loss, throughput (this run's steps only)."""

    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)


class TrainingDiverged(UserError):
    """The loss became NaN/inf; raised before that step's optimizer update, checkpoints untouched."""

    def __init__(self, step: int, loss: float):
        self.step = step
        super().__init__(f"training diverged: loss is {loss} at step {step}; lower --lr or raise --warmup "
                         "(earlier checkpoints are intact)")


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of cfg.lr for 0-based optimizer step `step`: linear warmup, then cosine/linear/constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress


class DataOrder:
    """Deterministic row order: a fresh `torch.randperm` per epoch, seeded from (seed, epoch), so the data order
    is a pure function of (seed, step) and an interrupted and resumed run sees the same batches."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def rows(self, start: int, count: int) -> Tensor:
        """Row indices of positions [start, start + count) of the endless shuffled stream."""
        out = []
        for pos in range(start, start + count):
            epoch = pos // self.n_rows
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n_rows, generator=gen)
            out.append(self._perm[pos % self.n_rows])
        return torch.stack(out)

    def micro_batch(self, step: int, micro: int, cfg: FinetuneConfig, num_processes: int, rank: int) -> Tensor:
        """Rows of micro-batch `micro` of optimizer step `step` for process `rank` (its shard of the global batch)."""
        global_batch = cfg.micro_batch_size * cfg.grad_accum * num_processes
        start = step * global_batch + (micro * num_processes + rank) * cfg.micro_batch_size
        return self.rows(start, cfg.micro_batch_size)


# -- the training loop ---------------------------------------------------------------------------------------------

def _validate(model: nn.Module, train_ids: Tensor, masks: MaskSet, cfg: FinetuneConfig, accelerator: Accelerator,
              teacher: nn.Module | None, ckpt_dir: Path | None) -> None:
    """Every check that can fail before step 1."""
    if train_ids.dim() != 2 or train_ids.dtype not in (torch.int64, torch.int32):
        raise UserError(f"train_ids must be a 2-D integer tensor (rows, seqlen), got {train_ids.dtype} "
                        f"{tuple(train_ids.shape)}")
    need = cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes
    if train_ids.shape[0] < need:
        raise UserError(f"train_ids has {train_ids.shape[0]} rows but one optimizer step needs {need} "
                        "(micro_batch × grad_accum × processes); add data or lower the batch settings")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and int(train_ids.max()) >= vocab:
        raise UserError(f"train_ids holds token id {int(train_ids.max())} >= the model's vocab {vocab}; "
                        "tokenize with the model's tokenizer")
    masks.check_shapes(model)
    if cfg.distills and teacher is None:
        raise UserError("KD weights (kd.logit_weight / kd.hidden_weight > 0) need a teacher model; pass one "
                        "(sparsegpt finetune --kd DENSE_DIR) or set kd to None")
    if teacher is not None and not cfg.distills:
        raise UserError("a teacher was given but KD is off (kd is None or its logit_weight and hidden_weight are 0); "
                        "set kd.logit_weight or kd.hidden_weight > 0, or pass no teacher")
    if cfg.checkpoint_every and ckpt_dir is None:
        raise UserError(f"checkpoint_every={cfg.checkpoint_every} needs a checkpoint directory (ckpt_dir)")


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the method's name changed in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def finetune(model: nn.Module, train_ids: Tensor, masks: MaskSet, cfg: FinetuneConfig, *, accelerator: Accelerator,
             teacher: nn.Module | None = None, ckpt_dir: str | os.PathLike | None = None) -> FinetuneResult:
    """Fine-tune `model` in place on packed causal-LM blocks with its pruned weights held at exactly 0."""
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    _validate(model, train_ids, masks, cfg, accelerator, teacher, ckpt_dir)
    stage = configure_for_finetune(accelerator, cfg, model)
    kd = cfg.kd if cfg.distills else None
    if kd is not None:
        check_compatible(model, teacher, kd)
    trainable = model
    if cfg.lora is not None:
        if stage == 3:
            raise UserError("LoRA under ZeRO-3 cannot merge sparsely (the base weights are sharded); "
                            "use ZeRO-2 or DDP with LoRA (the adapters are small)")
        trainable = add_sparse_lora(model, cfg.lora)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    params = [p for p in trainable.parameters() if p.requires_grad]
    check_master_weights({p.dtype for p in params}, zero_stage=stage, mixed_precision=accelerator.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, optimizer = accelerator.prepare(trainable, optimizer)
    # after prepare: the hooks' masks take the weights' final device and dtype
    hooks = masks.grad_hooks(model) if cfg.mask_enforcement in ("full", "hooks") else []
    teacher_engine = None
    try:
        if kd is not None:
            teacher = teacher_engine = prepare_teacher(teacher, accelerator)
        start, losses = resume(accelerator, ckpt_dir, cfg)
        enforcer = MaskEnforcer(model, masks, optimizer)
        revived = int(accelerator.reduce(torch.tensor(enforcer.revived(), device=accelerator.device), "sum"))
        if revived:
            raise UserError(f"{revived} masked weights are non-zero before training; the mask does not belong to "
                            "this model (use the mask saved with it, or apply it first)")
        step_enforce = cfg.mask_enforcement in ("full", "step")
        result = _train(engine, optimizer, train_ids, cfg, accelerator, teacher, kd, ckpt_dir, start, losses,
                        enforcer if step_enforce else None)
    finally:
        for handle in hooks:
            handle.remove()
        release_teacher(teacher_engine)
    if cfg.lora is not None:
        merge_sparse_lora(trainable, masks)
    return result


def _train(engine: nn.Module, optimizer: torch.optim.Optimizer, train_ids: Tensor, cfg: FinetuneConfig,
           accelerator: Accelerator, teacher: nn.Module | None, kd: KDConfig | None, ckpt_dir: Path | None,
           start: int, losses: list[float], enforcer: MaskEnforcer | None) -> FinetuneResult:
    """The optimizer-step loop from step `start` to cfg.steps."""
    order = DataOrder(train_ids.shape[0], cfg.seed)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes * train_ids.shape[1]
    no_bar = not accelerator.is_main_process or progress_disabled()
    with tqdm(total=cfg.steps, initial=start, desc="finetune", disable=no_bar) as bar:
        engine.train()
        step_seconds = []
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = _optimizer_step(engine, optimizer, train_ids, order, step, cfg, accelerator, teacher, kd)
            if enforcer is not None:
                enforcer()
            losses.append(step_loss)
            step_seconds.append(time.perf_counter() - t0)
            done = step + 1
            tok_s = len(step_seconds) * tokens_per_step / sum(step_seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                log.info("step %d/%d loss %.4f lr %.3e tok/s %.0f", done, cfg.steps, step_loss, lr, tok_s)
            periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            saved = cfg.checkpoint_every and (cfg.checkpoint_final if done == cfg.steps else periodic)
            if saved:
                save_checkpoint(accelerator, ckpt_dir, cfg, done, losses)
            failpoint("finetune/step")
            try:  # a stop request (SIGTERM, SIGUSR1, Ctrl-C on any rank): every rank stops after this step
                if done < cfg.steps:
                    stop_point(World.current(), f"after fine-tuning step {done}/{cfg.steps}")
            except Preempted as e:
                if ckpt_dir is not None and not saved:
                    save_checkpoint(accelerator, ckpt_dir, cfg, done, losses)
                e.where += ", its checkpoint written" if ckpt_dir is not None else " (no ckpt_dir: steps not kept)"
                raise
    seconds = sum(step_seconds)
    return FinetuneResult(steps=cfg.steps, final_loss=losses[-1], losses=losses,
                          tokens_per_s=len(step_seconds) * tokens_per_step / seconds if step_seconds else 0.0,
                          seconds=seconds, step_seconds=step_seconds)


def _optimizer_step(engine: nn.Module, optimizer: torch.optim.Optimizer, train_ids: Tensor, order: DataOrder,
                    step: int, cfg: FinetuneConfig, accelerator: Accelerator, teacher: nn.Module | None,
                    kd: KDConfig | None) -> float:
    """One optimizer step over cfg.grad_accum micro-batches; returns the loss averaged over them and the processes."""
    step_loss = 0.0
    for micro in range(cfg.grad_accum):
        rows = order.micro_batch(step, micro, cfg, accelerator.num_processes, accelerator.process_index)
        batch = train_ids[rows].to(accelerator.device)
        with accelerator.accumulate(engine):
            loss = _loss(engine, teacher, kd, batch)
            mean = float(accelerator.reduce(loss.detach().float(), "mean"))  # same value, same decision, every rank
            if not math.isfinite(mean):
                raise TrainingDiverged(step + 1, mean)
            step_loss += mean / cfg.grad_accum
            accelerator.backward(loss)  # under DeepSpeed this also clips and steps at the accumulation boundary
            if accelerator.sync_gradients and cfg.max_grad_norm and accelerator.deepspeed_plugin is None:
                accelerator.clip_grad_norm_(engine.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step_loss


def _loss(engine: nn.Module, teacher: nn.Module | None, kd: KDConfig | None, batch: Tensor) -> Tensor:
    """Causal-LM loss of one micro-batch (labels = inputs; the model shifts), plus KD terms when distilling."""
    hidden = kd is not None and kd.hidden_weight > 0
    out = engine(input_ids=batch, labels=batch, output_hidden_states=hidden)
    if kd is None:
        return out.loss
    with torch.no_grad():
        teacher_out = teacher(input_ids=batch, output_hidden_states=hidden)
    loss, _ = kd_loss(out, teacher_out, out.loss, kd)
    return loss
