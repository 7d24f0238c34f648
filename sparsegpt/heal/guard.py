"""Mask preservation for any training loop: `MaskGuard` attaches the trainer's two guards to a user's model and
optimizer (plain PyTorch, accelerate, DeepSpeed ZeRO-1/2/3 with offload, PEFT) and verifies the result.

The guards are the ones `heal.finetune` uses (see heal/enforce.py): `MaskSet.grad_hooks` zero the gradient at
pruned positions as autograd produces it (before accumulation or ZeRO's reduce-scatter), and `MaskEnforcer`
re-zeroes the pruned entries of the fp32 master weights, both Adam moments and the model weights after every
optimizer step, touching only this rank's partition. Usage, in any loop:

    guard = MaskGuard("runs/x/stages/01-s50/model").attach(model, optimizer)  # after accelerator.prepare /
    for batch in loader:                                                       # deepspeed.initialize
        loss = model(**batch).loss; loss.backward()   # or accelerator.backward / engine.backward
        optimizer.step(); guard.step(); optimizer.zero_grad()
    guard.verify()   # UserError naming what is non-zero; guard.detach() removes the hooks

Under DeepSpeed `guard.step()` goes after the engine's step (`engine.step()`, or `accelerator.backward` at an
accumulation boundary); calling it between accumulation micro-batches is harmless (it is idempotent).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet, _gathered
from sparsegpt.core.world import World, collective_device
from sparsegpt.heal.enforce import ADAM_STATES, MaskEnforcer
from sparsegpt.heal.lora import merge_sparse_lora
from sparsegpt.storage.compact import is_compact, load_masks
from sparsegpt.storage.compact_codec import MASK_FILE

log = logging.getLogger(__name__)

MaskSource = Union[MaskSet, str, os.PathLike, nn.Module, None]
# Optimizers whose per-parameter state is exactly Adam's two moments, which the enforcer zeroes; anything else
# keeps state it does not know (UserError at attach).
ADAM_CLASSES = {"torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
                "deepspeed.ops.adam.fused_adam.FusedAdam"}
# Wrappers that hand the step to the optimizer they hold (`.optimizer`) and whose fp32 masters the enforcer reaches.
WRAPPERS = {"accelerate.optimizer.AcceleratedOptimizer", "accelerate.utils.deepspeed.DeepSpeedOptimizerWrapper",
            "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
            "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
            "deepspeed.runtime.bf16_optimizer.BF16_Optimizer"}
REFUSED = {
    "Adafactor": "keeps factored second moments (row and column statistics), which cannot be 0 at pruned positions "
                 "only",
    "8bit": "keeps block-quantized moments, which the enforcement cannot zero exactly",
    "FP16_Optimizer": "(DeepSpeed fp16 without ZeRO) keeps fp32 master weights out of the enforcement's reach",
    "FP16_UnfusedOptimizer": "(DeepSpeed fp16 without ZeRO) keeps fp32 master weights out of the enforcement's reach",
}


def load_mask(source: MaskSource, model: nn.Module | None = None) -> MaskSet:
    """The MaskSet `source` names: a MaskSet; a mask.safetensors file; a folder holding one (a pruned or
    fine-tuned model folder, a run's stage folder `stages/NN-NAME` with its model/ or pruned/); a compact
    checkpoint; a model (its exact zeros); None = the exact zeros of `model`. Collective under ZeRO-3 when it
    reads a model's zeros (every rank must call it)."""
    if isinstance(source, MaskSet):
        return source
    if source is None or isinstance(source, nn.Module):
        target = source if source is not None else model
        if target is None:
            raise UserError("no mask given and no model to read its exact zeros from; pass a mask (a model folder "
                            "with mask.safetensors, a MaskSet) or the pruned model")
        return MaskSet.from_model(_plain(target))
    path = Path(source)
    if path.is_file():
        return MaskSet.load(path)
    if not path.is_dir():
        raise UserError(f"mask source {path} does not exist; give a mask.safetensors, a pruned model folder, a run's "
                        "stage folder or a compact checkpoint")
    if is_compact(path):
        return load_masks(path)
    for candidate in (path / MASK_FILE, path / "model" / MASK_FILE, path / "pruned" / MASK_FILE):
        if candidate.is_file():
            return MaskSet.load(candidate)
    raise UserError(f"{path} holds no {MASK_FILE} (nor model/ or pruned/ with one) and is not a compact checkpoint; "
                    "give the folder `sparsegpt prune` or a run wrote")


def _plain(model: nn.Module) -> nn.Module:
    """The transformers model the masks name: unwrapped from DDP / DeepSpeedEngine / torch.compile, and the base
    model of a PEFT model (its LoRA layers' `.weight` is the frozen base weight)."""
    model = extract_model_from_parallel(model)
    if "peft" in sys.modules:  # a PeftModel exists only if peft was imported
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    return model


def _qualified(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def optimizer_chain(optimizer: object) -> list[object]:
    """The optimizer and every optimizer it wraps (`.optimizer`), outermost first."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) not in (None, chain[-1]):
        chain.append(chain[-1].optimizer)
    return chain


def check_optimizer(optimizer: object) -> None:
    """UserError unless every pruned entry of `optimizer`'s state can be kept exactly 0: Adam/AdamW (torch, or
    DeepSpeed's CPU/fused Adam under ZeRO), behind accelerate's and DeepSpeed's ZeRO/bf16 wrappers only."""
    chain = optimizer_chain(optimizer)
    for opt in chain:
        name = type(opt).__name__
        reason = next((why for key, why in REFUSED.items() if key in name), None)
        if reason is not None:
            raise UserError(f"optimizer {name} {reason}; train with AdamW (Trainer: optim='adamw_torch'; "
                            "DeepSpeed: ZeRO stage 1-3 or bf16) to keep the mask exact")
    *wrappers, base = chain
    unknown = [w for w in wrappers if _qualified(w) not in WRAPPERS]
    if unknown or _qualified(base) not in ADAM_CLASSES:
        what = type(unknown[0] if unknown else base).__name__
        raise UserError(f"optimizer {what} is not one the mask enforcement knows (torch Adam/AdamW, DeepSpeed's "
                        "Adam under ZeRO or bf16); its state at pruned positions could drift: use AdamW "
                        "(Trainer: optim='adamw_torch')")
    if any(group.get("amsgrad") for group in getattr(base, "param_groups", [])):
        raise UserError("AdamW(amsgrad=True) keeps a third moment (max_exp_avg_sq) the enforcement does not "
                        "zero; use amsgrad=False")


KINDS = ("weight", "fp32", *ADAM_STATES)


@dataclass
class MaskReport:
    """Non-zero entries at pruned positions, per kind (`KINDS`: the weight, its fp32 master, the Adam moments), of
    the gathered tensors; `kinds` lists the kinds that exist (no fp32 master for a frozen or bf16-only weight, no
    moments before the first step)."""

    nonzero: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    kinds: set[str] = field(default_factory=set)
    parameters: int = 0

    @property
    def exact(self) -> bool:
        return not any(self.nonzero.values())

    def add(self, kind: str, full: Tensor | None, mask: Tensor) -> None:
        if full is None:
            return
        self.kinds.add(kind)
        self.nonzero[kind] += int(torch.count_nonzero(full.detach().reshape(mask.shape).cpu()[mask]))

    def __str__(self) -> str:
        counts = ", ".join(f"{kind} {self.nonzero[kind]}" for kind in KINDS if kind in self.kinds)
        return f"non-zero at pruned positions of {self.parameters} masked parameters: {counts}"


class MaskGuard:
    """Keeps a mask exact through a user's training loop: gradient hooks plus post-step enforcement of weights,
    fp32 masters and Adam moments (see the module docstring). One guard per model; `attach` again re-attaches."""

    def __init__(self, mask: MaskSource = None):
        self.source = mask
        self.masks: MaskSet | None = None if not isinstance(mask, MaskSet) else mask
        self.model: nn.Module | None = None
        self.optimizer: object | None = None
        self.enforcer: MaskEnforcer | None = None
        self.hooks: list[RemovableHandle] = []
        self._layout: dict[int, tuple] = {}

    def attach(self, model: nn.Module, optimizer: object | None = None) -> MaskGuard:
        """Register the gradient hooks and build the post-step enforcer on `model` (plain, DDP/accelerate-
        prepared, a DeepSpeedEngine, or a PEFT model) trained by `optimizer` (None: the DeepSpeedEngine's own).
        Call it after `accelerator.prepare` / `deepspeed.initialize` and after loading a checkpoint, on every
        rank. UserError if the mask does not fit the model, the optimizer's state cannot be kept exact, or a
        pruned weight is non-zero."""
        self.detach()
        engine_optimizer = getattr(model, "optimizer", None) if hasattr(model, "module") else None
        if optimizer is None:
            optimizer = engine_optimizer
        if optimizer is None:
            raise UserError("MaskGuard.attach needs the optimizer that steps the model (or a DeepSpeedEngine, "
                            "which holds its own)")
        if engine_optimizer is not None and engine_optimizer not in optimizer_chain(optimizer):
            raise UserError("the optimizer given is not the DeepSpeed engine's (deepspeed.initialize wraps it); "
                            "pass engine.optimizer, or no optimizer")
        check_optimizer(optimizer)
        plain = _plain(model)
        if self.masks is None:
            self.masks = load_mask(self.source, plain)
        self.masks.check_shapes(plain)
        self.model, self.optimizer = plain, optimizer
        self.hooks = self.masks.grad_hooks(plain)
        self.enforcer = MaskEnforcer(plain, self.masks, optimizer)
        self._layout = {id(s.param): _layout(s.param) for s in self.enforcer.slots}
        report = mask_report(self.masks, plain, states=False)
        if not report.exact:
            self.detach()
            raise UserError(f"{report.nonzero['weight']} pruned weights are non-zero before training; the mask "
                            "does not belong to this model (use the mask saved with it, or MaskSet.apply it first)")
        log.info("mask guard attached: %d masked parameters, %d trainable", report.parameters,
                 len(self.enforcer.slots))
        return self

    @torch.no_grad()
    def step(self) -> None:
        """Re-zero this rank's pruned entries of the fp32 masters, Adam moments and weights; call it after every
        optimizer step (idempotent, so an extra call or a skipped fp16 step does no harm)."""
        if self.enforcer is None:
            raise RuntimeError("MaskGuard.step() before attach()")
        if self._layout:
            moved = [s.param for s in self.enforcer.slots if _layout(s.param) != self._layout[id(s.param)]]
            if moved:
                raise UserError("the model was wrapped or cast (DeepSpeed, accelerate prepare, .to()) after the mask "
                                "guard attached; attach after deepspeed.initialize / accelerator.prepare")
            self._layout = {}  # the first step settles it; later steps skip the check
        self.enforcer()

    def detach(self) -> None:
        """Remove the gradient hooks; the guard can `attach` again."""
        for handle in self.hooks:
            handle.remove()
        self.hooks, self.enforcer = [], None

    def merge(self, model: nn.Module) -> nn.Module:
        """Merge a PEFT LoRA model's adapters sparsely (`lora.merge_sparse_lora`): the plain model, mask exact."""
        if self.masks is None:
            self.masks = load_mask(self.source, model)
        return merge_sparse_lora(extract_model_from_parallel(model), self.masks)

    def verify(self, *, states: bool = True) -> MaskReport:
        """`mask_report` of the attached model and optimizer; UserError naming the counts unless all are 0."""
        if self.model is None:
            raise RuntimeError("MaskGuard.verify() before attach()")
        report = mask_report(self.masks, self.model, self.optimizer, states=states)
        if not report.exact:
            bad = ", ".join(f"{k} {v}" for k, v in report.nonzero.items() if v)
            raise UserError(f"pruned entries are non-zero ({bad} entries); the mask was not preserved (attach a "
                            "MaskGuard / SparseMaskCallback and call its step after every optimizer step)")
        return report


@torch.no_grad()
def mask_report(masks: MaskSet, model: nn.Module, optimizer: object | None = None, *,
                states: bool = True) -> MaskReport:
    """Non-zeros at pruned positions of every masked weight of `model` and, with `states`, of its fp32 master and
    Adam moments in `optimizer`, each gathered whole one parameter at a time (DeepSpeed's `safe_get_full_*` under
    ZeRO: a collective, every rank must call it). Independent of the enforcer's bookkeeping, so it also measures
    a loop without a guard. Every rank returns the largest count of any rank."""
    plain = _plain(model)
    report = MaskReport()
    for _, param, mask in masks.iter_param_masks(plain):
        report.parameters += 1
        with _gathered(param):
            report.add("weight", param.data, mask)
        if states and param.requires_grad:
            for kind, tensor in _states(param, optimizer).items():
                report.add(kind, tensor, mask)
    if World.current().size > 1:  # replicas (DDP) could differ: the largest count of any rank
        counts = torch.tensor([report.nonzero[k] for k in KINDS], dtype=torch.int64).to(collective_device("cpu"))
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        report.nonzero = dict(zip(KINDS, counts.tolist()))
    return report


def _states(param: nn.Parameter, optimizer: object | None) -> dict[str, Tensor | None]:
    """The whole fp32 master and Adam moments of `param` (None where they do not exist yet). Under DeepSpeed the
    gathers are collectives, so the path and the "has it stepped" test must not depend on this rank's share: every
    ZeRO-1/2 parameter has `_hp_mapping` (None on a rank holding none of it), every ZeRO-3 one `ds_id`."""
    base = optimizer_chain(optimizer)[-1] if optimizer is not None else None
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"fp32": safe_get_full_fp32_param(param)}
        stepped = base is not None and len(base.state) > 0  # the moments exist once the optimizer has stepped
        for key in ADAM_STATES:
            out[key] = safe_get_full_optimizer_state(param, key) if stepped else None
        return out
    state = base.state.get(param, {}) if base is not None else {}
    fp32 = param.data if param.dtype == torch.float32 else None
    return {"fp32": fp32, **{key: state.get(key) for key in ADAM_STATES}}


def _layout(param: nn.Parameter) -> tuple:
    """What the guard's keeps were built for: ZeRO-3 partitioning, a ZeRO-1/2 fragment, dtype, device."""
    return hasattr(param, "ds_id"), getattr(param, "_hp_mapping", None) is not None, param.dtype, param.device
