"""Stage step 2, healing: mask-exact fine-tuning (`finetune`, its `config`), mask enforcement on weights, fp32
masters and Adam moments, knowledge distillation, sparse LoRA, trainer checkpoints, DeepSpeed configuration."""
