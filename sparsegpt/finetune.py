"""Mask-preserving fine-tuning ("healing") over accelerate: single process, DDP, or DeepSpeed ZeRO-1/2/3.

A pruned weight must stay exactly 0. Two independent guards:
1. gradient hooks (`MaskSet.grad_hooks`) zero the gradient at masked positions as autograd produces it, before
   accumulation or ZeRO's reduce-scatter, so Adam's moments, its update and decoupled weight decay all stay 0
   there (fp32 master weights included);
2. after every optimizer step `MaskEnforcer` re-zeroes the masked entries of the fp32 master weights, both Adam
   moments and the (low-precision) model weights, touching only this rank's partition (no gather).
Data order is a pure function of (seed, step), so an interrupted and resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsegpt.errors import UserError
from sparsegpt.failpoints import failpoint
from sparsegpt.masks import MaskSet, mask_in_param_layout
from sparsegpt.models import _write_atomically, atomic_write_text

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
ENFORCEMENT = ("full", "hooks", "step", "none")
ADAM_STATES = ("exp_avg", "exp_avg_sq")
KEEP_CHECKPOINTS = 2


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. `mask_enforcement`: "full" (hooks + post-step re-zeroing); the partial modes
    ("hooks", "step", "none") exist for benchmarks and negative-control tests only."""

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
    kd_logit_weight: float = 0.0
    kd_hidden_weight: float = 0.0
    kd_temperature: float = 1.0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    mask_enforcement: str = "full"

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "lr": self.lr}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"finetune {name} must be > 0, got {value}")
        for name in ("weight_decay", "warmup_steps", "checkpoint_every", "lora_r", "kd_logit_weight",
                     "kd_hidden_weight"):
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
    """Deterministic row order: a fresh `torch.randperm` per epoch, seeded from (seed, epoch)."""

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


def deepspeed_config(zero_stage: int, offload_optimizer: bool = False, offload_params: bool = False,
                     micro_batch: int | str = "auto", grad_accum: int | str = "auto",
                     max_grad_norm: float | None | str = "auto") -> dict:
    """A DeepSpeed config dict (what recipes/deepspeed/*.json hold); "auto" values are filled by accelerate/finetune."""
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


def deepspeed_plugin(zero_stage: int, offload_optimizer: bool = False, offload_params: bool = False,
                     micro_batch: int = 1, grad_accum: int = 1, *, max_grad_norm: float | None = 1.0,
                     zero3_init: bool = False):
    """An accelerate `DeepSpeedPlugin` for these settings (mixed precision comes from the Accelerator)."""
    from accelerate.utils import DeepSpeedPlugin

    config = deepspeed_config(zero_stage, offload_optimizer, offload_params, micro_batch, grad_accum, max_grad_norm)
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=zero3_init and zero_stage == 3)


def cpu_deepspeed_handlers(deepspeed: bool | None = None, timeout=None) -> list:
    """Accelerator kwargs_handlers: the gloo backend for DeepSpeed on a machine without CUDA (without it accelerate
    counts every rank as process 0 of 1), and a collective `timeout` (datetime.timedelta) if given.
    `deepspeed` None = as `accelerate launch` said (ACCELERATE_USE_DEEPSPEED)."""
    if deepspeed is None:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    backend = "gloo" if deepspeed and not torch.cuda.is_available() else None
    if backend is None and timeout is None:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend=backend, timeout=timeout)]


def _configure_deepspeed(accelerator, cfg: FinetuneConfig) -> int:
    """Fill the DeepSpeed config's "auto" batch/clipping values from cfg (UserError on a conflict); its ZeRO stage."""
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


@dataclass
class _Slot:
    """One masked, trainable weight and its keep-multiplier (1 = kept, 0 = pruned) for each copy to re-zero."""

    param: nn.Parameter
    keep: Tensor                # in the param's layout, device and dtype
    flat: Tensor | None = None  # float32 (CPU): this rank's slice of the flattened keep (ZeRO partition / fragment)
    _cache: dict = field(default_factory=dict)

    def flat_like(self, tensor: Tensor) -> Tensor:
        """`flat` on tensor's device and dtype, converted once."""
        key = (tensor.device, tensor.dtype)
        if key not in self._cache:
            self._cache[key] = self.flat.to(device=tensor.device, dtype=tensor.dtype)
        return self._cache[key]


