"""sparsegpt: progressive SparseGPT pruning with mask-preserving fine-tuning."""

from sparsegpt.errors import UserError

__all__ = ["UserError", "prune_matrix", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import sparsegpt` stays cheap for the CLI's --help
    if name == "prune_matrix":
        from sparsegpt.solver import prune_matrix

        return prune_matrix
    raise AttributeError(f"module 'sparsegpt' has no attribute {name!r}")
