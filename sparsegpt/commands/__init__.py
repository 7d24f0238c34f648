"""One module per `sparsegpt` subcommand: each defines HELP, add_arguments(parser) and run(args) -> int."""

COMMANDS = ("prune", "finetune", "eval", "compare", "report")
