"""The fine-tuning trainer's disk I/O: resumable mid-run checkpoints and the final fine-tuned model folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparsegpt.core.atomic import atomic_write_text, write_dir_atomically
from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.config import FinetuneConfig

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2

# -- mid-run checkpoints: ckpt_dir/step-XXXXXXXX/ = accelerator.save_state + manifest.json, written last -----------


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest) as (step, folder), oldest first, as this process's disk shows
    them. Decisions made from it belong to the main process (`resume` broadcasts its choice to the others)."""
    found = []
    for d in ckpt_dir.glob("step-*"):
        if (d / "manifest.json").is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, cfg: FinetuneConfig, step: int,
                    losses: list[float]) -> None:
    """accelerator.save_state into step-XXXXXXXX/ after `step` optimizer steps, then (main process, after a
    barrier) the manifest, atomically; keep the newest KEEP_CHECKPOINTS. Every rank must call this."""
    manifest = {"step": step, "micro_batches": step * cfg.grad_accum, "losses": losses, "seed": cfg.seed,
                "num_processes": accelerator.num_processes, "micro_batch_size": cfg.micro_batch_size,
                "grad_accum": cfg.grad_accum}
    target = ckpt_dir / f"step-{step:08d}"
    if accelerator.is_main_process and target.exists():
        shutil.rmtree(target)  # an incomplete leftover of a killed run (complete ones are never rewritten)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    failpoint("checkpoint/before-manifest")
    if accelerator.is_main_process:
        atomic_write_text(target / "manifest.json", json.dumps(manifest))
        for _, old in list_checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            (old / "manifest.json").unlink()  # first un-complete it, then delete
            shutil.rmtree(old)
        log.info("checkpoint %s", target)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, ckpt_dir: Path | None, cfg: FinetuneConfig) -> tuple[int, list[float]]:
    """Load the newest complete checkpoint, if any: (steps done, losses so far); (0, []) when there is none.

    The main process picks it and reads its manifest; the choice is broadcast, so every rank loads the same step
    even where their disks disagree. Every rank then loads the folder itself (accelerate saved per-rank files in
    it), so `ckpt_dir` must be on a filesystem all ranks share: UserError on every rank if one cannot see it, and
    if it was written with another seed, batch layout or process count. Every rank must call this."""
    if ckpt_dir is None:
        return 0, []
    chosen: list[tuple[int, Path, dict] | None] = [None]
    if accelerator.is_main_process:
        found = list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if found:
            step, path = found[-1]
            chosen[0] = (step, path, json.loads((path / "manifest.json").read_text()))
    step, path, manifest = broadcast_object_list(chosen)[0] or (0, None, None)
    if path is None:
        return 0, []
    blind = gather_object([] if path.is_dir() else [accelerator.process_index])
    if blind:
        raise UserError(f"checkpoint {path} (chosen by the main process) is not visible to process(es) "
                        f"{', '.join(map(str, blind))}; put the checkpoint dir on a filesystem every process shares")
    expected = {"seed": cfg.seed, "num_processes": accelerator.num_processes,
                "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum}
    for key, value in expected.items():
        if manifest[key] != value:
            raise UserError(f"checkpoint {path} was written with {key}={manifest[key]}, this run has {value}; "
                            "resume with the same settings or use a fresh checkpoint directory")
    accelerator.load_state(str(path))
    log.info("resumed from %s (step %d of %d)", path, step, cfg.steps)
    return step, list(manifest["losses"])


# -- the fine-tuned model ------------------------------------------------------------------------------------------

def save_finetuned(accelerator: Accelerator, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                   masks: MaskSet, out_dir: str | os.PathLike) -> None:
    """Save the fine-tuned model as an HF folder (safetensors) + mask.safetensors, atomically, from the main
    process; under ZeRO-3 the 16-bit weights are gathered to rank 0 (every rank must call this)."""
    out_dir = Path(out_dir)
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set only under DeepSpeed
    if wrapped is not None and wrapped.engine.zero_optimization_stage() == 3:
        if accelerator.unwrap_model(wrapped.engine) is not model:
            raise ValueError("save_finetuned got a model that is not the one this accelerator's ZeRO-3 engine "
                             "trains; pass the model given to finetune()")
        state = accelerator.get_state_dict(wrapped.engine)  # collective; full only on the main process
    else:
        state = accelerator.unwrap_model(model).state_dict() if accelerator.is_main_process else None
    if accelerator.is_main_process:
        _write_model_dir(accelerator.unwrap_model(model), tokenizer, masks, state, out_dir)
    accelerator.wait_for_everyone()


def _write_model_dir(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, masks: MaskSet, state: dict,
                     out_dir: Path) -> None:
    """Check the mask holds in the weights being saved, then write the folder atomically (temp folder + rename)."""
    for name, _, mask in masks.iter_param_masks(model):  # per parameter: a fused experts one covers its experts
        weight = state[name]
        revived = int(torch.count_nonzero(weight[mask.to(weight.device)]))
        if revived:
            raise UserError(f"{revived} pruned weights of {name} are non-zero in the trained model; not saving it")

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        masks.save(folder / "mask.safetensors")

    write_dir_atomically(out_dir, write, replace=True)
    log.info("saved fine-tuned model to %s (sparsity %.4f)", out_dir, masks.sparsity())
