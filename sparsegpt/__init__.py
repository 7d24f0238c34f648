"""sparsegpt: progressive SparseGPT pruning with mask-preserving fine-tuning."""

import importlib

from sparsegpt.errors import UserError

__version__ = "0.1.0"

# Public names resolved on first use (PEP 562), so `import sparsegpt.recipe` and `sparsegpt --help` load no torch.
_LAZY = {"prune_matrix": "sparsegpt.solver", "load_compact": "sparsegpt.compact"}
__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsegpt' has no attribute {name!r}")
