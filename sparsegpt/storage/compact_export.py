"""Writing compact folders: `export` streams a dense folder (or a run dir's last stage) into compact shards,
one source tensor in memory at a time; `save_compact` writes an in-memory model. Format: `compact.py`."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from sparsegpt.core import masks as mask_io
from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.atomic import write_dir_atomically
from sparsegpt.core.errors import UserError
from sparsegpt.core.progress import progress_disabled
from sparsegpt.storage.compact_codec import (
    _CODES,
    _WEIGHT_FILES,
    BITMASK,
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT,
    INDEX_FILE,
    MASK_FILE,
    SEMI_24,
    SHARD_NAME,
    _DenseFolder,
    _MaskFile,
    encode,
    is_compact,
    is_semi_24,
    stored_shapes,
    write_safetensors_header,
)

log = logging.getLogger(__name__)


# -- one weight ---------------------------------------------------------------------------------------------------

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
    with open(path, "wb") as f:
        write_safetensors_header(f, header)
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
    with tqdm(total=len(items), desc="export compact", disable=progress_disabled()) as bar:
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


