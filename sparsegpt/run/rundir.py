"""The run directory: its paths, its typed state (`state.json`), its evaluation log (`metrics.jsonl`).

    RUN_DIR/.lock                  the live run's lock (`sparsegpt/run/lock.py`): one writer per run dir
    RUN_DIR/recipe.yaml            the recipe as run; written last at creation, so it marks an initialised run dir
    RUN_DIR/state.json             phases finished per stage (`RunState`; atomic temp + rename; main process only)
    RUN_DIR/metrics.jsonl          one JSON object per evaluation (stage, name, phase, target, sparsity, metrics)
    RUN_DIR/stages/NN-NAME/model   the finished stage's model: HF safetensors + mask.safetensors
    RUN_DIR/stages/NN-NAME/pruned  the pruned model while the stage is being fine-tuned (removed when done)
    RUN_DIR/stages/NN-NAME/ckpt    mid-stage fine-tuning checkpoints (removed when the stage completes)

A phase counts as done only once state.json says so; an evaluation record whose phase state.json does not mark
done (a kill between the append and the state write) is dropped by `RunDir.drop_unfinished_records` on resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from sparsegpt.config.recipe import Recipe, load_recipe
from sparsegpt.core.atomic import atomic_write_text, disk_full_as_error
from sparsegpt.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILES = ".lock"  # the prefix of the lock's files (run/lock.py): a dead first attempt's lock is no content
RECORD_KEYS = ("stage", "name", "phase", "target", "sparsity", "metrics")


class Phase(str, Enum):
    """The scheduler's phases of one stage, in order (their values are what state.json records)."""

    PRUNE = "prune"
    EVAL_PRUNED = "eval_pruned"
    FINETUNE = "finetune"
    EVAL_FINETUNED = "eval_finetuned"
    COMPLETE = "complete"


# metrics.jsonl's `phase` (the public contract's "pruned" | "finetuned") -> the scheduler phase that writes it
RECORD_PHASES = {"pruned": Phase.EVAL_PRUNED, "finetuned": Phase.EVAL_FINETUNED}


class StageState(BaseModel):
    """One stage in state.json: the phases finished (done or skipped) and each run phase's seconds."""

    name: str
    done: list[Phase] = Field(default_factory=list)
    seconds: dict[Phase, float] = Field(default_factory=dict)


class RunState(BaseModel):
    """state.json: per stage index, its `StageState`; the recipe fingerprint and creation time."""

    stages: dict[int, StageState] = Field(default_factory=dict)
    fingerprint: str | None = None
    created: float | None = None

    def finished(self, index: int) -> set[Phase]:
        """Phases of stage `index` marked done."""
        entry = self.stages.get(index)
        return set(entry.done) if entry is not None else set()

    def mark(self, index: int, name: str, phase: Phase, seconds: float | None) -> None:
        """Record `phase` of stage `index` as done (seconds None: skipped, no time recorded)."""
        entry = self.stages.setdefault(index, StageState(name=name))
        if phase not in entry.done:
            entry.done.append(phase)
        if seconds is not None:
            entry.seconds[phase] = round(seconds, 3)


@dataclass(frozen=True)
class RunDir:
    """One run directory: paths, state, metrics; only the main process writes."""

    root: Path

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / "stages" / f"{index:02d}-{name}"

    # -- creation ---------------------------------------------------------------------------------------------
    def check(self, recipe: Recipe) -> None:
        """Refuse a run dir made by another recipe, or a non-empty folder that is no run dir; writes nothing."""
        if self.recipe_path.exists():
            old = load_recipe(self.recipe_path)
            if old.fingerprint() != recipe.fingerprint():
                raise UserError(
                    f"run dir {self.root} holds another recipe ({old.name!r}, fingerprint {old.fingerprint()[:12]} != "
                    f"{recipe.fingerprint()[:12]}); pass a new --run-dir or the recipe it was started with")
        elif self.root.exists() and any(not p.name.startswith(LOCK_FILES) for p in self.root.iterdir()):
            raise UserError(f"run dir {self.root} exists, is not empty and has no recipe.yaml; "
                            "pass an empty or new --run-dir")

    def create(self, recipe: Recipe) -> None:
        """Initialise the run dir for this recipe unless it already is (call `check` first)."""
        if self.recipe_path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.save_state(RunState(fingerprint=recipe.fingerprint(), created=time.time()))
        atomic_write_text(self.recipe_path, recipe.to_yaml())  # last: its presence marks the dir as initialised

    # -- state.json -------------------------------------------------------------------------------------------
    def load_state(self) -> RunState:
        """The run's state (empty before the first phase)."""
        return read_state(self.root) or RunState()

    def save_state(self, state: RunState) -> None:
        body = state.model_dump(mode="json")
        atomic_write_text(self.state_path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    # -- metrics.jsonl ----------------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        """Append one evaluation record as one line, in one write, flushed and fsynced."""
        append_metrics(self.root, record)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.root)

    def drop_unfinished_records(self, state: RunState) -> int:
        """Rewrite metrics.jsonl without the records whose phase `state` does not mark done; returns how many."""
        if not self.metrics_path.exists():
            return 0
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-append: its phase was never marked done
                continue
            phase = RECORD_PHASES.get(rec.get("phase"))
            if isinstance(rec.get("stage"), int) and phase in state.finished(rec["stage"]):
                keep.append(line)
        dropped = len(lines) - len(keep)
        if dropped:
            log.info("dropping %d metric record(s) of unfinished phases", dropped)
            atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        return dropped

    def last_model_dir(self) -> Path | None:
        """The model folder of the last completed stage, or None before the first one completes."""
        state = self.load_state()
        done = [i for i in sorted(state.stages) if Phase.COMPLETE in state.stages[i].done]
        return self.stage_dir(done[-1], state.stages[done[-1]].name) / "model" if done else None


def read_state(run_dir: str | os.PathLike) -> RunState | None:
    """RUN_DIR/state.json if present, else None; UserError naming the file when it is not a valid state."""
    path = Path(run_dir) / "state.json"
    if not path.is_file():
        return None
    try:
        return RunState.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        raise UserError(f"{path} is not a valid run state ({e.errors()[0]['msg']}); restore it, or delete it to "
                        "report without timings") from e


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    """Append one evaluation record to RUN_DIR/metrics.jsonl as one line, in one write, flushed and fsynced."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing or record["phase"] not in RECORD_PHASES:
        raise ValueError(f"metrics record needs {RECORD_KEYS} with phase in {tuple(RECORD_PHASES)}; missing "
                         f"{missing}, phase {record.get('phase')!r}")
    line = json.dumps({"time": time.time(), **record}) + "\n"
    with disk_full_as_error(run_dir), open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a torn last line (a crash mid-append) is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass a run directory written by train/progressive.py")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                log.warning("%s: skipping the torn last line %d", path, i)
                continue
            raise UserError(f"{path} line {i} is not JSON ({e}); fix or remove that line") from e
    if not records:
        raise UserError(f"{path} is empty: run dir {run_dir} has no evaluations yet")
    return records
