"""`lr: auto`: a stage's healing lr chosen on the tune split of its fine-tuning source, never on evaluation windows.

For each candidate lr, ascending, a probe: the stage's starting model loaded fresh from disk, fine-tuned with the
stage's settings (same seed, same data order, KD/LoRA as the stage) for `ProbePlan.steps` steps with the stage's
warm-up and schedule scaled to them, then scored by perplexity on the first `windows` windows (the fine-tuning
seqlen) of the source's tune split. The lowest perplexity wins, ties going to the smaller lr; a probe whose loss
diverges scores nothing and cannot win. Every rank runs every probe (ZeRO shards it as it shards the stage) and
scores all the windows itself (under ZeRO-3 every rank must run the same forwards); rank 0's scores decide and its
choice is broadcast. Memory: one model (and teacher) at a time, as the stage's own fine-tuning holds.

The search is recorded in `stage_dir/lr_search.json`, rewritten atomically by the main process after each
candidate (a killed search resumes after the finished candidates; one with `chosen` is never redone), and in the
stage's "finetuned" metrics record. The global RNG state is restored after the search, so the stage then
fine-tunes exactly as a recipe with the chosen lr written out would.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn

from sparsegpt.config.recipe import Recipe, ResolvedStage
from sparsegpt.config.settings import LrSearchSettings
from sparsegpt.core.atomic import atomic_write_text
from sparsegpt.core.data import HUB_SOURCES, eval_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.world import World
from sparsegpt.evaluate.perplexity import perplexity
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.finetune import TrainingDiverged, finetune

log = logging.getLogger(__name__)

LR_SEARCH_FILE = "lr_search.json"  # in the stage dir; kept when the stage completes


class Heal(NamedTuple):
    """What fine-tuning a stage needs, freshly loaded (`Scheduler._heal_inputs`): one probe's or the stage's."""

    model: nn.Module
    tokenizer: object
    masks: MaskSet
    data: torch.Tensor          # (rows, seqlen) train blocks
    teacher: nn.Module | None
    cfg: FinetuneConfig


@dataclass(frozen=True)
class ProbePlan:
    """The probes of one stage's search: every candidate fine-tunes `steps` steps of `tokens_per_step` tokens."""

    candidates: tuple[float, ...]
    steps: int
    warmup_steps: int
    tokens_per_step: int
    stage_steps: int
    windows: int

    @property
    def cost(self) -> float:
        """The probes' fine-tuning tokens as a fraction of the stage's own."""
        return len(self.candidates) * self.steps / self.stage_steps


def probe_plan(search: LrSearchSettings, *, stage_steps: int, warmup_steps: int, tokens_per_step: int) -> ProbePlan:
    """`search.probe_steps` steps per candidate; the stage's warm-up scaled by probe/stage steps and rounded, at
    least one step when the stage warms up."""
    steps = search.probe_steps(stage_steps, tokens_per_step)
    warmup = min(steps, max(round(warmup_steps * steps / stage_steps), 1)) if warmup_steps else 0
    return ProbePlan(tuple(search.candidates), steps, warmup, tokens_per_step, stage_steps, search.windows)


def tune_windows(source: str, tokenizer, *, seqlen: int, windows: int) -> torch.Tensor:
    """The first `windows` (n, seqlen) windows of `source`'s tune split; UserError if it holds fewer."""
    ids = eval_ids(source, tokenizer, seqlen=seqlen, split="tune", max_windows=windows)
    if ids.shape[0] < windows:
        raise UserError(f"lr_search.windows is {windows} but the tune split of {source} holds {ids.shape[0]} "
                        f"windows of {seqlen} tokens; use windows <= {ids.shape[0]}")
    return ids


def check_search(recipe: Recipe, tokenizer, *, world_size: int, seqlen_of: Callable[[object], int]) -> None:
    """Before the run dir is touched: each `lr: auto` stage's probes fit its budget, its tune split has the
    windows, and no evaluation hook reads that tune split (scores on it are tuned, not held out)."""
    d = recipe.distributed
    searched = [s for s in recipe.resolved_stages() if s.finetune is not None and s.finetune.search is not None]
    if not searched:
        return
    source = recipe.data.finetune
    tuned = {"tune"} | ({"validation"} if source in HUB_SOURCES else set())  # hub tune = validation (data.py)
    for stage in recipe.resolved_stages():
        for hook in stage.eval.hooks:
            if hook["type"] == "perplexity" and hook.get("source") == source and hook.get("split", "test") in tuned:
                raise UserError(f"stages[{stage.index}].eval: a perplexity hook reads the {hook['split']} split of "
                                f"{source}, which lr: auto tunes on; evaluate on split test")
    for stage in searched:
        f = stage.finetune
        seqlen = seqlen_of(stage)
        steps = f.num_steps(world_size, micro_batch_size=d.micro_batch_size, grad_accum=d.grad_accum, seqlen=seqlen)
        try:
            f.search.probe_steps(steps, d.micro_batch_size * d.grad_accum * world_size * seqlen)
            tune_windows(source, tokenizer, seqlen=seqlen, windows=f.search.windows)
        except UserError as e:
            raise UserError(f"stages[{stage.index}].finetune: {e}") from None


