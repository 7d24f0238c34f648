"""The progressive scheduler: for each stage of a recipe, the phases of `PIPELINE`, in order, resumable.

    prune           every rank     the previous stage's model (or the dense one) pruned to the stage target: the
                                   calibration set split over the ranks, linears solved round robin
    eval_pruned     every rank     evaluation hooks on the pruned model (perplexity windows split over the ranks)
    finetune        every rank     mask-preserving fine-tuning (ZeRO shards it over the ranks)
    eval_finetuned  every rank     evaluation hooks on the fine-tuned model
    complete        main process   the stage's model is final; leftovers removed; the stage table printed

Every phase is marked done in state.json only after what it leaves on disk is complete, so a killed run started
again with the same command resumes at the first unfinished phase (`sparsegpt/run/rundir.py` owns the run dir).
Before anything is written, everything the recipe implies that can be checked is checked (`check_inputs`).
Process model under `accelerate launch`: every rank runs the "all" phases (each holds the pruned model while
pruning and evaluating; the main process alone writes the run dir), the others wait at the barrier after a "main"
phase; stage boundaries go through disk, which is also what makes every boundary a resume point.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import AutoConfig

from sparsegpt.config.hooks import HOOKS, HookContext
from sparsegpt.config.recipe import Recipe, ResolvedStage, load_recipe
from sparsegpt.core.atomic import recover_tree
from sparsegpt.core.data import calibration_ids, default_seqlen, train_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.signals import EXIT_PREEMPTED, Preempted
from sparsegpt.core.world import World
from sparsegpt.core.zero import torch_linear_kept, whole_models
from sparsegpt.evaluate.runners import evaluate_hooks
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.finetune import finetune
from sparsegpt.prune.sequential import prune_model
from sparsegpt.prune.streaming import prune_streamed
from sparsegpt.run.compare import flatten_for_trackers, format_stage_table
from sparsegpt.run.configs import build_accelerator, finetune_config, prune_config, with_mixed_precision
from sparsegpt.run.lr_search import LR_SEARCH_FILE, Heal, search_lr, search_summary
from sparsegpt.run.memory import plan_for
from sparsegpt.run.preflight import check_data, check_inputs, check_shared, on_main_then_everywhere
from sparsegpt.run.rundir import Phase, RunDir, RunState
from sparsegpt.run.safety import check_disk, damaged_hint, folder_bytes, guarded, repair_state, stage_need, together
from sparsegpt.storage.compact import export, folder_masks, is_compact
from sparsegpt.storage.models import (
    load_for_training,
    load_model,
    load_tokenizer,
    local_folder,
    resolve_model_path,
    save_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of a stage: who runs it, when it is skipped, what it leaves on disk, and the method that runs it."""

    phase: Phase
    ranks: str                                   # "main" (the others wait) | "all"
    skipped: Callable[[ResolvedStage], bool]
    leaves: str
    run: Callable[[Scheduler, ResolvedStage], None]


PIPELINE: tuple[PhaseSpec, ...] = (
    PhaseSpec(Phase.PRUNE, "all", lambda s: False,
              "stages/NN-NAME/pruned: the pruned model + mask.safetensors + prune.json (per-linear stats, world)",
              lambda sched, stage: sched.prune(stage)),
    PhaseSpec(Phase.EVAL_PRUNED, "all", lambda s: "pruned" not in s.eval.phases,
              'a "pruned" record in metrics.jsonl',
              lambda sched, stage: sched.evaluate(stage, "pruned")),
    PhaseSpec(Phase.FINETUNE, "all", lambda s: s.finetune is None,
              "stages/NN-NAME/model (and ckpt/ while it runs)",
              lambda sched, stage: sched.finetune(stage)),
    PhaseSpec(Phase.EVAL_FINETUNED, "all", lambda s: s.finetune is None or "finetuned" not in s.eval.phases,
              'a "finetuned" record in metrics.jsonl',
              lambda sched, stage: sched.evaluate(stage, "finetuned")),
    PhaseSpec(Phase.COMPLETE, "main", lambda s: False,
              "stages/NN-NAME/model alone (pruned/ promoted if not fine-tuned; pruned/, ckpt/ removed)",
              lambda sched, stage: sched.complete(stage)),
)

