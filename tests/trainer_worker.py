"""The transformers-Trainer runs the trainer tests share: in-process for one process, and one process of
`torchrun --nproc_per_node 2 tests/trainer_worker.py OUT_DIR BACKEND` (DeepSpeed ZeRO-2, ZeRO-3 or ZeRO-3 with the
optimizer offloaded, from the Trainer's own `TrainingArguments(deepspeed=...)`, gloo on CPU) for two.

Each run trains the tiny 70 %-pruned Llama of zero_worker for 4 optimizer steps (2 rows × 2 accumulation
micro-batches per process, activation checkpointing on, a checkpoint at steps 2 and 4): with `SparseMaskCallback`;
again from the step-2 checkpoint (`resume_from_checkpoint`) to step 4; and without the callback (the negative
control). After each it records `guard.mask_report` (gathered weights, fp32 masters, Adam moments at pruned
positions), how many kept weights moved, the losses and a digest of the final weights; OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from zero_worker import magnitude_prune, tiny_llama, toy_ids

from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.world import leave
from sparsegpt.heal.guard import MaskGuard, mask_report
from sparsegpt.heal.trainer import SparseMaskCallback, cpu_deepspeed_arguments

STEPS = 4
_AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
         "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
DEEPSPEED = {  # the Trainer fills the "auto" values from TrainingArguments
    "zero2": {**_AUTO, "zero_optimization": {"stage": 2}},
    "zero3": {**_AUTO, "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}},
    "zero3_offload": {**_AUTO, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                          "betas": "auto", "eps": "auto"}},
                      "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                            "offload_optimizer": {"device": "cpu"}}},
}


def dataset(rows: int = 32) -> list[dict]:
    return [{"input_ids": row, "labels": row} for row in toy_ids(rows=rows)]


def arguments(out: Path, deepspeed: dict | None = None, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="constant", optim="adamw_torch",
                    save_steps=2, logging_steps=1, report_to=[], seed=0, data_seed=0, disable_tqdm=True,
                    activation_checkpointing=True, use_cpu=deepspeed is None)
    if deepspeed is not None:
        settings.update(deepspeed=deepspeed, **cpu_deepspeed_arguments())
    return TrainingArguments(**{**settings, **overrides})


def _digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                   for _, p in sorted(model.named_parameters()))).hexdigest()


def run(out: Path, *, callback: bool, resume: str | None = None, deepspeed: dict | None = None) -> dict:
    """One Trainer run (every rank); what the tests assert on. ZeRO-3: the weights are gathered for the counts."""
    model = tiny_llama()
    masks = magnitude_prune(model)
    start = {name: module.weight.detach().clone() for name, module in masks.modules(model).items()}
    trainer = Trainer(model=model, args=arguments(out, deepspeed), train_dataset=dataset(),
                      callbacks=[SparseMaskCallback(masks)] if callback else [])
    result = trainer.train(resume_from_checkpoint=resume)
    report = mask_report(masks, trainer.model, trainer.optimizer)
    moved = kept = 0
    gather = contextlib.nullcontext()
    if deepspeed is not None:  # a no-op for parameters ZeRO did not partition
        from deepspeed.runtime.zero import GatheredParameters

        gather = GatheredParameters(list(trainer.model.parameters()), modifier_rank=None)
    with gather:
        for name, module in masks.modules(trainer.model).items():
            keep = ~masks.masks[name]
            moved += int((module.weight.detach().cpu()[keep] != start[name][keep]).sum())
            kept += int(keep.sum())
        digest = _digest(trainer.model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"nonzero": report.nonzero, "kinds": sorted(report.kinds), "moved": moved, "kept": kept,
            "losses": losses, "digest": digest, "global_step": result.global_step,
            "optimizer": type(trainer.optimizer.optimizer).__name__, "world": trainer.args.world_size}


def scenario(out: Path, deepspeed: dict | None = None) -> dict:
    """The three runs the tests check: guarded, resumed from the guarded run's step-2 checkpoint, unguarded."""
    guarded = run(out / "guarded", callback=True, deepspeed=deepspeed)
    resumed = run(out / "resumed", callback=True, deepspeed=deepspeed,
                  resume=str(out / "guarded" / "checkpoint-2"))
    control = run(out / "control", callback=False, deepspeed=deepspeed)
    return {"guarded": guarded, "resumed": resumed, "control": control}


def saved_mask_exact(folder: Path, masks: MaskSet) -> bool:
    """The checkpoint's saved weights (plain transformers load) have zeros exactly where the masks say."""
    from transformers import AutoModelForCausalLM

    reloaded = MaskSet.from_model(AutoModelForCausalLM.from_pretrained(folder))
    return all(torch.equal(reloaded.masks[name] & mask, mask) for name, mask in masks.masks.items())


def late_attach() -> dict:
    """A guard attached before `deepspeed.initialize` (its keeps fit the unpartitioned weights) must refuse to
    step; attaching to the engine itself (its own optimizer) is right, with another optimizer it is refused."""
    import deepspeed

    model = tiny_llama()
    masks = magnitude_prune(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = MaskGuard(masks).attach(model, optimizer)  # the mistake: before DeepSpeed wraps and partitions
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = toy_ids()[:2]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    messages = {}
    for case, action in (("late", guard.step),
                         ("other", lambda: MaskGuard(masks).attach(engine, torch.optim.AdamW(model.parameters())))):
        try:
            action()
        except UserError as e:
            messages[case] = str(e)
    guard.detach()
    messages["engine"] = str(MaskGuard(masks).attach(engine).verify())
    engine.destroy()
    return messages


def main(out: str, backend: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    record = scenario(out_dir, deepspeed=DEEPSPEED[backend])
    if backend == "zero3":
        record["late_attach"] = late_attach()
    import torch.distributed as dist

    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()  # every rank done with collectives
    leave()  # the group's gloo threads joined before the interpreter finalizes (core/world.py says why)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
