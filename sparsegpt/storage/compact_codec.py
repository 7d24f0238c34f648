"""The compact format's tensor codecs: how one pruned weight becomes stored tensors and back (bitmask + row
index, or 2:4 values + 2-bit positions), the format constants, and checked reads of safetensors files.
The format itself is specified in `sparsegpt/storage/compact.py`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sparsegpt.core import masks as mask_io
from sparsegpt.core.errors import UserError

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

@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """safe_open, with a UserError naming the file when it is not a readable safetensors file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path} as safetensors ({e}); the file is truncated or not safetensors") from e
    with handle:
        yield handle



def _check_spec(shard: Path, param: str, spec) -> dict:
    """The encoded-weight spec with its dtype as torch.dtype; UserError when a field is missing or invalid."""
    ok = (isinstance(spec, dict) and spec.get("encoding") in (BITMASK, SEMI_24) and spec.get("dtype") in _DTYPE_NAMES
          and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 2
          and all(isinstance(n, int) and n >= 0 for n in spec["shape"]) and isinstance(spec.get("transposed"), bool))
    if not ok:
        raise UserError(f"{shard}: the header entry of {param} is {spec!r}, expected encoding bitmask|2:4, dtype, "
                        "shape [out, in] and transposed; the file is corrupt")
    return {**spec, "dtype": _DTYPE_NAMES[spec["dtype"]]}


def is_compact(path: str | os.PathLike) -> bool:
    """True when path is a folder in this format (it holds sparsegpt-compact.json)."""
    return (Path(path) / INDEX_FILE).is_file()


def weight_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch floating dtype from its name ("bfloat16") or itself; "auto" stays "auto" (as stored)."""
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r}; use auto or a torch floating dtype such as float32, bfloat16, "
                        "float16")
    return found


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


def write_safetensors_header(f: BinaryIO, header: dict) -> None:
    """The start of a safetensors file: the little-endian u64 length, then the header JSON padded with spaces to a
    multiple of 8 bytes (so the tensor data that follows is aligned)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