PRUNE_REPORT = "prune.json"  # in stages/NN-NAME/pruned: per-linear stats and each rank's share of the pass

# The metrics.jsonl phase each evaluation phase writes, and the phase whose time its record's `seconds` includes.
EVAL_OF = {"pruned": (Phase.EVAL_PRUNED, Phase.PRUNE), "finetuned": (Phase.EVAL_FINETUNED, Phase.FINETUNE)}


class Scheduler:
    """Walks a recipe's stages through `PIPELINE` in one process of an `accelerate launch` job (every rank runs one)."""

    def __init__(self, recipe: Recipe, rd: RunDir, accelerator: Accelerator):
        self.recipe, self.rd, self.acc = recipe, rd, accelerator
        self.stages = recipe.resolved_stages()
        self.is_main = accelerator.is_main_process
        self.state = rd.load_state() if self.is_main else RunState()  # only the main process reads or writes it
        self._live: tuple[Path, torch.nn.Module, object, MaskSet] | None = None  # the model a phase left in memory

    def run(self) -> list[dict]:
        """Every unfinished phase of every stage, in order; returns the run's metrics records."""
        world = World.current()
        if self.is_main:
            if repair_state(self.rd, self.state, self.stages):  # outputs deleted since (damaged): redo their phases
                self.rd.save_state(self.state)
            self.rd.drop_unfinished_records(self.state)
        for stage in self.stages:
            finished = self._finished(stage.index)
            if Phase.COMPLETE in finished:
                continue
            source = self._input_dir(stage)
            on_main_then_everywhere(self.acc, lambda: check_disk(self.rd, stage, finished, source, self.recipe))
            log.info("stage %d/%d %s: target %s", stage.index + 1, len(self.stages), stage.name, stage.target)
            for spec in PIPELINE:
                if spec.phase in finished:
                    continue
                if spec.skipped(stage):
                    if self.is_main:
                        self._mark(stage, spec.phase, None)
                    continue
                t0 = time.time()
                together(world, f"before {spec.phase.value} of stage {stage.name}",
                         lambda: spec.run(self, stage) if spec.ranks == "all" or self.is_main
                         else self._release(),  # COMPLETE skipped here: carry no model into the next stage
                         lambda: stage_need(stage, finished, folder_bytes(source), self.recipe)[1])
                if self.is_main:
                    self._mark(stage, spec.phase, time.time() - t0)
        self._release()
        return self.rd.read_metrics() if self.rd.metrics_path.exists() else []

    # -- the phases -------------------------------------------------------------------------------------------
    def prune(self, stage: ResolvedStage) -> None:
        """One-shot prune of the previous stage's model to this stage's target (target 0: keep it as is). Every
        rank holds the model and calibrates its share of the set (`sequential.prune_model` over World.current());
        all end with the same weights; the main process writes the folder."""
        self._release()  # the previous stage's model must not sit beside this one through the pass
        base = folder_masks(self._input_dir(stage)) if stage.index > 0 else None
        report: dict = {"world_size": self.acc.num_processes}
        out = self._dir(stage) / "pruned"
        if stage.prune.stream and (stage.sparsity or stage.prune_n):
            self._prune_streamed(stage, base, report, out)
            return
        model, tok = self._load(self._input_dir(stage))
        if stage.sparsity == 0 and not stage.prune_n:
            masks = base if base is not None else MaskSet.from_model(model)
        else:
            p = stage.prune
            calib = calibration_ids(self.recipe.data.calibration, tok, nsamples=p.nsamples,
                                    seqlen=p.seqlen or default_seqlen(model), seed=self.recipe.seed)
            result = prune_model(model, calib, prune_config(stage), base_masks=base, device=self.acc.device)
            masks = result.masks
            report.update(seconds=round(result.seconds, 3), world=result.world, linears=result.stats,
                          **({"reconstruction": result.reconstruction} if result.reconstruction else {}))
        if self.is_main:
            save_model(model, tok, out, extra_files={PRUNE_REPORT: json.dumps(report, indent=1).encode()})
            masks.save(out / "mask.safetensors")
        self._live = (out, model, tok, masks)

    def _prune_streamed(self, stage: ResolvedStage, base: MaskSet | None, report: dict, out: Path) -> None:
        """`prune.stream`: one decoder layer in host memory at a time, read from the input folder's safetensors
        and (main process) written to `out` (`streaming.prune_streamed`); the model is not kept in memory."""
        source = local_folder(self._input_dir(stage))
        tok, config = load_tokenizer(source), AutoConfig.from_pretrained(source)
        p = stage.prune
        calib = calibration_ids(self.recipe.data.calibration, tok, nsamples=p.nsamples,
                                seqlen=p.seqlen or default_seqlen(config), seed=self.recipe.seed)

        def files(result) -> dict[str, bytes]:
            report.update(seconds=round(result.seconds, 3), world=result.world, linears=result.stats, streamed=True,
                          **({"reconstruction": result.reconstruction} if result.reconstruction else {}))
            return {PRUNE_REPORT: json.dumps(report, indent=1).encode()}

        self._release()
        with whole_models(self.acc):  # the skeleton must not be built under ZeRO-3's zero.Init
            prune_streamed(source, calib, prune_config(stage), out, tokenizer=tok, base_masks=base,
                           device=self.acc.device, dtype=self.recipe.dtype, extra_files=files)

    def evaluate(self, stage: ResolvedStage, phase: str) -> None:
        """Every rank: the stage's hooks on the model `phase` left ("pruned" or "finetuned"), distributed hooks
        split over the ranks (`evaluation.evaluate_hooks`); the main process appends the record."""
        folder = self._dir(stage) / ("pruned" if phase == "pruned" else "model")
        if self.is_main or any(HOOKS[h["type"]].ranks == "all" for h in stage.eval.hooks):
            layerwise = any(h.get("layerwise") for h in stage.eval.hooks)  # wants the model on the host
            model, tok, masks = self._model_at(folder, "cpu" if layerwise else self.acc.device)
        else:  # only the main process runs this stage's hooks: the others need no copy of the model
            model = tok = masks = None
        if phase == "finetuned" and self.is_main:
            masks.verify(model)
        t0 = time.time()
        context = HookContext(stage=stage.index, name=stage.name, phase=phase, target=stage.target,
                              run_dir=str(self.rd.root), device=str(self.acc.device), masks=masks)
        with whole_models(self.acc):  # generate() on the main process alone must not sync with the other ranks
            results = evaluate_hooks(model, tok, stage.eval.hooks, context, fail_fast=stage.eval.fail_on_error)
        model = None  # no later phase reuses an evaluated model (fine-tuning and the next prune load their own)
        self._release()
        if not self.is_main:
            return
        before = self.state.stages[stage.index].seconds.get(EVAL_OF[phase][1], 0.0)
        record = {"stage": stage.index, "name": stage.name, "phase": phase, "target": stage.target,
                  "sparsity": masks.sparsity(), "metrics": results.metrics,
                  "seconds": round(before + time.time() - t0, 3), "time": time.time(),
                  "world": {"size": results.world_size, "eval_shares": results.shares, **_prune_shares(folder)}}
        if results.errors:
            record["errors"] = results.errors
        if phase == "finetuned" and (search := search_summary(self._dir(stage))) is not None:
            record["lr_search"] = search
        self.rd.append_metrics(record)
        if self.recipe.trackers:  # one tracker step per evaluation, in run order
            self.acc.log(flatten_for_trackers(record), step=2 * stage.index + (phase == "finetuned"))
        log.info("stage %s %s: sparsity %.4f %s", stage.name, phase, record["sparsity"], _short(results.metrics))

    @torch_linear_kept()  # zero.Init leaves F.linear patched: later prunes and evaluations must not see it
    def finetune(self, stage: ResolvedStage) -> None:
        """Every rank: fine-tune the pruned model with its mask held (`lr: auto`: the lr searched first, on the tune
        split, by probes that load their own copies); the main process saves stages/NN-NAME/model."""
        self._release()
        lr = search_lr(self.acc, self._dir(stage), stage, lambda c: self._heal_inputs(stage, c),
                       self.recipe.data.finetune) if stage.finetune.lr == "auto" else stage.finetune.lr
        model, tok, masks, data, teacher, cfg = self._heal_inputs(stage, lr)
        finetune(model, data, masks, cfg, accelerator=self.acc, teacher=teacher, ckpt_dir=self._dir(stage) / "ckpt")
        save_finetuned(self.acc, model, tok, masks, self._dir(stage) / "model")
        self.acc.free_memory()
        del model, teacher
        gc.collect()

    def _heal_inputs(self, stage: ResolvedStage, lr: float) -> Heal:
        """The stage's pruned model (sharded as fine-tuning wants it), mask, train blocks, teacher, config at `lr`."""
        pruned = self._dir(stage) / "pruned"
        model, tok = self._load(pruned, sharded=True)
        masks = MaskSet.load(pruned / "mask.safetensors")
        f = stage.finetune
        seqlen = f.seqlen or stage.prune.seqlen or default_seqlen(model)
        data = train_ids(self.recipe.data.finetune, tok, seqlen=seqlen)
        teacher = None
        if f.kd is not None and (f.kd.logit_weight or f.kd.hidden_weight):
            source = {"dense": None, "previous": self._input_dir(stage)}.get(f.kd.teacher, f.kd.teacher)
            teacher, _ = self._load(source or self._dense_path(), sharded=True)
        cfg = finetune_config(stage, self.recipe, world_size=self.acc.num_processes, seqlen=seqlen, lr=lr)
        return Heal(model, tok, masks, data, teacher, cfg)

    def complete(self, stage: ResolvedStage) -> None:
        """Make the stage's model final (a stage without fine-tuning promotes its pruned model) and clean up."""
        self._release()
        sdir = self._dir(stage)
        model, packed = sdir / "model", sdir / "compact"
        if not model.exists() and not packed.exists():
            os.replace(sdir / "pruned", model)
        if self.recipe.save == "compact" and model.exists() and not is_compact(model):
            if not is_compact(packed):  # a kill after the export leaves it complete: reuse it
                shutil.rmtree(packed, ignore_errors=True)
                export(model, packed)
            shutil.rmtree(model)
        if packed.exists() and not model.exists():
            os.replace(packed, model)
        for leftover in sdir.iterdir():  # the pruned copy, checkpoints, temp folders of killed writes
            if leftover.name not in ("model", LR_SEARCH_FILE):
                shutil.rmtree(leftover, ignore_errors=True)
        print(format_stage_table(self.rd.read_metrics()) if self.rd.metrics_path.exists() else
              f"stage {stage.name} complete (no evaluations)", flush=True)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _dir(self, stage: ResolvedStage) -> Path:
        return self.rd.stage_dir(stage.index, stage.name)

    def _input_dir(self, stage: ResolvedStage) -> Path:
        """The model a stage starts from: the previous stage's final model, or the dense model for stage 0."""
        if stage.index == 0:
            return Path(self._dense_path())
        prev = self.stages[stage.index - 1]
        return self.rd.stage_dir(prev.index, prev.name) / "model"

    def _dense_path(self) -> str:
        return resolve_model_path(self.recipe.model)

    def _finished(self, index: int) -> set[Phase]:
        """Phases of a stage the main process's state marks done, broadcast so every rank takes the same path."""
        box = [self.state.finished(index) if self.is_main else None]
        if self.acc.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]

    def _mark(self, stage: ResolvedStage, phase: Phase, seconds: float | None) -> None:
        self.state.mark(stage.index, stage.name, phase, seconds)
        self.rd.save_state(self.state)

    def _model_at(self, folder: Path, device) -> tuple[torch.nn.Module, object, MaskSet]:
        """The model saved in `folder` with its mask: the one the last phase left in memory, or loaded (onto
        `device` directly: no whole host copy per rank)."""
        if self._live is None or self._live[0] != folder:
            self._release()
            model, tok = self._load(folder, device=device)
            self._live = (folder, model, tok, folder_masks(folder))
        return self._live[1:]

    def _release(self) -> None:
        if self._live is not None:
            self._live = None
            gc.collect()
            if torch.cuda.is_available():  # evaluation placed it on the GPU: hand that memory back too
                torch.cuda.empty_cache()

    def _load(self, path: str | Path, *, sharded: bool = False, device="cpu") -> tuple[torch.nn.Module, object]:
        """The model in `path`: whole on CPU, or (`sharded`: for fine-tuning) as `models.load_for_training` puts
        it, straight into this rank's ZeRO-3 partition where the plugin allows."""
        try:
            if sharded:
                return load_for_training(path, self.acc, dtype=self.recipe.dtype)
            with whole_models(self.acc):
                return load_model(str(path), dtype=self.recipe.dtype, device=device)
        except UserError as e:  # a damaged folder of this run: say how to redo it
            raise damaged_hint(e, self.rd, Path(path)) from e


