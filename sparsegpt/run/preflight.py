"""What the scheduler checks before it writes anything: inputs every rank can check alone, the data (main process,
its error raised on every rank), and that every rank sees the run dir the main process created."""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, is_tensorboard_available, is_wandb_available
from transformers import AutoConfig, AutoTokenizer

from sparsegpt.config.recipe import Recipe
from sparsegpt.core.data import check_source, default_seqlen, train_tokens
from sparsegpt.core.errors import UserError
from sparsegpt.run.lr_search import check_search
from sparsegpt.run.rundir import RunDir
from sparsegpt.storage.models import check_model, resolve_model_path


def check_inputs(recipe: Recipe, rd: RunDir) -> None:
    """What needs no model: the model and sources can be found, trackers are installed, the run dir is this
    recipe's (or new). Every rank runs it; it writes nothing."""
    check_model(recipe.model)
    for tracker, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available)):
        if tracker in recipe.trackers and not available():
            raise UserError(f"trackers: {tracker} is not installed; pip install {tracker}, or remove it from trackers")
    for source in {recipe.data.calibration, recipe.data.finetune, *recipe.data.eval}:
        check_source(source)
    if recipe.save == "compact":
        streamed = [s.index for s in recipe.resolved_stages()[1:] if s.prune.stream and (s.sparsity or s.prune_n)]
        if streamed:
            raise UserError(f"stages[{streamed[0]}].prune.stream reads the previous stage's model as dense "
                            "safetensors, but save: compact stores it compact; use save: dense, or stream: false")
    rd.check(recipe)


def check_data(recipe: Recipe, world_size: int) -> None:
    """What needs the tokenizer: every stage's calibration set fits the calibration text, and the fine-tuning text
    holds one optimizer step. Main process only (it may convert a GGUF model into the model cache, not the run).
    Each source's train split is tokenized once, whatever the number of stages."""
    path = resolve_model_path(recipe.model)
    tok, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    d, data = recipe.distributed, recipe.data
    tokens: dict[str, tuple[torch.Tensor, bool]] = {}

    def count(source: str) -> tuple[int, bool]:
        if source not in tokens:
            tokens[source] = train_tokens(source, tok)
        ids, documents = tokens[source]
        return len(ids), documents

    for stage in recipe.resolved_stages():
        p = stage.prune
        seqlen = p.seqlen or default_seqlen(config)
        if stage.sparsity or stage.prune_n:
            n, documents = count(data.calibration)
            if not documents and n < p.nsamples * seqlen:
                raise UserError(f"{data.calibration} train has {n} tokens; {p.nsamples} × {seqlen} = "
                                f"{p.nsamples * seqlen} needed for calibration; lower nsamples or seqlen")
        if stage.finetune is not None:
            ft_seqlen = stage.finetune.seqlen or seqlen
            rows = count(data.finetune)[0] // ft_seqlen
            need = d.micro_batch_size * d.grad_accum * world_size
            if rows < need:
                raise UserError(f"stages[{stage.index}].finetune: {data.finetune} train has {rows} blocks of "
                                f"{ft_seqlen} tokens but one optimizer step needs {need} (micro_batch_size x "
                                "grad_accum x processes); use more text, a shorter seqlen or smaller batches")
    check_search(recipe, tok, world_size=world_size,
                 seqlen_of=lambda s: s.finetune.seqlen or s.prune.seqlen or default_seqlen(config))


def on_main_then_everywhere(accelerator: Accelerator, check: Callable[[], None]) -> None:
    """Run `check` on the main process; its UserError is raised on every rank (so none waits forever)."""
    box: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            check()
        except UserError as e:
            box[0] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0] is not None:
        raise UserError(box[0])


def check_shared(accelerator: Accelerator, rd: RunDir) -> None:
    """UserError on every rank unless every rank sees the run dir the main process created: stage models,
    checkpoints and state go through it, so it must be on a filesystem all ranks share."""
    if accelerator.num_processes == 1:
        return
    blind = [rank for rank, seen in enumerate(gather_object([rd.recipe_path.is_file()])) if not seen]
    if blind:
        raise UserError(f"run dir {rd.root} is not visible from rank(s) {blind}: every rank reads and writes it, so "
                        "put it on a filesystem all nodes share (NFS, Lustre, ...) and pass that path as --run-dir")
