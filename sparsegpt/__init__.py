"""sparsegpt: progressive SparseGPT pruning with mask-preserving fine-tuning."""

import importlib

from sparsegpt.core.errors import UserError

__version__ = "0.1.0"

# Public names resolved on first use (PEP 562): `import sparsegpt.config.recipe`, `sparsegpt --help` load no torch.
_LAZY = {"prune_matrix": "sparsegpt.prune.solver", "load_compact": "sparsegpt.storage.compact",
         "MaskGuard": "sparsegpt.heal.guard", "load_mask": "sparsegpt.heal.guard",
         "mask_report": "sparsegpt.heal.guard",
         "SparseMaskCallback": "sparsegpt.heal.trainer", "DistillationMixin": "sparsegpt.heal.trainer",
         "DistillingTrainer": "sparsegpt.heal.trainer"}
__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsegpt' has no attribute {name!r}")
