"""One process of the multi-process tests (`accelerate launch ... tests/zero_worker.py OUT_DIR` for DeepSpeed,
`torchrun` for DDP), and the tiny pruned-model helpers the single-process fine-tuning tests share.

Each process trains a tiny 70 %-pruned Llama four times: without enforcement (the negative control: the
pruned weights revive), with the gradient hooks only, with post-step enforcement only (no hooks, so the
gradients at masked positions are non-zero and only the enforcer keeps master weights and moments at 0), and
with both. It counts non-zeros of the fp32 master weights and Adam moments at every masked position, the
loss on a fixed batch, and saves the model to OUT_DIR/model-{enforcement}. It also records the bytes of mask
tensors the trainer's hooks and enforcer hold (`MaskEnforcer.held_bytes`) when the enforcer is built and after
every step, beside the sizes they are judged against. Results go to OUT_DIR/rank{r}.json; the test asserts on
them and reloads the saved models with plain transformers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.masks import MaskSet, mask_in_param_layout
from sparsegpt.heal import finetune as finetune_module
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.dsconfig import cpu_deepspeed_handlers
from sparsegpt.heal.enforce import MaskEnforcer
from sparsegpt.heal.finetune import finetune

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, deterministic in `seed`."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def magnitude_prune(model, sparsity: float = 0.7) -> MaskSet:
    """Zero the smallest-|w| `sparsity` fraction of every prunable linear; the mask of those zeros."""
    with torch.no_grad():
        for module in prunable_linears(model).values():
            w = module.weight
            k = int(sparsity * w.numel())
            w.view(-1)[w.abs().flatten().argsort()[:k]] = 0
    return MaskSet.from_model(model)


def toy_ids(rows: int = 16, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    """Learnable token rows: each row counts up by a row-specific stride modulo the vocab."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=gen)
    stride = torch.randint(1, 5, (rows, 1), generator=gen)
    return (start + stride * torch.arange(seqlen)) % VOCAB


def worker_config(enforcement: str = "full", grad_accum: int = 2) -> FinetuneConfig:
    """The fine-tune settings of every worker run: 4 steps of 2 rows × grad_accum micro-batches per process."""
    return FinetuneConfig(steps=4, lr=3e-3, micro_batch_size=2, grad_accum=grad_accum, seed=0, weight_decay=0.1,
                          schedule="constant", mask_enforcement=enforcement)


def _fixed_batch_loss(engine, ids) -> float:
    """Loss on a fixed batch; every rank runs it (ZeRO-3 forwards are collective)."""
    engine.eval()
    with torch.no_grad():
        loss = float(engine(input_ids=ids, labels=ids).loss)
    engine.train()
    return loss


def _count(report: dict, key: str, full: torch.Tensor, mask: torch.Tensor) -> None:
    full = full.reshape(mask.shape).cpu()
    report["masked_nonzero"][key] += int(torch.count_nonzero(full[mask]))
    report["kept_nonzero"][key] += int(torch.count_nonzero(full[~mask]))


def _state_report(model, masks: MaskSet, ckpt: Path | None) -> dict:
    """Non-zero counts of the fp32 master weights and Adam moments at masked and kept positions: gathered from
    the ZeRO partitions with DeepSpeed's public accessors, or (DDP) the weights and the checkpoint's moments."""
    report = {"masked_nonzero": {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0},
              "kept_nonzero": {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}, "weights_checked": 0}
    if ckpt is not None:  # accelerate's optimizer.bin: state indexed by parameter order
        state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
        index = {name: i for i, (name, p) in enumerate(model.named_parameters()) if p.requires_grad}
    for name, module in masks.modules(model).items():
        mask = mask_in_param_layout(module, masks.masks[name])
        if ckpt is None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            _count(report, "fp32", safe_get_full_fp32_param(module.weight), mask)
            for key in ("exp_avg", "exp_avg_sq"):
                _count(report, key, safe_get_full_optimizer_state(module.weight, key), mask)
        else:
            _count(report, "fp32", module.weight.detach(), mask)
            for key in ("exp_avg", "exp_avg_sq"):
                _count(report, key, state[index[f"{name}.weight"]][key], mask)
        report["weights_checked"] += 1
    return report


