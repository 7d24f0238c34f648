"""One process of the MoE ZeRO-3 test (`accelerate launch --config_file recipes/accelerate/zero3.yaml
--num_processes 2 --mixed_precision no tests/moe_zero_worker.py OUT_DIR`, CPU over gloo).

Each process prunes the same tiny Mixtral (fused 3-D experts, every expert with its own Hessian) and fine-tunes
it twice, with the router's load-balancing loss in the training loss: without mask enforcement (the negative
control) and with it. After each run it gathers the fp32 master weights and both Adam moments of every masked
parameter (the fused expert tensors included) with DeepSpeed's public accessors and counts non-zeros at masked
and kept positions; it also splits the loss on a fixed batch into cross-entropy and aux loss. Results go to
OUT_DIR/rank{r}.json with the mask bytes the hooks and the enforcer hold (zero_worker.RecordingEnforcer); the
enforced model is saved to OUT_DIR/model with its mask for the test to reload.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.nn import functional as F
from transformers import MixtralConfig, MixtralForCausalLM
from zero_worker import RecordingEnforcer, mask_sizes

from sparsegpt.core.masks import MaskSet
from sparsegpt.heal import finetune as finetune_module
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.finetune import finetune
from sparsegpt.prune.sequential import PruneConfig, prune_model

VOCAB, AUX_COEF = 96, 0.05


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    """A 2-layer Mixtral with 4 experts (top-2) whose training loss includes the router's aux loss."""
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, num_local_experts=4,
                           num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=AUX_COEF)
    return MixtralForCausalLM(config).float()


def toy_ids(rows: int = 16, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    """Learnable rows: each counts up by a row-specific stride modulo the vocab."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=gen)
    stride = torch.randint(1, 5, (rows, 1), generator=gen)
    return (start + stride * torch.arange(seqlen)) % VOCAB


def _loss_parts(engine, ids: torch.Tensor) -> dict:
    """Loss, cross-entropy and aux loss on a fixed batch; every rank runs it (ZeRO-3 forwards are collective)."""
    engine.eval()
    with torch.no_grad():
        out = engine(input_ids=ids, labels=ids)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    engine.train()
    return {"loss": float(out.loss), "ce": float(ce), "aux_loss": float(out.aux_loss), "aux_coef": AUX_COEF}


def _state_report(model, masks: MaskSet) -> dict:
    """Non-zeros of the gathered fp32 master weights and Adam moments at masked and kept positions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    report = {"masked_nonzero": {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0},
              "kept_nonzero": {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}, "partitioned_expert_params": 0}
    for name, (param, mask) in masks.param_masks(model).items():
        if ".experts." in name and param.ds_tensor.numel() < mask.numel():
            report["partitioned_expert_params"] += 1
        copies = {"fp32": safe_get_full_fp32_param(param)}
        copies.update({key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")})
        for key, full in copies.items():
            full = full.reshape(mask.shape).cpu()
            report["masked_nonzero"][key] += int(torch.count_nonzero(full[mask]))
            report["kept_nonzero"][key] += int(torch.count_nonzero(full[~mask]))
    return report


def _run(accelerator: Accelerator, enforcement: str, out: Path) -> dict:
    model, ids = tiny_mixtral(), toy_ids()
    masks = prune_model(model, ids, PruneConfig(sparsity=0.6, batch_size=8, blocksize=16)).masks
    fixed = ids[:4]
    sizes = mask_sizes(model, masks)
    before = _loss_parts(model, fixed)["loss"]
    cfg = FinetuneConfig(steps=3, lr=3e-3, micro_batch_size=2, seed=0, weight_decay=0.1, schedule="constant",
                         mask_enforcement=enforcement)
    result = finetune(model, ids, masks, cfg, accelerator=accelerator)
    engine = accelerator.deepspeed_engine_wrapped.engine
    parts = _loss_parts(engine, fixed)
    report = {"enforcement": enforcement, "losses": result.losses, "fixed_before": before,
              "fixed_after": parts["loss"], **parts, **_state_report(model, masks),
              "held_bytes": RecordingEnforcer.last.held, "mask_sizes": sizes}
    if enforcement != "none":
        state = accelerator.get_state_dict(engine)  # collective; full on the main process only
        if accelerator.is_main_process:
            accelerator.unwrap_model(engine).save_pretrained(out / "model", state_dict=state)
            masks.save(out / "model" / "mask.safetensors")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return report


def main(out: str) -> None:
    torch.set_num_threads(1)
    finetune_module.MaskEnforcer = RecordingEnforcer  # the trainer builds the recording one
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    out_dir = Path(out)
    runs = [_run(accelerator, enforcement, out_dir) for enforcement in ("none", "full")]
    stage = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"]
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "stage": stage, "runs": runs}
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
