"""Fine-tune ("heal") a pruned model with its mask held fixed: every pruned weight stays exactly 0, in the model,
in DeepSpeed's fp32 master weights and in the Adam moments. Optional distillation from the dense model (--kd)
or sparse-merging LoRA adapters (--lora). The mask comes from the model folder's mask.safetensors, or from
the model's exact zeros. Output: a Hugging Face folder (safetensors) with mask.safetensors.

Single process, or any accelerate setup (DDP, DeepSpeed ZeRO-2/3, CPU offload) via `accelerate launch`; each
recipes/accelerate/*.yaml header gives its GPU and CPU command. Precision is the launch's --mixed_precision
(the ZeRO configs' DeepSpeed JSON fills its "auto" bf16/fp16 from it; default no = fp32); --dtype bfloat16/float16
needs DeepSpeed ZeRO (float32 master weights), else use float32 weights under --mixed_precision bf16. Checkpoints
(--ckpt-dir) must be on a filesystem every process shares: each rank loads its own files from them.

examples:
  sparsegpt finetune --model out/s70 --data stdlib-docs --steps 100 --seqlen 256 --out out/s70-healed
  accelerate launch --config_file recipes/accelerate/zero3.yaml --mixed_precision bf16 -m sparsegpt.cli finetune \\
      --model out/l7b-s70 --data c4 --steps 2000 --lr 5e-5 --warmup 100 --micro-batch 4 --grad-accum 8 \\
      --kd meta-llama/Llama-2-7b-hf --kd-logit 1.0 --checkpoint-every 200 --out out/l7b-s70-healed
  DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero3.yaml -m sparsegpt.cli finetune \\
      --model out/s70 --data stdlib-docs --steps 20 --seqlen 128 --out out/s70-healed      # 2 CPU processes
  sparsegpt finetune --model out/s70 --data notes.txt --steps 200 --lora 16 --out out/s70-lora
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sparsegpt.core.data import check_source, default_seqlen, train_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.precision import check_master_weights
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.dsconfig import cpu_deepspeed_handlers, make_accelerator
from sparsegpt.heal.finetune import finetune
from sparsegpt.heal.lora import LoraSettings
from sparsegpt.storage.compact import folder_masks
from sparsegpt.storage.models import DTYPES, check_model, load_for_training, resolve_model_path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt finetune`."""
    p.add_argument("--model", required=True, help="pruned model: local HF folder (with mask.safetensors), GGUF, alias")
    p.add_argument("--data", required=True, help="training text: wikitext2, c4, ptb, stdlib-docs or a .txt/.jsonl")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--seqlen", type=int, help="tokens per packed training block (default: context, capped at 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"], help="after warmup")
    p.add_argument("--micro-batch", type=int, default=1, help="blocks per process per forward")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--kd", metavar="DENSE_DIR", help="distill from this (dense) teacher model")
    p.add_argument("--kd-logit", type=float, help="weight of the logit KL term (default 1.0 with --kd)")
    p.add_argument("--kd-hidden", type=float, default=0.0, help="weight of the hidden-state (SquareHead) term")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of the logit KL")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R LoRA adapters, merged back sparsely")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    p.add_argument("--dtype", default="auto", help="model weight dtype: auto, float32, bfloat16, float16")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: OUT.ckpt); rerun to resume from it")
    p.add_argument("--out", type=Path, required=True, help="output HF folder (replaced atomically when done)")


def _config(args: argparse.Namespace) -> FinetuneConfig:
    kd_logit = args.kd_logit if args.kd_logit is not None else (1.0 if args.kd else 0.0)
    kd = None
    if args.kd or kd_logit or args.kd_hidden:  # a KD weight without --kd: finetune() says the teacher is missing
        kd = KDConfig(logit_weight=kd_logit, hidden_weight=args.kd_hidden, temperature=args.kd_temperature)
    return FinetuneConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                          schedule=args.schedule, micro_batch_size=args.micro_batch, grad_accum=args.grad_accum,
                          max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                          gradient_checkpointing=args.gradient_checkpointing, kd=kd,
                          lora=LoraSettings(r=args.lora) if args.lora else None,
                          checkpoint_every=args.checkpoint_every)


def _check_args(args: argparse.Namespace) -> None:
    check_model(args.model)
    if args.kd:
        check_model(args.kd)
    check_source(args.data)
    if args.seqlen is not None and args.seqlen < 2:
        raise UserError(f"--seqlen must be >= 2 (a causal-LM block predicts tokens 2..n), got {args.seqlen}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder; choose a folder path")


def run(args: argparse.Namespace) -> int:
    """Load model (+ teacher), mask and data; fine-tune; save the folder from the main process."""
    cfg = _config(args)
    _check_args(args)
    # The Accelerator first: under a ZeRO-3 config with zero3_init_flag (recipes/accelerate/zero3*.yaml) it makes
    # from_pretrained build student and teacher straight into each rank's partition (`zero.loads_sharded`).
    accelerator = make_accelerator(kwargs_handlers=cpu_deepspeed_handlers())  # + the collective timeout
    if args.dtype in DTYPES and not args.lora:  # before loading; finetune() checks what "auto" and LoRA give
        plugin = accelerator.state.deepspeed_plugin
        check_master_weights({DTYPES[args.dtype]}, zero_stage=plugin.zero_stage if plugin else -1,
                             mixed_precision=accelerator.mixed_precision)
    model, tokenizer = load_for_training(args.model, accelerator, dtype=args.dtype)
    teacher = load_for_training(args.kd, accelerator, dtype=args.dtype)[0] if args.kd else None
    saved = folder_masks(resolve_model_path(args.model))
    masks = saved if saved is not None else MaskSet.from_model(model)
    log.info("mask: %s (sparsity %.4f)", "saved with the model" if saved is not None else "exact zeros",
             masks.sparsity())
    seqlen = args.seqlen or default_seqlen(model, cap=512)
    ids = train_ids(args.data, tokenizer, seqlen=seqlen)
    ckpt_dir = args.ckpt_dir or args.out.with_name(args.out.name + ".ckpt")
    result = finetune(model, ids, masks, cfg, accelerator=accelerator, teacher=teacher,
                      ckpt_dir=ckpt_dir if cfg.checkpoint_every else None)
    save_finetuned(accelerator, model, tokenizer, masks, args.out)
    if accelerator.is_main_process:
        print(json.dumps({"out": str(args.out), "steps": result.steps, "final_loss": result.final_loss,
                          "tokens_per_s": round(result.tokens_per_s, 1), "sparsity": masks.sparsity()}))
    return 0
