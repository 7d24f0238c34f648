"""Fine-tune a pruned model with the transformers Trainer under its own DeepSpeed ZeRO-3, mask kept exact.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/trainer_zero3.py --model out/s50 --out out/s50-trainer
    torchrun --nproc_per_node 8 examples/trainer_zero3.py --model out/s50 --out out/s50-trainer --bf16   # GPUs

--model: a pruned folder (`sparsegpt prune`, with mask.safetensors) or a run's stage folder. --teacher DENSE adds
logit distillation (DistillingTrainer). The output folder is a plain transformers model plus its mask.
"""

import argparse
from pathlib import Path

from transformers import Trainer, TrainingArguments

from sparsegpt.core.data import train_ids
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.guard import load_mask
from sparsegpt.heal.trainer import DistillingTrainer, SparseMaskCallback, cpu_deepspeed_arguments
from sparsegpt.storage.models import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--teacher", help="dense model to distill from (logit KD)")
parser.add_argument("--data", default="stdlib-docs")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--seqlen", type=int, default=128)
parser.add_argument("--bf16", action="store_true")
args = parser.parse_args()

mask = load_mask(args.model)  # mask.safetensors of the folder (or of its model/ or pruned/)
# TrainingArguments(deepspeed=...) before from_pretrained: each rank then loads only its shard (zero.Init)
training = TrainingArguments(
    output_dir=args.out + "-checkpoints", max_steps=args.steps, per_device_train_batch_size=2,
    gradient_accumulation_steps=2, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=2,
    activation_checkpointing=True, bf16=args.bf16, save_steps=10, logging_steps=5, report_to=[], seed=0,
    deepspeed=str(Path(__file__).with_name("zero3.json")), **cpu_deepspeed_arguments())
model, tokenizer = load_model(args.model)
rows = train_ids(args.data, tokenizer, seqlen=args.seqlen)
data = [{"input_ids": row, "labels": row} for row in rows]
callback = SparseMaskCallback(mask)
common = dict(model=model, args=training, train_dataset=data, callbacks=[callback])
if args.teacher:
    trainer = DistillingTrainer(**common, teacher=load_model(args.teacher)[0], kd=KDConfig(logit_weight=1.0))
else:
    trainer = Trainer(**common)
last = max(Path(training.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), default=None)
trainer.train(resume_from_checkpoint=str(last) if last else None)  # run it again: it resumes
trainer.save_model(args.out)  # ZeRO-3: the 16-bit weights gathered (zero3.json)
if trainer.is_world_process_zero():
    tokenizer.save_pretrained(args.out)
    mask.save(Path(args.out) / "mask.safetensors")
    print(f"saved {args.out}: {mask.sparsity():.1%} of the masked weights exactly 0 (verified in training)")
trainer.accelerator.end_training()  # leave the process group; at exit sparsegpt.core.world waits out its gloo threads