def search_lr(accelerator: Accelerator, stage_dir: Path, stage: ResolvedStage, load: Callable[[float], Heal],
              source: str) -> float:
    """The lr of `stage` (with `lr: auto`): the recorded choice, or the search (module docstring) run or resumed;
    every rank returns rank 0's choice. `load(lr)` loads the stage's inputs afresh with the config at `lr`."""
    search, name = stage.finetune.search, stage.name
    world = World.current()
    path = stage_dir / LR_SEARCH_FILE
    record = _read_on_main(world, path)
    if record is not None and record.get("chosen") is not None:
        log.info("stage %s: lr auto -> %g (recorded in %s)", name, record["chosen"], path)
        return float(record["chosen"])
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        record = _run(accelerator, path, search, load, source, name, record, world)
    finally:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    chosen = float(world.broadcast_object(record["chosen"]))
    log.info("stage %s: fine-tuning at lr %g (rank %d)", name, chosen, world.rank)
    return chosen


def _run(acc: Accelerator, path: Path, search: LrSearchSettings, load: Callable[[float], Heal], source: str,
         name: str, record: dict | None, world: World) -> dict:
    done = {r["lr"]: r for r in (record or {}).get("results", [])}
    for lr in sorted(search.candidates):
        if lr in done:
            continue
        heal = load(lr)
        cfg, seqlen = heal.cfg, heal.data.shape[1]
        plan = probe_plan(search, stage_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                          tokens_per_step=cfg.micro_batch_size * cfg.grad_accum * acc.num_processes * seqlen)
        setup = {"split": "tune", "source": source, "seqlen": seqlen, "world_size": acc.num_processes,
                 "seed": cfg.seed, **dataclasses.asdict(plan), "candidates": list(plan.candidates),
                 "cost": round(plan.cost, 6)}
        if record is None:
            record = {**setup, "results": []}
            log.info("stage %s: lr auto: probing %s on %s tune (%d windows of %d): %s", name,
                     ", ".join(f"{c:g}" for c in plan.candidates), source, plan.windows, seqlen,
                     search.cost(plan.stage_steps, plan.tokens_per_step))
        elif {k: record.get(k) for k in setup} != setup:
            raise UserError(f"{path} was made with other probe settings ({_diff(record, setup)}); resume with the "
                            "settings it was made with, or delete it to search again")
        record["results"].append(_probe(acc, heal, lr, plan, source, name))
        del heal
        acc.free_memory()
        gc.collect()
        if len(record["results"]) == len(plan.candidates):
            best = choose(record["results"], name)
            record["chosen"] = best["lr"]
            log.info("stage %s: lr auto -> %g (tune ppl %.3f; probes cost %s)", name, best["lr"], best["ppl"],
                     search.cost(plan.stage_steps, plan.tokens_per_step))
        if world.is_main:
            atomic_write_text(path, json.dumps(record, indent=1))
        failpoint("finetune/lr-search")
    return record


def choose(results: list[dict], name: str = "") -> dict:
    """The winning probe result: lowest tune perplexity, ties to the smaller lr; diverged ones (ppl None) never win."""
    scored = [r for r in results if r["ppl"] is not None]
    if not scored:
        tried = ", ".join(f"{r['lr']:g}" for r in results)
        raise UserError(f"stage {name}: every lr candidate diverged in its probe ({tried}); give smaller "
                        "lr_search.candidates")
    return min(scored, key=lambda r: (r["ppl"], r["lr"]))


def _probe(acc: Accelerator, heal: Heal, lr: float, plan: ProbePlan, source: str, name: str) -> dict:
    """One candidate: fine-tune the fresh model for the probe's steps at `lr`, score the tune windows."""
    cfg = dataclasses.replace(heal.cfg, lr=lr, steps=plan.steps, warmup_steps=plan.warmup_steps, checkpoint_every=0,
                              checkpoint_final=False)
    tune = tune_windows(source, heal.tokenizer, seqlen=heal.data.shape[1], windows=plan.windows)
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # the same start for every candidate (LoRA's init, dropout)
    try:
        result = finetune(heal.model, heal.data, heal.masks, cfg, accelerator=acc, teacher=heal.teacher)
    except TrainingDiverged as e:
        log.info("stage %s: lr %g diverged at probe step %d", name, lr, e.step)
        return {"lr": lr, "ppl": None, "diverged_at": e.step, "seconds": round(time.time() - t0, 3)}
    ppl = perplexity(heal.model, tune, world=World())  # every rank all windows: the same forwards under ZeRO-3
    log.info("stage %s: lr %g -> tune ppl %.3f (probe loss %.4f, %.0f s)", name, lr, ppl, result.final_loss,
             time.time() - t0)
    return {"lr": lr, "ppl": ppl, "final_loss": result.final_loss, "seconds": round(time.time() - t0, 3)}


def search_summary(stage_dir: Path) -> dict | None:
    """The search's choice and scores for a metrics record (None without a finished search)."""
    record = _read(stage_dir / LR_SEARCH_FILE)
    if record is None or record.get("chosen") is None:
        return None
    return {"chosen": record["chosen"], "cost": record["cost"], "probe_steps": record["steps"],
            "tune_ppl": {f"{r['lr']:g}": r["ppl"] for r in record["results"]}}


def _read_on_main(world: World, path: Path) -> dict | None:
    """`_read` on rank 0, its record or its error on every rank (no rank left waiting in the broadcast)."""
    box = None
    if world.is_main:
        try:
            box = (_read(path), None)
        except UserError as e:
            box = (None, str(e))
    record, error = world.broadcast_object(box)
    if error is not None:
        raise UserError(error)
    return record


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # written atomically, so this is damage, not a torn write
        raise UserError(f"cannot read {path} ({e}); delete it to search the lr again") from None


def _diff(record: dict, setup: dict) -> str:
    return ", ".join(f"{k} {record.get(k)!r} vs now {v!r}" for k, v in setup.items() if record.get(k) != v)