class MaskEnforcer:
    """Re-zeroes masked entries of weights, fp32 master weights and Adam moments after an optimizer step,
    through DeepSpeed's fragment/partition accessors where DeepSpeed owns them, touching only local data.
    Zeroing is a multiply by the keep mask (several times faster than masked_fill_ on CPU; 0 stays 0)."""

    def __init__(self, model: nn.Module, masks: MaskSet, optimizer):
        self.optimizer = optimizer
        self.slots = []
        for name, module in masks.modules(model).items():
            param = module.weight
            if not param.requires_grad:
                continue
            keep = (~mask_in_param_layout(module, masks.masks[name])).float()
            slot = _Slot(param, keep.to(device=param.device, dtype=param.dtype))
            if hasattr(param, "ds_id"):  # ZeRO-3: rank r owns [r*n, (r+1)*n) of the flattened, padded weight
                from deepspeed import comm as dist

                n = param.ds_tensor.numel()
                rank = dist.get_rank(group=param.ds_process_group)
                padded = torch.zeros(n * dist.get_world_size(group=param.ds_process_group))
                padded[: keep.numel()] = keep.flatten()
                slot.flat = padded[rank * n:(rank + 1) * n].clone()
            elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer: a fragment
                address = param._hp_mapping.lp_fragment_address
                slot.flat = keep.flatten()[address.start:address.start + address.numel].clone()
            self.slots.append(slot)

    @torch.no_grad()
    def __call__(self) -> None:
        """Zero every masked entry this rank holds."""
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                self._zero3(slot)
                continue
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                _zero_flat(mapping.get_hp_fragment(), slot)
                if mapping.optim_fragment:  # linked by DeepSpeed after the first real step
                    for key in ADAM_STATES:
                        _zero_flat(mapping.get_hp_fragment(key), slot)
            elif not hasattr(param, "_hp_mapping"):  # plain torch optimizer owns the state
                for key in ADAM_STATES:
                    state = self.optimizer.state.get(param, {}).get(key)
                    if state is not None:
                        state.mul_(slot.keep)
            param.data.mul_(slot.keep)

    @staticmethod
    def _zero3(slot: _Slot) -> None:
        from deepspeed.utils import (safe_get_local_fp32_param, safe_get_local_optimizer_state,
                                     safe_set_local_fp32_param, safe_set_local_optimizer_state)

        param = slot.param
        safe_set_local_fp32_param(param, _zero_flat(safe_get_local_fp32_param(param), slot))
        for key in ADAM_STATES:
            state = safe_get_local_optimizer_state(param, key)
            safe_set_local_optimizer_state(param, _zero_flat(state, slot), key)
        _zero_flat(param.ds_tensor.data, slot)
        if param.data.numel() == slot.keep.numel():  # a persistent (never partitioned away) parameter
            param.data.mul_(slot.keep)

    @torch.no_grad()
    def revived(self) -> int:
        """Number of non-zero masked entries in this rank's copy of the model weights."""
        total = 0
        for slot in self.slots:
            param = slot.param
            if hasattr(param, "ds_id"):
                local = param.ds_tensor.data.flatten()
                total += int(((local != 0) & (slot.flat_like(local) == 0)).sum())
            else:
                total += int(((param.data != 0) & (slot.keep == 0)).sum())
        return total


def _zero_flat(tensor: Tensor, slot: _Slot) -> Tensor:
    """Zero the masked entries of a flat local copy (partition / fragment) of slot's weight in place; returns it."""
    tensor.view(-1).mul_(slot.flat_like(tensor))
    return tensor


# -- checkpoints -------------------------------------------------------------------------------------------------

