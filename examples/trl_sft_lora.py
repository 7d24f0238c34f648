"""Fine-tune a pruned model with TRL's SFTTrainer and PEFT LoRA; the merged model keeps the mask exactly.

    python examples/trl_sft_lora.py --model out/s50 --out out/s50-sft-lora

--model: a pruned folder (`sparsegpt prune`, with mask.safetensors) or a run's stage folder. The base weights
stay frozen (and exactly 0 where pruned); the adapters are merged as W + mask ⊙ (B·A), so the zeros survive.
Drop `peft_config` to train every weight instead: SparseMaskCallback then guards the gradients and Adam state.
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sparsegpt.core.data import load_text
from sparsegpt.heal.trainer import SparseMaskCallback
from sparsegpt.storage.models import load_model, save_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--data", default="stdlib-docs")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--seqlen", type=int, default=128)
args = parser.parse_args()

model, tokenizer = load_model(args.model)
text = load_text(args.data, "train")
data = Dataset.from_dict({"text": [text[i:i + 2000] for i in range(0, min(len(text), 400_000), 2000)]})
callback = SparseMaskCallback(args.model)  # the folder's mask.safetensors
config = SFTConfig(output_dir=args.out + "-checkpoints", max_steps=args.steps, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, learning_rate=1e-3, max_length=args.seqlen, logging_steps=5,
                   save_strategy="no", report_to=[], seed=0,
                   bf16=torch.cuda.is_available())  # TRL defaults to bf16, which a CPU refuses
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"])
trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                     callbacks=[callback], peft_config=lora)
trainer.train()
merged = callback.guard.merge(trainer.model)  # W + mask ⊙ (scale·B·A): the plain transformers model
mask = callback.guard.masks
mask.verify(merged)  # UserError if a pruned weight were non-zero
save_model(merged, tokenizer, args.out, extra_files={"mask.safetensors": Path(args.model, "mask.safetensors")
                                                     .read_bytes()})
print(f"saved {args.out}: {mask.sparsity():.1%} of the masked weights exactly 0")
