"""The progressive scheduler: prune -> evaluate -> fine-tune -> evaluate -> checkpoint, stage after stage.

One recipe, one run directory. Every step leaves the run dir in a state the same command can resume from:

    RUN_DIR/recipe.yaml            the recipe as run; a different recipe in this dir is refused
    RUN_DIR/state.json             phases finished per stage (atomic temp + rename; only the main process writes)
    RUN_DIR/metrics.jsonl          one JSON object per evaluation (stage, name, phase, target, sparsity, metrics)
    RUN_DIR/stages/NN-NAME/model   the finished stage's model: HF safetensors + mask.safetensors
    RUN_DIR/stages/NN-NAME/pruned  the pruned model while the stage is being fine-tuned (removed when done)
    RUN_DIR/stages/NN-NAME/ckpt    mid-stage fine-tuning checkpoints (removed when the stage completes)

Process model under `accelerate launch`: the main process prunes (the model on CPU, one decoder layer at a time on
its device) and evaluates; the other ranks wait at a barrier. Fine-tuning runs on every rank: each loads the
pruned model on CPU and `accelerator.prepare` shards it (ZeRO-2/3). Stage boundaries go through disk, which is
also what makes every boundary a resume point.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsegpt.errors import UserError
from sparsegpt.models import atomic_write_text

log = logging.getLogger(__name__)

PHASES = ("prune", "eval_pruned", "finetune", "eval_finetuned")


@dataclass
class RunDir:
    """Paths and state of one run directory."""

    root: Path

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / "stages" / f"{index:02d}-{name}"

    def load_state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"stages": {}}

    def save_state(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")


def check_run_dir(run_dir: Path, recipe) -> None:
    """Refuse a run dir made by another recipe, or a non-empty folder that is no run dir; writes nothing."""
    recorded = run_dir / "recipe.yaml"
    if recorded.exists():
        from sparsegpt.recipe import load_recipe

        old = load_recipe(recorded)
        if old.fingerprint() != recipe.fingerprint():
            raise UserError(
                f"run dir {run_dir} holds another recipe ({old.name!r}, fingerprint {old.fingerprint()[:12]} != "
                f"{recipe.fingerprint()[:12]}); pass a new --run-dir or the recipe it was started with")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run dir {run_dir} exists, is not empty and has no recipe.yaml; pass an empty or new --run-dir")


def prepare_run_dir(run_dir: Path, recipe, recipe_text: str) -> RunDir:
    """Create the run dir for this recipe, or reuse the one it made (call `check_run_dir` first)."""
    rd = RunDir(run_dir)
    recorded = run_dir / "recipe.yaml"
    if recorded.exists():
        return rd
    run_dir.mkdir(parents=True, exist_ok=True)
    rd.save_state({"stages": {}, "fingerprint": recipe.fingerprint(), "created": time.time()})
    atomic_write_text(recorded, recipe_text)  # written last: its presence marks a run dir as initialised
    return rd


def consistent_metrics(rd: RunDir, state: dict) -> None:
    """Drop metric records of phases that state.json does not mark done (a kill between append and state write)."""
    path = rd.root / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-append: its phase was never marked done
            continue
        phase = "eval_pruned" if rec.get("phase") == "pruned" else "eval_finetuned"
        if phase in state["stages"].get(str(rec.get("stage")), {}).get("done", []):
            keep.append(line)
    if len(keep) != len(lines):
        log.info("dropping %d metric record(s) of unfinished phases", len(lines) - len(keep))
        atomic_write_text(path, "".join(k + "\n" for k in keep))


class Scheduler:
    """Walks a recipe's stages in one process of an `accelerate launch` job (every rank runs one)."""

    def __init__(self, recipe, rd: RunDir, accelerator):
        self.recipe, self.rd, self.acc = recipe, rd, accelerator
        self.stages = recipe.resolved_stages()
        self.device = accelerator.device

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @contextlib.contextmanager
    def _whole_model_loads(self):
        """Loads that give whole (unsharded) models although a ZeRO-3 plugin is active.

        transformers loads into zero.Init shards whenever a stage-3 HfDeepSpeedConfig is registered, and accelerate's
        `zero3_init_context_manager(enable=False)` re-registers one, so the registration is lifted here instead."""
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def _load(self, path):
        """A whole model on CPU. Under ZeRO-3 every rank loads it before `prepare` shards it (the tested path);
        loading straight into shards (zero.Init) would spare each rank's CPU memory for 70B-class models."""
        from sparsegpt.models import load_model

        with self._whole_model_loads():
            return load_model(str(path), dtype=self.recipe.dtype)

    def _mark(self, state: dict, index: int, phase: str, seconds: float) -> None:
        entry = state["stages"].setdefault(str(index), {"name": self.stages[index].name, "done": [], "seconds": {}})
        entry["done"].append(phase)
        entry["seconds"][phase] = round(seconds, 3)
        self.rd.save_state(state)

    def _evaluate(self, model, tokenizer, index: int, phase: str, masks, seconds_before: float) -> dict:
        from sparsegpt.evaluation import HookContext, append_metrics, run_hooks

        stage = self.stages[index]
        hooks = stage.eval.hooks
        context = HookContext(stage=index, name=stage.name, phase=phase, target=stage.target,
                              run_dir=str(self.rd.root), device=str(self.device), masks=masks)
        t0 = time.time()
        metrics, errors = run_hooks(model, tokenizer, hooks, context, fail_fast=stage.eval.fail_on_error)
        record = {"stage": index, "name": stage.name, "phase": phase, "target": stage.target,
                  "sparsity": masks.sparsity() if masks is not None else 0.0, "metrics": metrics,
                  "seconds": round(seconds_before + time.time() - t0, 3), "time": time.time()}
        if errors:
            record["errors"] = errors
        append_metrics(self.rd.root, record)
        if self.recipe.trackers:  # one tracker step per evaluation, in run order
            from sparsegpt.evaluation import flatten_for_trackers

            self.acc.log(flatten_for_trackers(record), step=2 * index + (phase == "finetuned"))
        return record

    # -- the stage ----------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        state = self.rd.load_state() if self.main else None
        if self.main:
            consistent_metrics(self.rd, state)
        prev_dir = None  # None = the dense model
        for i, stage in enumerate(self.stages):
            sdir = self.rd.stage_dir(i, stage.name)
            done = self._done(i)
            if "complete" in done:
                prev_dir = sdir / "model"
                continue
            log.info("stage %d/%d %s: target %s", i + 1, len(self.stages), stage.name, stage.target)
            self._prune_phase(i, sdir, prev_dir, done)
            self.acc.wait_for_everyone()
            if stage.finetune is not None and not ({"finetune"} <= set(self._done(i))):
                self._finetune_phase(i, sdir, prev_dir)
            self.acc.wait_for_everyone()
            if self.main:
                self._finish_stage(i, sdir)
            self.acc.wait_for_everyone()
            prev_dir = sdir / "model"
        return self._records()

    def _done(self, index: int) -> list[str]:
        """Phases finished for a stage, as the main process recorded them (broadcast to every rank)."""
        done = self.rd.load_state()["stages"].get(str(index), {}).get("done", []) if self.main else None
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [done]
            broadcast_object_list(box, from_process=0)
            done = box[0]
        return done

    def _dense_path(self) -> str:
        from sparsegpt.models import resolve_model_path

        return resolve_model_path(self.recipe.model)

    def _prune_phase(self, i: int, sdir: Path, prev_dir: Path | None, done: list[str]) -> None:
        from sparsegpt.masks import MaskSet

        stage = self.stages[i]
        if not self.main or {"prune", "eval_pruned"} <= set(done):
            return
        state = self.rd.load_state()
        pruned = sdir / "pruned"
        t0 = time.time()
        if "prune" not in done:
            model, tok = self._load(prev_dir or self._dense_path())
            base = MaskSet.load(prev_dir / "mask.safetensors") if prev_dir is not None else None
            masks = self._prune(model, tok, stage, base)
            from sparsegpt.models import save_model

            save_model(model, tok, pruned)
            masks.save(pruned / "mask.safetensors")  # the phase counts only once state.json says so
            self._mark(state, i, "prune", time.time() - t0)
        else:
            model, tok = self._load(pruned)
            masks = MaskSet.load(pruned / "mask.safetensors")
        t_eval = time.time()
        if "pruned" in stage.eval.phases:  # its record's `seconds` is the whole phase: prune + evaluation
            rec = self._evaluate(model, tok, i, "pruned", masks, t_eval - t0)
            log.info("stage %s pruned: sparsity %.4f %s", stage.name, rec["sparsity"], _short(rec["metrics"]))
        self._mark(state, i, "eval_pruned", time.time() - t_eval)
        del model
        gc.collect()

    def _prune(self, model, tok, stage, base):
        """One-shot prune to the stage target on the main process; target 0 keeps the model (and its mask) as is."""
        from sparsegpt.data import calibration_ids, default_seqlen
        from sparsegpt.masks import MaskSet
        from sparsegpt.sequential import PruneConfig, prune_model

        if stage.sparsity == 0 and not stage.prune_n:
            return base if base is not None else MaskSet.from_model(model)
        p = stage.prune
        seqlen = p.seqlen or default_seqlen(model)
        calib = calibration_ids(self.recipe.data.calibration, tok, nsamples=p.nsamples, seqlen=seqlen,
                                seed=self.recipe.seed)
        cfg = PruneConfig(method=p.method, sparsity=stage.sparsity, prune_n=stage.prune_n, prune_m=stage.prune_m,
                          blocksize=p.blocksize, percdamp=p.percdamp, allocation=p.allocation,
                          owl_lambda=p.owl_lambda, owl_m=p.owl_m, include=p.include, exclude=p.exclude,
                          batch_size=p.batch_size, offload_activations=p.offload_activations)
        result = prune_model(model, calib, cfg, base_masks=base, device=self.device)
        return result.masks

    def _finetune_phase(self, i: int, sdir: Path, prev_dir: Path | None) -> None:
        from sparsegpt.data import train_ids
        from sparsegpt.finetune import finetune, save_finetuned
        from sparsegpt.masks import MaskSet

        stage = self.stages[i]
        f = stage.finetune
        t0 = time.time()
        pruned = sdir / "pruned"
        model, tok = self._load(pruned)
        masks = MaskSet.load(pruned / "mask.safetensors")
        from sparsegpt.data import default_seqlen

        seqlen = f.seqlen or stage.prune.seqlen or default_seqlen(model)
        data = train_ids(self.recipe.data.finetune, tok, seqlen=seqlen)
        teacher = None
        if f.kd is not None and (f.kd.logit_weight or f.kd.hidden_weight):
            src = {"dense": None, "previous": prev_dir}.get(f.kd.teacher, f.kd.teacher)
            teacher, _ = self._load(src or self._dense_path())
        cfg = f.to_config(seed=self.recipe.seed + i, micro_batch_size=self.recipe.distributed.micro_batch_size,
                          grad_accum=self.recipe.distributed.grad_accum,
                          world_size=self.acc.num_processes, seqlen=seqlen)
        finetune(model, data, masks, cfg, accelerator=self.acc, teacher=teacher, ckpt_dir=sdir / "ckpt")
        save_finetuned(self.acc, model, tok, masks, sdir / "model")
        self.acc.free_memory()
        del model, teacher
        gc.collect()
        if self.main:
            state = self.rd.load_state()
            self._mark(state, i, "finetune", time.time() - t0)

    def _finish_stage(self, i: int, sdir: Path) -> None:
        from sparsegpt.masks import MaskSet

        stage = self.stages[i]
        state = self.rd.load_state()
        done = state["stages"][str(i)]["done"]
        if stage.finetune is None:
            if not (sdir / "model").exists():
                os.replace(sdir / "pruned", sdir / "model")
        elif "eval_finetuned" not in done and "finetuned" in stage.eval.phases:
            t0 = time.time()
            model, tok = self._load(sdir / "model")
            masks = MaskSet.load(sdir / "model" / "mask.safetensors")
            masks.verify(model)
            rec = self._evaluate(model, tok, i, "finetuned", masks, state["stages"][str(i)]["seconds"]["finetune"])
            log.info("stage %s finetuned: sparsity %.4f %s", stage.name, rec["sparsity"], _short(rec["metrics"]))
            self._mark(state, i, "eval_finetuned", time.time() - t0)
            del model
        for leftover in sdir.iterdir():  # the pruned copy, checkpoints, temp folders of killed writes
            if leftover.name != "model":
                shutil.rmtree(leftover, ignore_errors=True)
        self._mark(state, i, "complete", 0.0)
        from sparsegpt.evaluation import format_stage_table

        print(format_stage_table(self._records()), flush=True)

    def _records(self) -> list[dict]:
        from sparsegpt.evaluation import read_metrics

        try:
            return read_metrics(self.rd.root)
        except UserError:
            return []