class RecordingEnforcer(MaskEnforcer):
    """The trainer's enforcer, recording `held_bytes()` (its tensors and the live hooks') when built and after
    every step; `finetune` builds it after registering the hooks."""

    last: RecordingEnforcer | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = [self.held_bytes()]
        RecordingEnforcer.last = self

    def __call__(self) -> None:
        super().__call__()
        self.held.append(self.held_bytes())


def mask_sizes(model, masks: MaskSet) -> dict:
    """Sizes the held mask bytes are judged against, from the unpartitioned model: every masked parameter's mask
    at 1 bit per weight, unpacked in the parameter's dtype, and the largest decoder layer's mask at 1 byte per
    weight (bool)."""
    bits, unpacked, layers, params = 0, 0, {}, 0
    for name, param, mask in masks.iter_param_masks(model):
        params += 1
        bits += (mask.numel() + 7) // 8
        unpacked += mask.numel() * param.element_size()
        layer = re.search(r"\.layers\.(\d+)\.", name).group(1)
        layers[layer] = layers.get(layer, 0) + mask.numel()
    return {"full_bits": bits, "full_unpacked": unpacked, "layer_unpacked": max(layers.values()),
            "params": params}


def _run(accelerator: Accelerator, enforcement: str, out: Path) -> dict:
    model = tiny_llama()
    masks = magnitude_prune(model)
    sizes = mask_sizes(model, masks)
    ids = toy_ids()
    fixed = ids[:4].to(accelerator.device)
    ddp = accelerator.state.deepspeed_plugin is None
    cfg = worker_config(enforcement, grad_accum=2)
    cfg.checkpoint_every = cfg.steps if ddp else 0  # DDP: the moments are read back from the checkpoint
    before = _fixed_batch_loss(model.to(accelerator.device), fixed)
    result = finetune(model, ids, masks, cfg, accelerator=accelerator, ckpt_dir=out / f"ckpt-{enforcement}")
    engine = model if ddp else accelerator.deepspeed_engine_wrapped.engine  # ZeRO-3 forwards run on all ranks
    optimizer = "AdamW" if ddp else type(engine.optimizer.optimizer).__name__
    ckpt = out / f"ckpt-{enforcement}" / f"step-{cfg.steps:08d}" if ddp else None
    report = {"enforcement": enforcement, "optimizer": optimizer, "losses": result.losses, "fixed_before": before,
              "fixed_after": _fixed_batch_loss(engine, fixed), **_state_report(model, masks, ckpt),
              "held_bytes": RecordingEnforcer.last.held, "mask_sizes": sizes, "safe_fp32_calls": SAFE_CALLS[0]}
    SAFE_CALLS[0] = 0
    if enforcement == "none":  # the negative control: revived weights, which save_finetuned refuses to save
        accelerator.free_memory()
        return report
    save_finetuned(accelerator, model, None, masks, out / f"model-{enforcement}")  # the test reloads it
    accelerator.free_memory()
    return report


SAFE_CALLS = [0]  # calls of deepspeed.utils.safe_get_local_fp32_param (the enforcer's copying ZeRO-3 accessor)


def _count_safe_fp32_calls() -> None:
    import deepspeed.utils

    original = deepspeed.utils.safe_get_local_fp32_param

    def counted(param):
        SAFE_CALLS[0] += 1
        return original(param)

    deepspeed.utils.safe_get_local_fp32_param = counted


def main(out: str) -> None:
    torch.set_num_threads(1)
    finetune_module.MaskEnforcer = RecordingEnforcer  # the trainer builds the recording one
    _count_safe_fp32_calls()
    accelerator = Accelerator(kwargs_handlers=cpu_deepspeed_handlers())
    out_dir = Path(out)
    reports = [_run(accelerator, enforcement, out_dir) for enforcement in ("none", "hooks", "step", "full")]
    plugin = accelerator.state.deepspeed_plugin
    backend = f"zero{plugin.deepspeed_config['zero_optimization']['stage']}" if plugin is not None else "ddp"
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "backend": backend,
              "runs": reports}
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
