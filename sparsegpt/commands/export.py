"""Export a pruned model as a compact checkpoint: the kept weights of every pruned linear plus 1 bit per weight.

The source is a model folder (config.json + safetensors; its mask.safetensors names the pruned linears, else
the exact zeros of the decoder layers' linears are used) or a run dir (its last finished stage's model). Weights
whose mask is exactly 2:4 are stored in PyTorch's semi-structured layout (values + 2-bit positions). Everything
else (embeddings, norms, config, tokenizer, generation config) is kept as it is. The export is streamed: one
tensor in memory at a time, written into a temp folder that is renamed to --out when complete.
Every command that takes --model loads the result; so does `sparsegpt.load_compact(DIR)`.

examples:
  sparsegpt export out/s90 --out out/s90-compact
  sparsegpt export runs/demo --out runs/demo-compact            # the run's last finished stage
  sparsegpt export out/l70b-s50 --out out/l70b-s50-compact --max-shard-size 5GB
  sparsegpt eval --model out/s90-compact --ppl stdlib-docs
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sparsegpt.storage.compact import DEFAULT_MAX_SHARD_BYTES, export

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2**31, '1024' -> 1024 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size; write e.g. 500MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt export`."""
    p.add_argument("source", type=Path, metavar="RUN_DIR|MODEL_DIR",
                   help="a model folder, or a run dir (its last finished stage's model is exported)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                   help="largest safetensors shard, e.g. 500MB, 5GB, 2GiB (default 5GiB)")


def run(args: argparse.Namespace) -> int:
    """Export, then print what the pruned linears take compared with their dense bytes."""
    summary = export(args.source, args.out, max_shard_bytes=args.max_shard_size)
    ratio = summary.linear_bytes / summary.linear_dense_bytes if summary.linear_dense_bytes else float("nan")
    encodings = ", ".join(f"{n} {enc}" for enc, n in summary.encodings.items() if n) or "none"
    print(f"exported {summary.source} -> {summary.out_dir}: {summary.shards} shard(s), {summary.total_bytes} bytes; "
          f"pruned linears ({encodings}) take {summary.linear_bytes} bytes = {ratio:.4f} of dense")
    return 0
