"""The `sparsegpt` subcommands: name -> one-line help. Module `sparsegpt.commands.<name>` (dashes as underscores)
defines add_arguments(parser) and run(args) -> int, and its docstring is the command's --help text. The CLI
imports only the module of the command being run, so `sparsegpt --help` needs neither torch nor transformers."""

COMMANDS = {
    "prune": "one-shot prune a model to a target sparsity (SparseGPT / Wanda / magnitude)",
    "finetune": "fine-tune a pruned model with its mask held exactly (KD, LoRA, DeepSpeed ZeRO)",
    "eval": "evaluate a model: perplexity, lm-eval tasks, sparsity, samples",
    "compare": "compare run dirs: table, CSV and plot of a metric vs sparsity, best run per sparsity",
    "report": "report on one run: per-stage sparsity, metrics, times, plot",
    "export": "write a pruned model as a compact checkpoint (kept values + 1-bit mask; 2:4 semi-structured)",
}