def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest), oldest first."""
    found = []
    for d in ckpt_dir.glob("step-*"):
        if (d / "manifest.json").is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def _save_checkpoint(accelerator, ckpt_dir: Path, manifest: dict) -> None:
    """accelerator.save_state into step-XXXXXXXX/, then (main process, after a barrier) the manifest, atomically;
    keep the newest KEEP_CHECKPOINTS."""
    target = ckpt_dir / f"step-{manifest['step']:08d}"
    if accelerator.is_main_process and target.exists():
        shutil.rmtree(target)  # an incomplete leftover of a killed run (complete ones are never rewritten)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    failpoint("checkpoint/before-manifest")
    if accelerator.is_main_process:
        atomic_write_text(target / "manifest.json", json.dumps(manifest))
        for _, old in _checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            (old / "manifest.json").unlink()  # first un-complete it, then delete
            shutil.rmtree(old)
        log.info("checkpoint %s", target)
    accelerator.wait_for_everyone()


def _resume(accelerator, ckpt_dir: Path | None, cfg: FinetuneConfig) -> tuple[int, list[float]]:
    """Load the newest complete checkpoint, if any: (steps done, losses so far)."""
    found = _checkpoints(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else []
    if not found:
        return 0, []
    step, path = found[-1]
    manifest = json.loads((path / "manifest.json").read_text())
    expected = {"seed": cfg.seed, "num_processes": accelerator.num_processes,
                "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum}
    for key, value in expected.items():
        if manifest[key] != value:
            raise UserError(f"checkpoint {path} was written with {key}={manifest[key]}, this run has {value}; "
                            "resume with the same settings or use a fresh checkpoint directory")
    accelerator.load_state(str(path))
    log.info("resumed from %s (step %d of %d)", path, step, cfg.steps)
    return step, list(manifest["losses"])


# -- the training loop ---------------------------------------------------------------------------------------------

def _validate(model, train_ids: Tensor, masks: MaskSet, cfg: FinetuneConfig, accelerator, teacher, ckpt_dir):
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
    kd = cfg.kd_logit_weight > 0 or cfg.kd_hidden_weight > 0
    if kd and teacher is None:
        raise UserError("kd_logit_weight/kd_hidden_weight > 0 need a teacher model; pass --kd DENSE_DIR")
    if teacher is not None and not kd:
        raise UserError("a teacher was given but kd_logit_weight and kd_hidden_weight are 0; set one > 0")
    if cfg.checkpoint_every and ckpt_dir is None:
        raise UserError(f"checkpoint_every={cfg.checkpoint_every} needs a checkpoint directory (ckpt_dir)")


def _kd_config(cfg: FinetuneConfig):
    from sparsegpt.distill import KDConfig

    return KDConfig(logit_weight=cfg.kd_logit_weight, hidden_weight=cfg.kd_hidden_weight,
                    temperature=cfg.kd_temperature)


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the method's name changed in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def finetune(model: nn.Module, train_ids: Tensor, masks: MaskSet, cfg: FinetuneConfig, *, accelerator,
             teacher: nn.Module | None = None, ckpt_dir: str | os.PathLike | None = None) -> FinetuneResult:
    """Fine-tune `model` in place on packed causal-LM blocks with its pruned weights held at exactly 0."""
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    _validate(model, train_ids, masks, cfg, accelerator, teacher, ckpt_dir)
    stage = _configure_deepspeed(accelerator, cfg)
    kd = _kd_config(cfg) if teacher is not None else None
    if kd is not None:
        from sparsegpt.distill import check_compatible

        check_compatible(model, teacher, kd)
    trainable = model
    if cfg.lora_r:
        if stage == 3:
            raise UserError("LoRA under ZeRO-3 cannot merge sparsely (the base weights are sharded); "
                            "use ZeRO-2 or DDP with LoRA (the adapters are small)")
        from sparsegpt.lora import LoraSettings, add_sparse_lora

        trainable = add_sparse_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                                             targets=cfg.lora_targets))
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, optimizer = accelerator.prepare(trainable, optimizer)
    # after prepare: the hooks' masks take the weights' final device and dtype
    hooks = masks.grad_hooks(model) if cfg.mask_enforcement in ("full", "hooks") else []
    try:
        if kd is not None:
            from sparsegpt.distill import prepare_teacher

            teacher = prepare_teacher(teacher, accelerator)
        start, losses = _resume(accelerator, ckpt_dir, cfg)
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
    if cfg.lora_r:
        from sparsegpt.lora import merge_sparse_lora

        merge_sparse_lora(trainable, masks)
    return result


def _train(engine, optimizer, train_ids, cfg, accelerator, teacher, kd, ckpt_dir, start, losses,
           enforcer: MaskEnforcer | None) -> FinetuneResult:
    """The optimizer-step loop from step `start` to cfg.steps."""
    order = DataOrder(train_ids.shape[0], cfg.seed)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes * train_ids.shape[1]
    no_bar = not accelerator.is_main_process or os.environ.get("SPARSEGPT_NO_PROGRESS") == "1"
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
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_checkpoint(accelerator, ckpt_dir, {
                    "step": done, "micro_batches": done * cfg.grad_accum, "losses": losses, "seed": cfg.seed,
                    "num_processes": accelerator.num_processes, "micro_batch_size": cfg.micro_batch_size,
                    "grad_accum": cfg.grad_accum})
            failpoint("finetune/step")
    seconds = sum(step_seconds)
    return FinetuneResult(steps=cfg.steps, final_loss=losses[-1], losses=losses,
                          tokens_per_s=len(step_seconds) * tokens_per_step / seconds if step_seconds else 0.0,
                          seconds=seconds, step_seconds=step_seconds)


def _optimizer_step(engine, optimizer, train_ids, order, step, cfg, accelerator, teacher, kd) -> float:
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


def _loss(engine, teacher, kd, batch: Tensor) -> Tensor:
    """Causal-LM loss of one micro-batch (labels = inputs; the model shifts), plus KD terms when distilling."""
    hidden = kd is not None and kd.hidden_weight > 0
    out = engine(input_ids=batch, labels=batch, output_hidden_states=hidden)
    if kd is None:
        return out.loss
    from sparsegpt.distill import kd_loss

    with torch.no_grad():
        teacher_out = teacher(input_ids=batch, output_hidden_states=hidden)
    loss, _ = kd_loss(out, teacher_out, out.loss, kd)
    return loss


# -- saving --------------------------------------------------------------------------------------------------------

def save_finetuned(accelerator, model: nn.Module, tokenizer, masks: MaskSet, out_dir: str | os.PathLike) -> None:
    """Save the fine-tuned model as an HF folder (safetensors) + mask.safetensors, atomically, from the main
    process; under ZeRO-3 the 16-bit weights are gathered to rank 0 (every rank must call this)."""
    out_dir = Path(out_dir)
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set only under DeepSpeed
    if wrapped is not None and wrapped.engine.zero_optimization_stage() == 3:
        if accelerator.unwrap_model(wrapped.engine) is not model:
            raise UserError("save_finetuned got a model that is not the one this accelerator's ZeRO-3 engine trains")
        state = accelerator.get_state_dict(wrapped.engine)  # collective; full only on the main process
    else:
        state = accelerator.unwrap_model(model).state_dict() if accelerator.is_main_process else None
    if accelerator.is_main_process:
        _write_model_dir(accelerator.unwrap_model(model), tokenizer, masks, state, out_dir)
    accelerator.wait_for_everyone()


def _write_model_dir(model: nn.Module, tokenizer, masks: MaskSet, state: dict, out_dir: Path) -> None:
    """Check the mask holds in the weights being saved, then write the folder atomically (models' temp + rename)."""

    for name, module in masks.modules(model).items():
        weight = state[f"{name}.weight"]
        revived = int(torch.count_nonzero(weight[mask_in_param_layout(module, masks.masks[name]).to(weight.device)]))
        if revived:
            raise UserError(f"{revived} pruned weights of {name} are non-zero in the trained model; not saving it")

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        masks.save(folder / "mask.safetensors")

    _write_atomically(out_dir, write, replace=True)
    log.info("saved fine-tuned model to %s (sparsity %.4f)", out_dir, masks.sparsity())
