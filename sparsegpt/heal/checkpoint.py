"""The fine-tuning trainer's disk I/O: resumable mid-run checkpoints and the final fine-tuned model folder.

A checkpoint's manifest (written last) lists every file of the folder with its size; resuming checks them before
loading (a truncated, missing or foreign file is found before any rank starts loading), passes over a damaged
newest checkpoint to the one before it (logged: the run is deterministic, so resuming from an earlier step redoes
the same steps) and otherwise stops with a one-line error. Writes that run out of disk raise `DiskFull` on every
rank, the incomplete checkpoint removed."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparsegpt.core.atomic import DiskFull, atomic_write_text, disk_full_as_error, write_dir_atomically
from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.world import World, agree
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
    world = World.current()
    try:  # every rank writes its part: one gather instead of the barrier, so a rank's failure stops them all
        agree(world, lambda: _save_state(accelerator, target))
        failpoint("checkpoint/before-manifest")
        agree(world, lambda: _write_manifest(ckpt_dir, target, manifest) if accelerator.is_main_process else None)
    except UserError as e:  # a full disk (here or on another rank): the incomplete folder goes
        if accelerator.is_main_process and not (target / "manifest.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
        done = list_checkpoints(ckpt_dir)
        if isinstance(e, DiskFull) and done and e.need is None:
            raise e.needing(_folder_bytes(done[-1][1])) from e  # a checkpoint takes what the last one took
        raise


def _save_state(accelerator: Accelerator, target: Path) -> None:
    with disk_full_as_error(target.parent):
        accelerator.save_state(str(target))


def _write_manifest(ckpt_dir: Path, target: Path, manifest: dict) -> None:
    """The manifest, written last: the folder's files and sizes (what `verify` checks); old checkpoints pruned."""
    files = {str(f.relative_to(target)): f.stat().st_size for f in sorted(target.rglob("*")) if f.is_file()}
    atomic_write_text(target / "manifest.json", json.dumps({**manifest, "files": files}))
    for _, old in list_checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
        (old / "manifest.json").unlink()  # first un-complete it, then delete
        shutil.rmtree(old)
    log.info("checkpoint %s", target)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def verify(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when checkpoint `path` is whole: its manifest parses and every file it lists is there at its
    size; else (None or the manifest, what is wrong). Manifests of older versions list no files: not checked."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        steps = int(manifest["step"])
        files = dict(manifest.get("files", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its manifest is unreadable ({type(e).__name__}: {e})"
    if steps != int(path.name[5:]):
        return None, f"its manifest says step {steps}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return manifest, f"{name} is missing"
        if f.stat().st_size != size:
            return manifest, f"{name} has {f.stat().st_size} bytes, its manifest says {size}"
    return manifest, None


def resume(accelerator: Accelerator, ckpt_dir: Path | None, cfg: FinetuneConfig) -> tuple[int, list[float]]:
    """Load the newest complete checkpoint, if any: (steps done, losses so far); (0, []) when there is none.

    The main process picks it and reads its manifest; the choice is broadcast, so every rank loads the same step
    even where their disks disagree. Every rank then loads the folder itself (accelerate saved per-rank files in
    it), so `ckpt_dir` must be on a filesystem all ranks share: UserError on every rank if one cannot see it, and
    if it was written with another seed, batch layout or process count. Every rank must call this."""
    if ckpt_dir is None:
        return 0, []
    chosen: list[tuple[int, Path, dict] | str | None] = [None]
    if accelerator.is_main_process:
        chosen[0] = _choose(list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else [])
    choice = broadcast_object_list(chosen)[0]
    if isinstance(choice, str):
        raise UserError(choice)
    step, path, manifest = choice or (0, None, None)
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
    agree(World.current(), lambda: _load_state(accelerator, path))
    log.info("resumed from %s (step %d of %d)", path, step, cfg.steps)
    return step, list(manifest["losses"])


def _choose(found: list[tuple[int, Path]]) -> tuple[int, Path, dict] | str | None:
    """The newest whole checkpoint (a damaged newer one passed over, logged), None without one, or the error
    (a message) when every checkpoint is damaged."""
    damaged = []
    for step, path in reversed(found):
        manifest, problem = verify(path)
        if problem is None:
            for bad, why in damaged:
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead (the same steps are redone)",
                            bad, why, path)
            return step, path, manifest
        damaged.append((path, problem))
    if damaged:
        path, why = damaged[0]
        return (f"checkpoint {path} is damaged ({why}) and no earlier one is whole; delete {path.parent} to redo "
                "this stage's fine-tuning from its pruned model, then run the same command again")
    return None


def _load_state(accelerator: Accelerator, path: Path) -> None:
    """accelerator.load_state, its failure (a file damaged beyond what the sizes show) one line naming the folder."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {first}); delete it to resume "
                        "from the one before it (or from the pruned model), then run the same command again") from e


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
    agree(World.current(), lambda: _write_model_dir(accelerator.unwrap_model(model), tokenizer, masks, state, out_dir)
          if accelerator.is_main_process else None)  # a failed write (a full disk) raises on every rank


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

    need = sum(t.numel() * t.element_size() for t in state.values())
    write_dir_atomically(out_dir, write, replace=True, need=need)
    log.info("saved fine-tuned model to %s (sparsity %.4f)", out_dir, masks.sparsity())
