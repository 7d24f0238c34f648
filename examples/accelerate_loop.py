"""A plain accelerate training loop on a pruned model, with MaskGuard keeping every pruned weight exactly 0.

    python examples/accelerate_loop.py --model out/s50 --out out/s50-loop

The same two calls work in any loop: `MaskGuard(mask).attach(model, optimizer)` after `accelerator.prepare`
(or `deepspeed.initialize`; pass the engine), then `guard.step()` after every optimizer step.
"""

import argparse

import torch
from accelerate import Accelerator

from sparsegpt.core.data import train_ids
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.guard import MaskGuard
from sparsegpt.storage.models import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="a pruned folder with mask.safetensors")
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--seqlen", type=int, default=128)
args = parser.parse_args()

accelerator = Accelerator(gradient_accumulation_steps=2)
model, tokenizer = load_model(args.model)
rows = train_ids("stdlib-docs", tokenizer, seqlen=args.seqlen)
loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
model.train()
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
guard = MaskGuard(args.model).attach(model, optimizer)  # after prepare

step = 0
while step < args.steps:
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step happened
            guard.step()
            step += 1
            accelerator.print(f"step {step} loss {loss.item():.4f}")
            if step == args.steps:
                break
accelerator.print(guard.verify())  # weights, fp32 masters, Adam moments: 0 at every pruned entry
guard.detach()
save_finetuned(accelerator, model, tokenizer, guard.masks, args.out)