def _short(metrics: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def build_accelerator(recipe, run_dir: Path):
    """An Accelerator whose DeepSpeed plugin (if any) is built from the recipe's `distributed` settings."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from sparsegpt.finetune import cpu_deepspeed_handlers
    from sparsegpt.recipe import deepspeed_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = recipe.distributed
    ds = deepspeed_config(recipe, world)
    plugin = None
    if ds is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=dist.zero_stage == 3)
    # Pruning a large model on rank 0 can take far longer than the default 30 min collective timeout.
    kwargs = cpu_deepspeed_handlers(deepspeed=plugin is not None, timeout=timedelta(hours=12))
    return Accelerator(mixed_precision=dist.mixed_precision, deepspeed_plugin=plugin,
                       gradient_accumulation_steps=dist.grad_accum, kwargs_handlers=kwargs,
                       log_with=list(recipe.trackers) or None, project_dir=str(run_dir / "trackers"))


def main(argv: list[str] | None = None) -> int:
    """Entry for `accelerate launch train/progressive.py --recipe R.yaml [--run-dir D] [--dry-run]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="train/progressive.py",
        description=("Progressive sparsification: for each stage of the recipe, prune one-shot with SparseGPT to the "
                     "stage's target (never reviving weights pruned before), evaluate, fine-tune with the mask held "
                     "exactly, evaluate, checkpoint. Run the same command again to resume."),
        epilog=("examples:\n"
                "  accelerate launch train/progressive.py --recipe recipes/demo.yaml --dry-run\n"
                "  accelerate launch --num_processes 8 train/progressive.py --recipe recipes/opt13b_90.yaml\n"
                "  sparsegpt report runs/opt13b_90"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=Path, help="YAML recipe (see recipes/)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the run lives (default: runs/<recipe name>); an existing one is resumed")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the expanded stage plan and a per-device memory estimate, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import sys

    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from sparsegpt.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    run_dir = args.run_dir or Path("runs") / recipe.name
    if args.dry_run:
        from sparsegpt.memory import plan_for

        print(plan_for(recipe, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    _check_inputs(recipe)
    check_run_dir(run_dir, recipe)
    accelerator = build_accelerator(recipe, run_dir)
    if accelerator.is_main_process:
        log.info("accelerator: %s, %d process(es), zero stage %d", accelerator.distributed_type.value,
                 accelerator.num_processes, recipe.distributed.zero_stage)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, recipe, recipe.to_yaml())
        from sparsegpt.models import resolve_model_path

        resolve_model_path(recipe.model)  # converts a GGUF once, before the other ranks look for it
    accelerator.wait_for_everyone()
    rd = RunDir(run_dir)
    if recipe.trackers:
        accelerator.init_trackers(recipe.name, config={"recipe": recipe.fingerprint()[:12], "model": recipe.model})
    torch.manual_seed(recipe.seed)
    records = Scheduler(recipe, rd, accelerator).run()
    if accelerator.is_main_process:
        log.info("run complete: %s (%d evaluations)", run_dir, len(records))
    accelerator.end_training()
    return 0


def _check_inputs(recipe) -> None:
    """Fail before anything is written if the model or a data source cannot be found."""
    from sparsegpt.data import check_source
    from sparsegpt.models import check_model

    check_model(recipe.model)
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    for tracker, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available)):
        if tracker in recipe.trackers and not available():
            raise UserError(f"trackers: {tracker} is not installed; pip install {tracker}, or remove it from trackers")
    for src in {recipe.data.calibration, recipe.data.finetune, *recipe.data.eval}:
        check_source(src)
