"""sparsegpt: progressive SparseGPT pruning with mask-preserving fine-tuning."""

import importlib

from sparsegpt.core.errors import UserError

__version__ = "0.1.0"

# Public names resolved on first use (PEP 562): `import sparsegpt.config.recipe`, `sparsegpt --help` load no torch.
_LAZY = {"prune_matrix": "sparsegpt.prune.solver", "load_compact": "sparsegpt.storage.compact"}
__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsegpt' has no attribute {name!r}")
