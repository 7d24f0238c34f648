"""What keeps a run whole on a cluster, wired into the scheduler in a few lines: the run dir's lock and the stop
signals for the run's lifetime (`guarded`), a phase run on every rank with its failure raised on every rank
(`together`), the disk space a stage needs checked before it starts (`check_disk`), and phases whose outputs
have gone missing (a damaged folder the user deleted, as the load errors advise) run again (`repair_state`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from accelerate import Accelerator

from sparsegpt.config.recipe import Recipe, ResolvedStage
from sparsegpt.core import signals
from sparsegpt.core.atomic import DiskFull, free_bytes, size_text
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import World, agree
from sparsegpt.heal.checkpoint import KEEP_CHECKPOINTS
from sparsegpt.run.lock import RunLock
from sparsegpt.run.preflight import on_main_then_everywhere
from sparsegpt.run.rundir import Phase, RunDir, RunState

log = logging.getLogger(__name__)


@contextlib.contextmanager
def guarded(accelerator: Accelerator, rd: RunDir, recipe: Recipe, check: Callable[[], None]) -> Iterator[None]:
    """The main process takes the run dir's lock, then runs `check` (the data checks); a UserError of either is
    raised on every rank before anything else is written. Then every rank handles the stop signals until the block
    ends; the lock is released at exit (a killed process's lock is taken over by the next start)."""
    lock = RunLock(rd.root) if accelerator.is_main_process else None

    def take() -> None:
        lock.acquire()
        try:
            check()
        except BaseException:
            lock.release()
            raise

    on_main_then_everywhere(accelerator, take)
    signals.install(recipe.run.preempt_grace_s)
    try:
        yield
    finally:
        signals.uninstall()
        if lock is not None:
            lock.release()


def together(world: World, where: str, run: Callable[[], None], need: Callable[[], int]) -> None:
    """A phase: first a safe point (a stop request raises `Preempted` on every rank), then `run()` on this rank and
    one gather: a failure on any rank raises on every rank (it replaces the barrier after a phase, so a
    main-process write that fails cannot leave the others waiting). A full disk's error gets the bytes `need()`
    estimates."""
    signals.stop_point(world, where)

    def step() -> None:
        try:
            run()
        except DiskFull as e:
            raise e.needing(need()) from e

    agree(world, step)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors") if f.is_file())


def stage_need(stage: ResolvedStage, finished: set[Phase], model_bytes: int, recipe: Recipe) -> tuple[int, int]:
    """(certain, estimated) bytes the unfinished phases of `stage` write, for a model whose weights take
    `model_bytes`: certain = the pruned and final model folders and one checkpoint's weights; the estimate adds
    each checkpoint's fp32 master weights and Adam moments (12 bytes a parameter; KEEP_CHECKPOINTS + 1 exist while
    the next is written)."""
    certain = 0 if Phase.PRUNE in finished else model_bytes
    estimate = certain
    if stage.finetune is not None and Phase.FINETUNE not in finished:
        params = model_bytes // (2 if recipe.dtype in ("bfloat16", "float16") else 4)
        checkpoint = model_bytes + (0 if stage.finetune.lora is not None else 12 * params)
        copies = KEEP_CHECKPOINTS + 1 if stage.finetune.checkpoint_every else 1
        certain += 2 * model_bytes
        estimate += model_bytes + copies * checkpoint
    return certain, estimate


def check_disk(rd: RunDir, stage: ResolvedStage, finished: set[Phase], input_dir: Path, recipe: Recipe) -> None:
    """UserError when the run dir's filesystem clearly lacks room for what the stage will write; a warning when it
    has less than the estimate."""
    certain, estimate = stage_need(stage, finished, folder_bytes(input_dir), recipe)
    free = free_bytes(rd.root)
    if free < certain:
        raise UserError(f"the filesystem of run dir {rd.root} has {size_text(free)} free but stage {stage.name} "
                        f"will write at least {size_text(certain)} (its model folders and a checkpoint; about "
                        f"{size_text(estimate)} with all checkpoints); free some space or use another --run-dir")
    if free < estimate:
        log.warning("stage %s may write up to %.2f GiB (checkpoints included) but %s has %.2f GiB free",
                    stage.name, estimate / 2**30, rd.root, free / 2**30)


def repair_state(rd: RunDir, state: RunState, stages: list[ResolvedStage]) -> bool:
    """Unmark the phases whose outputs a later phase still needs but are gone (deleted because damaged), so they
    run again (the run is deterministic: they write the same). True when state changed (saved by the caller)."""
    changed = False
    for i, stage in enumerate(stages):
        done = state.finished(stage.index)
        sdir = rd.stage_dir(stage.index, stage.name)
        has = {name: (sdir / name).is_dir() for name in ("pruned", "model")}
        lost: set[Phase] = set()
        if Phase.COMPLETE in done:
            later = stages[i + 1] if i + 1 < len(stages) else None
            if not has["model"] and later is not None and Phase.PRUNE not in state.finished(later.index):
                lost = set(done)  # the next stage starts from this model: redo the stage
        else:
            if stage.finetune is not None and Phase.FINETUNE in done and not has["model"]:
                lost |= {Phase.FINETUNE, Phase.EVAL_FINETUNED}
            needs_pruned = (Phase.EVAL_PRUNED not in done or Phase.FINETUNE not in done - lost
                            or (stage.finetune is None and not has["model"]))
            if Phase.PRUNE in done and needs_pruned and not has["pruned"]:
                lost.add(Phase.PRUNE)
        lost &= done
        if lost:
            log.warning("stage %s: %s missing; running %s again", stage.name, sdir,
                        ", ".join(sorted(p.value for p in lost)))
            entry = state.stages[stage.index]
            entry.done = [p for p in entry.done if p not in lost]
            changed = True
    return changed


def damaged_hint(error: UserError, rd: RunDir, folder: Path) -> UserError:
    """A load error of a folder inside the run dir, with what to do: delete it, the phase that wrote it reruns."""
    if rd.root.resolve() not in Path(folder).resolve().parents:
        return error
    return UserError(f"{error}; it is this run's own {Path(folder).relative_to(rd.root)}: delete that folder and run "
                     "the same command again to redo the phase that wrote it")
