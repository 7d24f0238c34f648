"""Compact sparse checkpoints: each pruned linear stored as its kept values plus 1 bit per weight, nothing else.

A compact folder is a Hugging Face folder (config.json, generation_config.json, tokenizer files, and the other
files of the source) whose weights are in `compact-NNNNN-of-MMMMM.safetensors` shards listed by
`sparsegpt-compact.json`, the marker. Unpruned tensors are stored exactly as in the dense save. A pruned linear
(a weight named by the source's mask.safetensors) with weight `P`, read as (out, in), is stored as either

- unstructured: `P.values` (the kept weights, row-major, weight dtype), `P.bitmask` (uint8, np.packbits of the
  (out, in) keep mask, 1 = kept) and `P.rowptr` (out + 1 cumulative kept counts: row i's values are
  values[rowptr[i]:rowptr[i + 1]]), or
- exact 2:4 (two kept in every group of 4 inputs): `P.values` (out, in/2) and `P.indices` (uint8, out × ceil(in/8):
  per group a nibble p0 | p1 << 2 with the kept positions p0 < p1, the even group in the low nibble) — the
  packed values and the un-tiled metadata of PyTorch's CUTLASS semi-structured tensors.

Every shard's metadata says `format` = "sparsegpt-compact-v1" and describes its encoded weights (`params`).
Shards are written streamed, one source tensor in memory at a time; loading decodes one tensor at a time and
hands the dense state dict to transformers, so the model equals the dense-with-zeros save bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sparsegpt.core import masks as mask_io
from sparsegpt.core.errors import UserError
from sparsegpt.storage.compact_codec import (
    BITMASK,
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT,
    INDEX_FILE,
    MASK_FILE,
    SEMI_24,
    _check_spec,
    _open,
    decode,
    encode_semi_24,
    is_compact,
    keep_mask,
    weight_dtype,
)
from sparsegpt.storage.compact_export import ExportSummary, check_out_dir, export, resolve_source, save_compact

# the public API of the format (also what tests and commands use)
__all__ = ["BITMASK", "DEFAULT_MAX_SHARD_BYTES", "FORMAT", "INDEX_FILE", "SEMI_24", "ExportSummary", "check_out_dir",
           "decode", "encode_semi_24", "export", "folder_masks", "is_compact", "load_compact", "load_masks",
           "read_state_dict", "resolve_source", "save_compact"]


log = logging.getLogger(__name__)


# -- loading ------------------------------------------------------------------------------------------------------
def _read_index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); expected the index of a compact folder") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise UserError(f"{path} has format {found!r}, expected {FORMAT!r}; written by another tool or version")
    if not isinstance(index.get("weight_map"), dict):
        raise UserError(f"{path} has no weight_map; the index is corrupt")
    return index


def _iter_stored(folder: Path) -> Iterator[tuple[str, dict | None, dict[str, Tensor]]]:
    """(parameter name, encoded spec or None, its stored tensors) shard by shard; UserError on a foreign,
    truncated or incomplete folder, naming the file and the tensor."""
    index = _read_index(folder)
    weight_map: dict[str, str] = index["weight_map"]
    seen: set[str] = set()
    for shard in dict.fromkeys(weight_map.values()):
        with _open(folder / shard) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"{folder / shard} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                                "written by another tool or version")
            try:
                params = json.loads(meta.get("params", "{}"))
            except ValueError as e:
                raise UserError(f"{folder / shard}: its params metadata is not JSON ({e}); the file is corrupt") from e
            keys = set(f.keys())
            missing = sorted(name for name, s in weight_map.items() if s == shard and name not in keys)
            if missing:
                raise UserError(f"{folder / shard} lacks tensor {missing[0]} that {INDEX_FILE} lists; the file is "
                                "truncated or from another export")
            parts: set[str] = set()
            for param, spec in params.items():
                spec = _check_spec(folder / shard, param, spec)
                suffixes = ("values", "indices") if spec["encoding"] == SEMI_24 else ("values", "bitmask", "rowptr")
                absent = [f"{param}.{s}" for s in suffixes if f"{param}.{s}" not in keys]
                if absent:
                    raise UserError(f"{folder / shard} lacks {absent[0]} of the {spec['encoding']} weight {param}; "
                                    "the file is truncated or corrupt")
                parts.update(f"{param}.{s}" for s in suffixes)
                seen.add(param)
                yield param, spec, {s: f.get_tensor(f"{param}.{s}") for s in suffixes}
            for name in sorted(keys - parts):
                if name in seen:
                    raise UserError(f"tensor {name} is stored twice in {folder}; the export is corrupt")
                seen.add(name)
                yield name, None, {"tensor": f.get_tensor(name)}



def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict of a compact folder (what the dense save holds), decoded one tensor at a time."""
    return {name: decode(name, spec, tensors) if spec is not None else tensors["tensor"]
            for name, spec, tensors in _iter_stored(Path(path))}


def load_masks(path: str | os.PathLike) -> mask_io.MaskSet:
    """The MaskSet (True = pruned, (out, in)) of a compact folder's encoded linears, from their bitmasks/indices."""
    return mask_io.MaskSet({name.removesuffix(".weight"): ~keep_mask(name, spec, tensors)
                            for name, spec, tensors in _iter_stored(Path(path)) if spec is not None})


def load_compact(path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a compact folder: a plain transformers model equal bit for bit to loading the
    dense-with-zeros save with the same dtype (eval mode; nothing is returned when any tensor is inconsistent)."""
    folder = Path(path)
    if not is_compact(folder):
        raise UserError(f"{folder} is not a compact folder (no {INDEX_FILE}); export one with `sparsegpt export`")
    torch_dtype = weight_dtype(dtype)
    state_dict = read_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{folder}: model type {config.model_type!r} has no causal-LM class in transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch_dtype,
                                              output_loading_info=True)
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        kind, names = next(iter(problems.items()))
        raise UserError(f"{folder}: the stored tensors do not fit the config ({kind.replace('_', ' ')}: "
                        f"{names[0]}{' and more' if len(names) > 1 else ''}); the export is incomplete or foreign")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def folder_masks(path: str | os.PathLike) -> mask_io.MaskSet | None:
    """The mask saved with a model folder: a compact folder's bitmasks, a dense folder's mask.safetensors, or None
    (no mask saved; callers fall back to the model's exact zeros)."""
    folder = Path(path)
    if is_compact(folder):
        return load_masks(folder)
    return mask_io.MaskSet.load(folder / MASK_FILE) if (folder / MASK_FILE).is_file() else None