def _prune_shares(folder: Path) -> dict:
    """Each rank's share of the pruning pass that made `folder` (its prune.json), for a "pruned" record."""
    path = folder / PRUNE_REPORT
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {"prune_ranks": (report.get("world") or {}).get("ranks", []), "streamed": report.get("streamed", False)}


def _short(metrics: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))


# -- the recipe's settings as the library's configs ---------------------------------------------------------------

# -- entry --------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    """Entry for train/progressive.py (which parses the flags before importing this module, so --help is quick)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The ~400 k objects the imports made (torch, transformers, deepspeed) live as long as the process: moved out
    # of the collector's sight, each gc.collect() between phases (_release) takes microseconds instead of ~0.5 s.
    gc.freeze()
    try:
        return run(args.recipe, args.run_dir, dry_run=args.dry_run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        log.warning("%s: exiting with %d; run the same command to resume", e, EXIT_PREEMPTED)
        return EXIT_PREEMPTED


def run(recipe_path: Path, run_dir: Path | None = None, *, dry_run: bool = False) -> int:
    """Check everything checkable, create (or reuse) the run dir, then walk the pipeline; 0 when the run is done."""
    recipe = with_mixed_precision(load_recipe(recipe_path))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dry_run:
        print(plan_for(recipe, world_size=world_size))
        return 0
    rd = RunDir(run_dir or Path("runs") / recipe.name)
    check_inputs(recipe, rd)
    accelerator = build_accelerator(recipe, rd.root)
    with guarded(accelerator, rd, recipe, lambda: check_data(recipe, accelerator.num_processes)):  # lock, signals
        if accelerator.is_main_process:
            log.info("accelerator: %s, %d process(es), zero stage %d", accelerator.distributed_type.value,
                     accelerator.num_processes, recipe.distributed.zero_stage)
            rd.create(recipe)
            recover_tree(rd.root)  # what a killed earlier attempt left mid-write
        accelerator.wait_for_everyone()
        check_shared(accelerator, rd)
        if recipe.trackers:
            accelerator.init_trackers(recipe.name, config={"recipe": recipe.fingerprint()[:12], "model": recipe.model})
        torch.manual_seed(recipe.seed)
        records = Scheduler(recipe, rd, accelerator).run()
        if accelerator.is_main_process:
            log.info("run complete: %s (%d evaluations)", rd.root, len(records))
    accelerator.end_training()
    return 0
