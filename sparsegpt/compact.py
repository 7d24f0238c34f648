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

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

# masks and models are imported as modules (attributes read at call time): models.load_model delegates here,
# so these imports run while one of them may still be initialising
from sparsegpt import masks as mask_io
from sparsegpt import models
from sparsegpt.architectures import prunable_linears
from sparsegpt.atomic import write_dir_atomically
from sparsegpt.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "sparsegpt-compact-v1"
INDEX_FILE = "sparsegpt-compact.json"
SHARD_NAME = "compact-{:05d}-of-{:05d}.safetensors"
BITMASK = "bitmask"
SEMI_24 = "2:4"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
COPY_BLOCK_BYTES = 16 * 2**20
MASK_FILE = "mask.safetensors"

# safetensors dtype codes of the tensors a model folder may hold
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DTYPE_OF_CODE = {code: dtype for dtype, code in _CODES.items()}
_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in _CODES}
# files of a dense folder that the compact shards replace
_WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def _progress_disabled() -> bool:
    return os.environ.get("SPARSEGPT_NO_PROGRESS") == "1"


# -- one weight ---------------------------------------------------------------------------------------------------
def is_semi_24(keep: Tensor) -> bool:
    """True when the (out, in) keep mask holds exactly 2 kept weights in every group of 4 inputs."""
    rows, cols = keep.shape
    if cols % 4 or cols == 0 or int(keep.sum()) * 2 != rows * cols:  # cheap rejection of unstructured masks
        return False
    return bool((keep.view(rows, cols // 4, 4).sum(-1, dtype=torch.int8) == 2).all())


def encode_bitmask(weight: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """Unstructured encoding of an (out, in) weight: kept values (row-major), packed keep bits, per-row offsets."""
    values = weight[keep].contiguous()
    bits = torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))
    rowptr = _rowptr(keep, torch.int32 if values.numel() < 2**31 else torch.int64)
    return {"values": values, "bitmask": bits, "rowptr": rowptr}


def encode_semi_24(weight: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """2:4 encoding of an (out, in) weight whose keep mask is exact 2:4 (see `is_semi_24`)."""
    rows, cols = keep.shape
    groups = keep.view(rows, cols // 4, 4)
    pos = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :2]  # the two kept positions, ascending
    values = torch.gather(weight.reshape(rows, cols // 4, 4), -1, pos).reshape(rows, cols // 2).contiguous()
    nibbles = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(rows, 1)], dim=1)
    indices = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    return {"values": values, "indices": indices}


def encode(weight: Tensor, keep: Tensor, encoding: str) -> dict[str, Tensor]:
    """The stored tensors (suffix -> tensor) of an (out, in) weight in `encoding` ("bitmask" or "2:4")."""
    return encode_semi_24(weight, keep) if encoding == SEMI_24 else encode_bitmask(weight, keep)


def stored_shapes(encoding: str, shape: tuple[int, int], kept: int,
                  dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each stored tensor of one encoded weight, known before its values are read."""
    rows, cols = shape
    if encoding == SEMI_24:
        return {"values": (dtype, (rows, cols // 2)), "indices": (torch.uint8, (rows, math.ceil(cols / 8)))}
    index_dtype = torch.int32 if kept < 2**31 else torch.int64
    return {"values": (dtype, (kept,)), "bitmask": (torch.uint8, (math.ceil(rows * cols / 8),)),
            "rowptr": (index_dtype, (rows + 1,))}


def decode(name: str, spec: dict, tensors: dict[str, Tensor]) -> Tensor:
    """The weight `name` in its own layout from its stored tensors; UserError naming what is inconsistent."""
    rows, cols = spec["shape"]
    values = tensors["values"]
    if values.dtype != spec["dtype"]:
        raise UserError(f"{name}.values is {values.dtype}, the header says {spec['dtype']}; the file is corrupt")
    if spec["encoding"] == SEMI_24:
        pos = _positions_semi_24(name, rows, cols, tensors["indices"])
        if tuple(values.shape) != (rows, cols // 2):
            raise UserError(f"{name}.values is {tuple(values.shape)}, a 2:4 ({rows}, {cols}) weight needs "
                            f"({rows}, {cols // 2}); the file is truncated or corrupt")
        dense = torch.zeros(rows, cols // 4, 4, dtype=values.dtype)
        dense.scatter_(-1, pos, values.reshape(rows, cols // 4, 2))
        dense = dense.reshape(rows, cols)
    else:
        keep = _keep_bitmask(name, rows, cols, tensors["bitmask"], tensors["rowptr"])
        kept = int(keep.sum())
        if values.dim() != 1 or values.numel() != kept:
            raise UserError(f"{name}.values holds {values.numel()} values {tuple(values.shape)}, its bitmask keeps "
                            f"{kept}; the file is truncated or corrupt")
        dense = torch.zeros(rows, cols, dtype=values.dtype)
        dense[keep] = values
    return dense.t().contiguous() if spec["transposed"] else dense


def keep_mask(name: str, spec: dict, tensors: dict[str, Tensor]) -> Tensor:
    """The (out, in) keep mask (True = kept) of an encoded weight, from its bitmask or 2:4 indices."""
    rows, cols = spec["shape"]
    if spec["encoding"] == SEMI_24:
        pos = _positions_semi_24(name, rows, cols, tensors["indices"])
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
        return keep.scatter_(-1, pos, True).reshape(rows, cols)
    return _keep_bitmask(name, rows, cols, tensors["bitmask"], tensors["rowptr"])


def _keep_bitmask(name: str, rows: int, cols: int, bitmask: Tensor, rowptr: Tensor) -> Tensor:
    """The validated keep mask of an unstructured weight: bitmask size and padding, rowptr against the bits."""
    numel = rows * cols
    nbytes = math.ceil(numel / 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (nbytes,):
        raise UserError(f"{name}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}, expected uint8 ({nbytes},) "
                        f"for a ({rows}, {cols}) weight; the file is truncated or corrupt")
    bits = np.unpackbits(bitmask.numpy())
    if bits[numel:].any():
        raise UserError(f"{name}.bitmask has bits set past its {numel} weights; the file is corrupt")
    keep = torch.from_numpy(bits[:numel].view(bool)).reshape(rows, cols)
    if rowptr.dtype not in (torch.int32, torch.int64) or tuple(rowptr.shape) != (rows + 1,):
        raise UserError(f"{name}.rowptr is {rowptr.dtype} {tuple(rowptr.shape)}, expected int32/int64 "
                        f"({rows + 1},); the file is corrupt")
    expected = _rowptr(keep, torch.int64)
    if not torch.equal(rowptr.to(torch.int64), expected):
        bad = int((rowptr.to(torch.int64) != expected).nonzero()[0, 0])
        raise UserError(f"{name}.rowptr[{bad}] is {int(rowptr[bad])}, the bitmask gives {int(expected[bad])} "
                        "kept values before that row; the file is corrupt")
    return keep


def _positions_semi_24(name: str, rows: int, cols: int, indices: Tensor) -> Tensor:
    """(out, in/4, 2) int64 kept positions of a 2:4 weight, validated (size, padding, p0 < p1)."""
    if cols % 4:
        raise UserError(f"{name}: a 2:4 weight needs in % 4 == 0, the header says ({rows}, {cols}); corrupt file")
    groups, nbytes = cols // 4, math.ceil(cols / 8)
    if indices.dtype != torch.uint8 or tuple(indices.shape) != (rows, nbytes):
        raise UserError(f"{name}.indices is {indices.dtype} {tuple(indices.shape)}, expected uint8 ({rows}, "
                        f"{nbytes}); the file is truncated or corrupt")
    nibbles = torch.stack([indices & 0xF, indices >> 4], dim=-1).reshape(rows, 2 * nbytes)
    if groups % 2 and bool(nibbles[:, groups:].any()):
        raise UserError(f"{name}.indices has a non-zero padding nibble; the file is corrupt")
    nibbles = nibbles[:, :groups].to(torch.int64)
    pos = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    if not bool((pos[..., 0] < pos[..., 1]).all()):
        raise UserError(f"{name}.indices holds a group whose kept positions are not two ascending ones (p0 < p1); "
                        "the file is corrupt")
    return pos


def _rowptr(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 followed by the cumulative kept count of each row."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(dim=1).cumsum(0)]).to(dtype)


# -- shards ------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One tensor of the source (or one encoded weight): what it will be stored as, and how to produce it."""

    param: str
    stored: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # stored tensor name -> (dtype, shape)
    produce: Callable[[], dict[str, Iterable[Tensor]]]  # stored name -> pieces whose bytes, in order, are it
    spec: dict | None = None  # for encoded weights: {"encoding", "shape", "dtype", "transposed"}
    dense_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.stored.values())


@dataclass
class ExportSummary:
    """What a compact save wrote: byte counts of the encoded linears (compact and dense) and of everything."""

    out_dir: str
    source: str | None
    encodings: dict[str, int] = field(default_factory=dict)
    linear_bytes: int = 0
    linear_dense_bytes: int = 0
    total_bytes: int = 0
    shards: int = 0


def _shard_groups(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    """Items split in order into shards of at most max_shard_bytes (an item larger than that gets its own)."""
    groups: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def _write_shard(path: Path, items: list[_Item], bar) -> None:
    """One safetensors file written tensor by tensor: the header first (sizes are planned), then each tensor."""
    header: dict = {}
    offset = 0
    for item in items:
        for name, (dtype, shape) in item.stored.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    params = {item.param: item.spec for item in items if item.spec is not None}
    header["__metadata__"] = {"format": FORMAT, "params": json.dumps(params, sort_keys=True)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for item in items:
            tensors = item.produce()
            for name, (dtype, shape) in item.stored.items():
                written = 0
                for piece in tensors[name]:
                    if piece.dtype != dtype:  # a planning bug, not bad input
                        raise RuntimeError(f"{name}: planned {dtype}, produced {piece.dtype}")
                    written += piece.numel()
                    f.write(piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    del piece
                if written != math.prod(shape):
                    raise RuntimeError(f"{name}: planned {shape}, produced {written} elements")
            del tensors
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())


def _write_compact(folder: Path, items: list[_Item], max_shard_bytes: int, summary: ExportSummary) -> None:
    """All shards and the index into `folder`."""
    groups = _shard_groups(items, max_shard_bytes)
    weight_map = {}
    with tqdm(total=len(items), desc="export compact", disable=_progress_disabled()) as bar:
        for i, group in enumerate(groups):
            shard = SHARD_NAME.format(i + 1, len(groups))
            _write_shard(folder / shard, group, bar)
            weight_map.update({name: shard for item in group for name in item.stored})
    total = sum(item.nbytes for item in items)
    index = {"format": FORMAT, "metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    encoded = [item for item in items if item.spec is not None]
    summary.encodings = {enc: sum(item.spec["encoding"] == enc for item in encoded) for enc in (BITMASK, SEMI_24)}
    summary.linear_bytes = sum(item.nbytes for item in encoded)
    summary.linear_dense_bytes = sum(item.dense_bytes for item in encoded)
    summary.total_bytes, summary.shards = total, len(groups)


def _encoded_item(param: str, shape: tuple[int, int], dtype: torch.dtype, transposed: bool, keep: Tensor,
                  weight: Callable[[], Tensor], keep_of: Callable[[], Tensor]) -> _Item:
    """The item of one pruned weight; `keep` plans it, `weight()` and `keep_of()` are read again when it is written."""
    encoding = SEMI_24 if is_semi_24(keep) else BITMASK
    spec = {"encoding": encoding, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "transposed": transposed}

    def produce() -> dict[str, Tensor]:
        w = weight()
        w = w.t() if transposed else w
        keep_now = keep_of()
        pruned = w[~keep_now]
        revived = int(torch.count_nonzero(pruned))
        if revived:
            raise UserError(f"{revived} pruned weights of {param} are non-zero; the mask was not preserved "
                            "(apply the mask before exporting)")
        negative_zeros = int(torch.signbit(pruned).sum())
        if negative_zeros:
            log.info("%s: %d pruned weights are -0.0; they load as +0.0", param, negative_zeros)
        return {f"{param}.{k}": [v] for k, v in encode(w, keep_now, encoding).items()}

    stored = {f"{param}.{k}": v for k, v in stored_shapes(encoding, shape, int(keep.sum()), dtype).items()}
    return _Item(param, stored, produce, spec, dense_bytes=math.prod(shape) * dtype.itemsize)


def _plain_item(name: str, dtype: torch.dtype, shape: tuple[int, ...],
                pieces: Callable[[], Iterable[Tensor]]) -> _Item:
    """A tensor stored as it is; `pieces()` yields it whole or as consecutive row blocks."""
    if dtype not in _CODES:
        raise UserError(f"tensor {name} has dtype {dtype}, which the compact format does not store")
    return _Item(name, {name: (dtype, shape)}, lambda: {name: pieces()})


# -- reading a dense folder, one tensor at a time -----------------------------------------------------------------
class _DenseFolder:
    """The safetensors weights of a Hugging Face folder: tensor names, dtypes and shapes; tensors one at a time."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from e
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{folder} has no model.safetensors (or index); expected a model folder saved with "
                            "safetensors weights")
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, object] = {}
        for name in files:
            handle = self.handles[folder / name] = stack.enter_context(_open(folder / name))
            for key in handle.keys():
                self.where[key] = folder / name

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        piece = self.handles[self.where[name]].get_slice(name)
        code = piece.get_dtype()
        if code not in _DTYPE_OF_CODE:
            raise UserError(f"tensor {name} has safetensors dtype {code}, which the compact format does not store")
        return _DTYPE_OF_CODE[code], tuple(piece.get_shape())

    def get(self, name: str) -> Tensor:
        """The tensor, through its own short-lived handle: safetensors returns views of its mmap, and pages read
        through a long-lived one would stay mapped (resident) until the export ends."""
        with _open(self.where[name]) as f:
            return f.get_tensor(name)

    def row_blocks(self, name: str) -> Iterator[Tensor]:
        """The tensor as consecutive blocks of rows of about COPY_BLOCK_BYTES, each read through its own handle,
        so copying an embedding matrix never holds (or maps) more than one block."""
        dtype, shape = self.meta(name)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else 0
        if len(shape) < 2 or row_bytes * shape[0] <= COPY_BLOCK_BYTES:
            yield self.get(name)
            return
        step = max(1, COPY_BLOCK_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            with _open(self.where[name]) as f:
                block = f.get_slice(name)[start:start + step]
            yield block
            del block


class _MaskFile:
    """A mask.safetensors read one mask at a time (MaskSet.load unpacks every mask at once: 1 byte per weight)."""

    def __init__(self, path: Path):
        self.path = path
        with _open(path) as f:
            meta = f.metadata() or {}
        if meta.get("format") != mask_io.FORMAT:
            raise UserError(f"{path} is not a sparsegpt mask file (format {meta.get('format')!r}, "
                            f"expected {mask_io.FORMAT!r})")
        self.shapes = {name: tuple(shape) for name, shape in json.loads(meta["shapes"]).items()}

    def keep(self, name: str) -> Tensor:
        """The (out, in) keep mask (True = kept) of module `name`."""
        shape = self.shapes[name]
        numel = math.prod(shape)
        with _open(self.path) as f:  # a short-lived handle: read pages do not stay mapped
            packed = f.get_tensor(name).numpy()
        if packed.size != (numel + 7) // 8:
            raise UserError(f"{self.path}: mask {name} holds {packed.size} bytes, shape {list(shape)} needs "
                            f"{(numel + 7) // 8}; the file is truncated or corrupt")
        return torch.from_numpy(np.unpackbits(packed, count=numel).view(bool)).reshape(shape).logical_not_()


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """safe_open, with a UserError naming the file when it is not a readable safetensors file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path} as safetensors ({e}); the file is truncated or not safetensors") from e
    with handle:
        yield handle


def _skeleton(folder: Path) -> tuple[PretrainedConfig, nn.Module]:
    """The folder's config and its model built on the meta device (module types and names, no memory)."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


def _plan_folder(folder: Path, dense: _DenseFolder) -> list[_Item]:
    """The items of a dense folder: its mask's linears encoded (else the exact zeros of the prunable linears)."""
    _, skeleton = _skeleton(folder)
    modules = dict(skeleton.named_modules())
    mask_path = folder / MASK_FILE
    mask_file = _MaskFile(mask_path) if mask_path.is_file() else None
    if mask_file is not None:
        names = list(mask_file.shapes)
        for name in names:
            if not isinstance(modules.get(name), (nn.Linear, Conv1D)):
                raise UserError(f"{mask_path} names {name}, which is no nn.Linear / Conv1D of the model in {folder} "
                                f"(fused MoE expert masks are not supported by {FORMAT}); use the mask saved with "
                                "this model")
    else:
        log.info("%s has no %s: encoding the exact zeros of the decoder layers' linears", folder, MASK_FILE)
        names = [n for n, m in prunable_linears(skeleton).items() if isinstance(m, (nn.Linear, Conv1D))]
    items, encoded = [], set()
    for name in names:
        param = f"{name}.weight"
        if param not in dense.where:
            raise UserError(f"{folder} has no tensor {param} (named by its mask); expected the model saved with "
                            "this mask")
        dtype, shape = dense.meta(param)
        if len(shape) != 2 or not dtype.is_floating_point:
            raise UserError(f"{param} is {dtype} {list(shape)}; only 2-D floating-point weights can be encoded")
        transposed = isinstance(modules[name], Conv1D)
        linear_shape = shape[::-1] if transposed else shape
        if mask_file is None:
            get_keep = functools.partial(_keep_of_zeros, dense, param, transposed)
        else:
            if mask_file.shapes[name] != linear_shape:
                raise UserError(f"mask for {name} is {list(mask_file.shapes[name])} but the weight is (out, in) = "
                                f"{list(linear_shape)}; use the mask saved with this model")
            get_keep = functools.partial(mask_file.keep, name)
        items.append(_encoded_item(param, linear_shape, dtype, transposed, get_keep(),
                                   functools.partial(dense.get, param), get_keep))
        encoded.add(param)
    for name in dense.where:
        if name not in encoded:
            dtype, shape = dense.meta(name)
            items.append(_plain_item(name, dtype, shape, functools.partial(dense.row_blocks, name)))
    return items


def _keep_of_zeros(dense: _DenseFolder, param: str, transposed: bool) -> Tensor:
    w = dense.get(param)
    return (w.t() if transposed else w) != 0


# -- sources and targets ------------------------------------------------------------------------------------------
def is_compact(path: str | os.PathLike) -> bool:
    """True when path is a folder in this format (it holds sparsegpt-compact.json)."""
    return (Path(path) / INDEX_FILE).is_file()


def resolve_source(path: str | os.PathLike) -> Path:
    """The model folder to export: path itself, or a run dir's last finished stage model; UserError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; expected a model folder (config.json + safetensors) or a run dir "
                        "(state.json + stages/)")
    if (path / "config.json").is_file():
        if is_compact(path):
            raise UserError(f"{path} is already a compact folder; export a dense model folder or a run dir")
        return path
    if (path / "state.json").is_file():
        return _last_finished_stage(path)
    raise UserError(f"{path} is neither a model folder (no config.json) nor a run dir (no state.json)")


def _last_finished_stage(run_dir: Path) -> Path:
    """RUN_DIR/stages/NN-NAME/model of the highest stage that state.json marks complete."""
    try:
        stages = json.loads((run_dir / "state.json").read_text())["stages"]
        finished = [(int(index), entry["name"]) for index, entry in stages.items() if "complete" in entry["done"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{run_dir / 'state.json'} is not a run state file ({type(e).__name__}: {e})") from e
    if not finished:
        raise UserError(f"run dir {run_dir} has no finished stage yet (state.json marks none complete)")
    index, name = max(finished)
    model_dir = run_dir / "stages" / f"{index:02d}-{name}" / "model"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"run dir {run_dir}: stage {index} ({name}) is complete but {model_dir} holds no model")
    return model_dir


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """UserError unless out_dir is new or an empty folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty folder; choose a new output folder")


def _copy_other_files(source: Path, folder: Path) -> None:
    """Config, tokenizer and every other file or folder of the source except its weights, its mask and dot-files."""
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name == MASK_FILE or _WEIGHT_FILES.fullmatch(path.name):
            continue
        if path.is_dir():
            shutil.copytree(path, folder / path.name)
        else:
            shutil.copyfile(path, folder / path.name)


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportSummary:
    """Write the compact form of a model folder (or a run dir's last finished stage) to a new folder, streamed:
    one source tensor in memory at a time, the folder renamed into place when complete."""
    folder = resolve_source(source)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if max_shard_bytes < 1:
        raise UserError(f"the maximum shard size must be positive, got {max_shard_bytes}")
    summary = ExportSummary(out_dir=str(out_dir), source=str(folder))
    with contextlib.ExitStack() as stack:
        items = _plan_folder(folder, _DenseFolder(folder, stack))

        def write(tmp: Path) -> None:
            _write_compact(tmp, items, max_shard_bytes, summary)
            _copy_other_files(folder, tmp)

        write_dir_atomically(out_dir, write, replace=False)
    log.info("exported %s -> %s: %d encoded linears take %.4f of their dense bytes", folder, out_dir,
             sum(summary.encodings.values()), summary.linear_bytes / max(summary.linear_dense_bytes, 1))
    return summary


def save_compact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, masks: mask_io.MaskSet,
                 out_dir: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportSummary:
    """Write an in-memory model compactly (its masked linears encoded) to out_dir atomically, replacing an old one,
    with the config, generation config and tokenizer files save_model would write."""
    masks.check_shapes(model)
    modules = masks.modules(model)
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise UserError(f"the mask names {name}, which is no nn.Linear / Conv1D (fused MoE expert masks are not "
                            f"supported by {FORMAT})")
    items = []
    seen: set[tuple[int, int, tuple, tuple]] = set()
    encoded = {f"{name}.weight": name for name in modules}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach()
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if alias in seen:  # a tied weight (lm_head = embeddings): save_pretrained keeps only the first name
            continue
        seen.add(alias)
        if key in encoded:
            name = encoded[key]
            module = modules[name]
            transposed = isinstance(module, Conv1D)
            keep = ~masks.masks[name]
            items.append(_encoded_item(key, tuple(keep.shape), tensor.dtype, transposed, keep,
                                       lambda t=tensor: t.cpu(), lambda keep=keep: keep))
        else:
            items.append(_plain_item(key, tensor.dtype, tuple(tensor.shape), lambda t=tensor: [t.cpu()]))
    summary = ExportSummary(out_dir=str(out_dir), source=None)

    def write(tmp: Path) -> None:
        _write_compact(tmp, items, max_shard_bytes, summary)
        model.config.dtype = str(model.dtype).removeprefix("torch.")  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"cannot save a model to {out_dir}: it exists and is not a folder")
    write_dir_atomically(out_dir, write, replace=True)
    return summary


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


def _check_spec(shard: Path, param: str, spec) -> dict:
    """The encoded-weight spec with its dtype as torch.dtype; UserError when a field is missing or invalid."""
    ok = (isinstance(spec, dict) and spec.get("encoding") in (BITMASK, SEMI_24) and spec.get("dtype") in _DTYPE_NAMES
          and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 2
          and all(isinstance(n, int) and n >= 0 for n in spec["shape"]) and isinstance(spec.get("transposed"), bool))
    if not ok:
        raise UserError(f"{shard}: the header entry of {param} is {spec!r}, expected encoding bitmask|2:4, dtype, "
                        "shape [out, in] and transposed; the file is corrupt")
    return {**spec, "dtype": _DTYPE_NAMES[spec["dtype"]]}


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
    if isinstance(dtype, str) and dtype != "auto" and dtype not in models.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(models.DTYPES)}")
    state_dict = read_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{folder}: model type {config.model_type!r} has no causal-LM class in transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    torch_dtype = models.DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
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
