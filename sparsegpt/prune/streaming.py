"""Layer-streamed pruning: the model is never whole in host memory while it is pruned.

A weightless skeleton (`init_empty_weights(include_buffers=False)`: parameters on meta, buffers such as rotary
`inv_freq` real) is pruned by `sequential.prune_model` through a `LayerAccess` that reads each decoder layer from
the checkpoint when it is entered and, once pruned, writes it to its own shard and frees it. The checkpoint is
checked whole first; embeddings and head are read once and freed after the capture pass; the folder is renamed
into place when complete. Tensors are read with plain reads at the checked header's offsets into memory the model
owns (a `safe_open` tensor is a view of the mmap, resident as long as the weight lives) and written from their own
memory (`save_file` first serializes a whole shard into one buffer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.conversion_mapping import PrefixChange, get_model_conversion_mapping
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from sparsegpt.core.allocator import StreamingPolicy, trim
from sparsegpt.core.architectures import family_of
from sparsegpt.core.atomic import write_dir_atomically
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.world import World
from sparsegpt.prune.sequential import LayerAccess, PruneConfig, PruneResult, prune_model
from sparsegpt.storage.compact_codec import _CODES, _DTYPE_OF_CODE, MASK_FILE, is_compact, write_safetensors_header
from sparsegpt.storage.models import DTYPES, resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


# -- the checkpoint: checked headers, tensors read into owned memory ------------------------------------------------

class Checkpoint:
    """The safetensors tensors of a local Hugging Face folder: per tensor its file, dtype, shape and byte range,
    from headers checked against the files' sizes when it is opened (UserError naming the file otherwise)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.metadata: dict = {}
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                parsed = json.loads(index.read_text())
                self.metadata = parsed.get("metadata") or {}
                files = list(dict.fromkeys(parsed["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); expected "
                                "{\"weight_map\": {tensor: file}}") from e
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise UserError(f"{folder / missing[0]} is missing: {index.name} names it (and {len(missing) - 1} "
                                "more missing shards); copy the whole checkpoint")
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise UserError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; streamed pruning reads safetensors "
                            "checkpoints")
        self.files = [folder / name for name in files]
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for path in self.files:
            for name, entry in _read_header(path).items():
                if name in self.entries:
                    raise UserError(f"tensor {name} is stored twice, in {self.entries[name][0]} and {path}; the "
                                    "checkpoint is inconsistent")
                self.entries[name] = (path, *entry)

    def shape(self, name: str) -> tuple[int, ...] | None:  # None: not stored
        return self.entries.get(name, (None, None, None))[2]

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor of the first file (what transformers' "auto" falls back on)."""
        first = [e[1] for e in self.entries.values() if e[0] == self.files[0] and e[1].is_floating_point]
        return first[0] if first else None

    def same_bytes(self, a: str, b: str, chunk: int = 1 << 24) -> bool:
        """True when tensors `a` and `b` are stored with the same dtype and bytes (compared a chunk at a time)."""
        (pa, da, _, sa, ea), (pb, db, _, sb, eb) = self.entries[a], self.entries[b]
        if da != db or ea - sa != eb - sb:
            return False
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            fa.seek(sa), fb.seek(sb)
            return all(fa.read(min(chunk, n)) == fb.read(min(chunk, n)) for n in range(ea - sa, 0, -chunk))

    def read(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor `name` in `dtype`, read into memory it alone owns (no file mapping stays behind)."""
        path, stored, shape, start, end = self.entries[name]
        out = torch.empty(shape, dtype=stored)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < end - start:
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{path} ended while reading {name}; the file was truncated during the run")
                done += n
        return out if stored == dtype else out.to(dtype)


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute start, end) from a safetensors header, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path} is not a safetensors file or is truncated ({size} bytes, header length "
                            f"{length}); copy the checkpoint again")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise UserError(f"{path}: the safetensors header does not parse ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    base, entries, data_end = 8 + length, {}, 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _DTYPE_OF_CODE[spec["dtype"]], tuple(int(n) for n in spec["shape"])
            start, end = (int(n) for n in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: the header entry of {name} is {spec!r} ({type(e).__name__}); expected a "
                            f"dtype of {sorted(_DTYPE_OF_CODE)}, a shape and data_offsets") from e
        if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
            raise UserError(f"{path}: {name} spans bytes {start}..{end} but is {spec['dtype']} {list(shape)}; the "
                            "file is corrupt")
        entries[name] = (dtype, shape, base + start, base + end)
        data_end = max(data_end, end)
    if size - base != data_end:
        raise UserError(f"{path} holds {size - base} bytes of tensor data but its header describes {data_end}; the "
                        "file is truncated or corrupt, copy it again")
    return entries


def _write_shard(path: Path, tensors: Mapping[str, Tensor]) -> int:
    """Write a safetensors file from the tensors' own memory (widest dtypes first, so every offset is aligned);
    fsynced; returns the bytes of tensor data."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    with open(path, "wb") as f:
        write_safetensors_header(f, header)
        for name in order:
            f.write(memoryview(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return offset


# -- the skeleton: what save_pretrained would write, and moving parameters between meta and memory -----------------

def _resolve_dtype(dtype: str, config, ckpt: Checkpoint) -> torch.dtype:
    """The model dtype `from_pretrained(dtype=...)` would pick: the config's, else the checkpoint's, for "auto"."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    found = getattr(config, "dtype", None) or ckpt.metadata.get("dtype") or ckpt.first_float_dtype()
    found = getattr(torch, found) if isinstance(found, str) else found
    return found or torch.get_default_dtype()


def _skeleton(folder: Path, dtype: str, ckpt: Checkpoint) -> PreTrainedModel:
    """The model without weights (meta parameters, real buffers), ties made, in eval mode with use_cache off."""
    config = AutoConfig.from_pretrained(folder)
    main = _resolve_dtype(dtype, config, ckpt)
    config.dtype = main
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=main)
    model.tie_weights()
    model.config.use_cache = False
    converted = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if converted:
        raise UserError(f"transformers converts the stored tensors of model_type {config.model_type!r} on load "
                        f"({type(converted[0]).__name__}); streamed pruning reads tensors as stored: prune this "
                        "model in memory")
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            pass  # from_pretrained keeps the one derived from the config too
    return model.eval()


def _saved_keys(model: nn.Module) -> list[str]:
    """The state_dict keys save_pretrained writes (ignored keys and tied aliases dropped, as it does)."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return list(remove_tied_weights_from_state_dict(state, model))


def _own_modules(module: nn.Module, skip: str | None) -> Iterator[tuple[str, nn.Module]]:
    """(prefix, module) of every module inside `module`, leaving out the subtree named `skip`."""
    for name, sub in module.named_modules():
        if skip is None or not (name == skip or name.startswith(skip + ".")):
            yield (name + "." if name else ""), sub


class _Streamer(LayerAccess):
    """Brings the model's parameters in from the checkpoint and sends them back to meta, part by part; writes the
    parts to shards of the output folder as `prune_model` finishes with them."""

    def __init__(self, model: PreTrainedModel, ckpt: Checkpoint):
        self.model, self.ckpt = model, ckpt
        self.layers_path = family_of(model).layers_path
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.aliases = {name: names for names in groups.values() for name in names}  # tied: every name of one
        self.saved = _saved_keys(model)
        self.shards = len(model.get_submodule(self.layers_path)) + 1
        self.weight_map: dict[str, str] = {}
        self.folder: Path | None = None
        self.total_size, self.rest_written = 0, False

    def check(self) -> None:
        """UserError unless every parameter has a stored tensor of its shape (a tied one under one of its names)."""
        for names in {id(names): names for names in self.aliases.values()}.values():
            param = self.model.get_parameter(names[0])
            stored = [n for n in names if self.ckpt.shape(n) is not None]
            if not stored:
                raise UserError(f"the checkpoint in {self.ckpt.folder} has no tensor {names[0]}; expected every "
                                "parameter of the model its config.json describes")
            for name in stored:
                if self.ckpt.shape(name) != tuple(param.shape):
                    raise UserError(f"{self.ckpt.entries[name][0]}: {name} is {list(self.ckpt.shape(name))}, the model "
                                    f"built from config.json expects {list(param.shape)}")
            for name in stored[1:]:
                if not self.ckpt.same_bytes(stored[0], name):
                    raise UserError(f"config.json in {self.ckpt.folder} ties {name} to {stored[0]} but the checkpoint "
                                    "stores the two with different values; set tie_word_embeddings to false in "
                                    "config.json, or drop one of them")

    def _parts(self, root: nn.Module, prefix: str, skip: str | None) -> Iterator[tuple[str, nn.Module, str, bool]]:
        """(full name, owner, attribute, is a parameter) of each parameter and persistent buffer."""
        for sub_prefix, sub in _own_modules(root, skip):
            for key, param in sub._parameters.items():
                if param is not None:
                    yield prefix + sub_prefix + key, sub, key, True
            for key, buf in sub._buffers.items():
                if buf is not None and key not in sub._non_persistent_buffers_set:
                    yield prefix + sub_prefix + key, sub, key, False

    def load(self, root: nn.Module, prefix: str = "", skip: str | None = None) -> None:
        """Replace the meta parameters (and stored persistent buffers) under `root` by the checkpoint's tensors."""
        memo: dict[int, nn.Parameter] = {}
        for name, owner, key, is_param in self._parts(root, prefix, skip):
            if not is_param:
                if self.ckpt.shape(name) is not None:
                    owner._buffers[key] = self.ckpt.read(name, owner._buffers[key].dtype)
                continue
            param = owner._parameters[key]
            if id(param) not in memo:
                stored = next(n for n in self.aliases[name] if self.ckpt.shape(n) is not None)
                memo[id(param)] = nn.Parameter(self.ckpt.read(stored, param.dtype), requires_grad=param.requires_grad)
            owner._parameters[key] = memo[id(param)]

    def free(self, root: nn.Module, skip: str | None = None) -> None:
        """Send the parameters under `root` back to the meta device (ties kept)."""
        memo: dict[int, nn.Parameter] = {}
        for _, owner, key, is_param in self._parts(root, "", skip):
            if is_param:
                param = owner._parameters[key]
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                   requires_grad=param.requires_grad)
                owner._parameters[key] = memo[id(param)]

    def write(self, shard: int, keys: list[str]) -> None:
        """Write the saved tensors `keys` (from the model as it is now) to shard number `shard` (1-based), if this
        process writes (a folder is set)."""
        if self.folder is None:
            return
        file = f"model-{shard:05d}-of-{self.shards:05d}.safetensors"
        tensors = {}
        for key in keys:
            owner, _, attr = key.rpartition(".")
            tensors[key] = getattr(self.model.get_submodule(owner), attr)
        self.total_size += _write_shard(self.folder / file, tensors)
        self.weight_map.update(dict.fromkeys(keys, file))

    def enter(self, index: int, layer: nn.Module) -> None:
        if not self.rest_written:  # the capture pass is over: the embeddings and head are needed no more
            self.write(1, [k for k in self.saved if not k.startswith(self.layers_path + ".")])
            self.free(self.model, skip=self.layers_path)
            self.rest_written = True
        self.load(layer, f"{self.layers_path}.{index}.")

    def leave(self, index: int, layer: nn.Module, *, pruned: bool) -> None:
        if pruned:
            prefix = f"{self.layers_path}.{index}."
            self.write(index + 2, [k for k in self.saved if k.startswith(prefix)])
        self.free(layer)
        trim()  # glibc keeps freed heap chunks resident between live small buffers (the masks): hand them back

    def write_index(self) -> None:
        if sorted(self.weight_map) != sorted(self.saved):  # a bug, not bad input
            raise RuntimeError(f"wrote {len(self.weight_map)} of the {len(self.saved)} tensors save_pretrained writes")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# -- the entry point ------------------------------------------------------------------------------------------------

def _source_folder(model_path: str | os.PathLike) -> Path:
    folder = Path(resolve_model_path(model_path))
    if not folder.is_dir():
        raise UserError(f"streamed pruning reads a local model folder; {model_path!r} is a hub name: download it "
                        "first (huggingface-cli download) and pass the folder")
    if is_compact(folder):
        raise UserError(f"{folder} is a compact folder; stream from a dense model folder (safetensors)")
    return folder


def _source_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise UserError(f"cannot read the tokenizer in {folder} ({e}); pass tokenizer= or add its files") from e


@StreamingPolicy()  # large buffers mmapped while streaming: sparsegpt.core.allocator
def prune_streamed(model_path: str | os.PathLike, calib_ids: Tensor, cfg: PruneConfig, out_dir: str | os.PathLike,
                   *, tokenizer: PreTrainedTokenizerBase | None = None, base_masks: MaskSet | None = None,
                   device: torch.device | str | None = None, dtype: str = "auto",
                   extra_files: Callable[[PruneResult], Mapping[str, bytes]] | None = None,
                   world: World | None = None) -> PruneResult:
    """Prune the model in `model_path` (a local folder or the demo alias) one decoder layer in memory at a time and
    write it to `out_dir` (sharded safetensors + index, config, generation config, tokenizer, mask.safetensors,
    `extra_files(result)`), atomically, replacing an old one. Same weights and masks, bit for bit, as
    `load_model(model_path, dtype=dtype)` + `prune_model(..., device=device, world=world)` + `save_model` +
    `MaskSet.save`. `device` None computes on the CPU; `tokenizer` None writes the source folder's (not held while
    the layers are pruned). Every rank of
    `world` (default `World.current()`) must call it; rank 0 writes, every rank returns once the folder is in place."""
    if sys.byteorder != "little":
        raise UserError("streamed pruning reads safetensors (little-endian) directly; use a little-endian host")
    cfg.validate()
    world = world or World.current()
    folder, out_dir = _source_folder(model_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"cannot save a model to {out_dir}: it exists and is not a folder")
    ckpt = Checkpoint(folder)
    model = _skeleton(folder, dtype, ckpt)
    streamer = _Streamer(model, ckpt)
    streamer.check()
    if tokenizer is None:  # the source's, read now to fail early, dropped while the layers are pruned
        _source_tokenizer(folder)
    streamer.load(model, skip=streamer.layers_path)  # embeddings, final norm, head: for the capture pass
    outcome: dict[str, PruneResult] = {}

    def write(tmp: Path | None) -> None:  # None: a rank other than 0 (reads and frees its layers, writes nothing)
        streamer.folder = tmp
        result = outcome["result"] = prune_model(model, calib_ids, cfg, base_masks=base_masks,
                                                 device=device or "cpu", access=streamer, world=world)
        if tmp is None:
            return
        streamer.write_index()
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        (tokenizer or _source_tokenizer(folder)).save_pretrained(tmp)
        result.masks.save(tmp / MASK_FILE)
        for name, data in (extra_files(result) if extra_files else {}).items():
            if not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise UserError(f"extra file name {name!r} must be a relative path inside the model folder")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    failure = None
    try:
        write_dir_atomically(out_dir, write, replace=True) if world.is_main else write(None)
    except Exception as e:  # every rank hears of it, so none waits for a folder that will not come
        failure = e
    errors = world.gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(rank, error) for rank, error in enumerate(errors) if error]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed while {out_dir} was written: {failed[0][1]}")
    log.info("streamed %s -> %s: %d shards, %.1f MB of tensors", folder, out_dir, streamer.shards,
             streamer.total_size / 2**20)
    return outcome["result"]
