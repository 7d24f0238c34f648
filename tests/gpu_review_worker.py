"""One process of the issue-24 multi-process tests (tests/test_gpu_review.py), under
`accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2` on CPU (DeepSpeed over gloo).

    release RECIPE RUN_DIR OUT   the progressive run, recording per rank at every phase's entry and exit and at
                                 `prune_model`'s entry: how many whole models `Scheduler._load` made are still
                                 alive (weak references, after gc), this process's resident set (MB) and whether
                                 torch.nn.functional.linear is still torch's (deepspeed.zero.Init patches it)
    padding OUT                  a ZeRO-3 model whose linears do not split evenly over 2 ranks: the last rank's
                                 partition ends in padding (uninitialised memory); filled with 1.0 there, the
                                 enforcer must still count no revived weight
Results go to OUT/rank{r}.json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch

LIVE: weakref.WeakSet = weakref.WeakSet()
EVENTS: list[dict] = []


def _rss_mb() -> float:
    """This process's resident set now (not the peak), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _record(where: str, stage: int) -> None:
    gc.collect()
    EVENTS.append({"where": where, "stage": stage, "live": len(LIVE), "rss_mb": round(_rss_mb(), 1),
                   "linear_patched": torch.nn.functional.linear is not torch._C._nn.linear})


def release(recipe: str, run_dir: str, out: str) -> None:
    from sparsegpt.run import scheduler

    load = scheduler.Scheduler._load

    def recording_load(self, path, **kwargs):
        model, tok = load(self, path, **kwargs)
        if not kwargs.get("sharded"):
            LIVE.add(model)
        return model, tok

    def wrap(spec):
        def run(sched, stage):
            _record(f"{spec.phase.value}:enter", stage.index)
            spec.run(sched, stage)
            _record(f"{spec.phase.value}:exit", stage.index)
        return dataclasses.replace(spec, run=run)

    prune_model = scheduler.prune_model

    def recording_prune(*args, **kwargs):
        _record("prune_model", -1)
        return prune_model(*args, **kwargs)

    scheduler.Scheduler._load = recording_load
    scheduler.PIPELINE = tuple(wrap(spec) for spec in scheduler.PIPELINE)
    scheduler.prune_model = recording_prune
    code = scheduler.run(Path(recipe), Path(run_dir))
    _write(out, {"code": code, "events": EVENTS})


def padding(out: str) -> None:
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM
    from zero_worker import magnitude_prune

    from sparsegpt.heal.config import FinetuneConfig
    from sparsegpt.heal.dsconfig import configure_for_finetune, cpu_deepspeed_handlers, deepspeed_plugin
    from sparsegpt.heal.enforce import MaskEnforcer

    torch.manual_seed(0)  # gate/up/down: 35 x 33 = 1155 weights, odd: the last of 2 ranks gets one padding entry
    config = LlamaConfig(hidden_size=33, intermediate_size=35, num_hidden_layers=1, num_attention_heads=11,
                         head_dim=8, num_key_value_heads=1, vocab_size=96, max_position_embeddings=32)
    model = LlamaForCausalLM(config).float()
    masks = magnitude_prune(model)
    plugin = deepspeed_plugin(3, micro_batch=1, grad_accum=1)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=cpu_deepspeed_handlers(deepspeed=True))
    configure_for_finetune(accelerator, FinetuneConfig(steps=1, micro_batch_size=1, grad_accum=1), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(model)
    enforcer = MaskEnforcer(module, masks, optimizer)
    padded = 0
    with torch.no_grad():
        for slot in enforcer.slots:
            local = slot.param.ds_tensor.data.view(-1)
            padded += local.numel() - slot.mask.local_valid
            local[slot.mask.local_valid:] = 1.0  # what uninitialised padding may hold
    _write(out, {"padded": padded, "revived": enforcer.revived(), "slots": len(enforcer.slots)})


def _write(out: str, report: dict) -> None:
    Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    {"release": release, "padding": padding}[mode](*args)
