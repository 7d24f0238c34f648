"""Peak host memory per rank of pruning and fine-tuning (1 process, ZeRO-2 and ZeRO-3 on 2 processes, each with and
without KD from the dense teacher), next to `sparsegpt.run.memory.estimate`'s numbers for the same settings.

Every configuration runs in its own child process(es) (`bench/memory/memory_worker.py`; the multi-process ones through
`accelerate launch` of recipes/accelerate/zero{2,3}.yaml with the CPU flags of their headers), so each peak is
its own. A worker reports VmHWM (peak RSS) at its end minus the VmRSS right after its imports, and the imports
RSS itself. Runs one configuration at a time; writes a Markdown report.

    python bench/memory/memory.py --model smollm2-135m --steps 2 --out bench/memory/results_memory.md
    python bench/memory/memory.py --random-llama 350m --steps 2 --out bench/memory/results_memory_350m.md  # 358M
    python bench/memory/memory.py --model PATH_OR_CONFIG_JSON --configs zero3,zero3-kd
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from sparsegpt.config.recipe import Recipe
from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.masks import MaskSet
from sparsegpt.run.memory import GIB, estimate
from sparsegpt.storage.models import DEMO_MODEL, load_model, resolve_model_path, save_model

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "memory_worker.py"
# name -> (task, zero stage or None for a plain single process, processes, kd)
CONFIGS = {
    "prune": ("prune", None, 1, False),
    "single": ("finetune", None, 1, False),
    "single-kd": ("finetune", None, 1, True),
    "zero2": ("finetune", 2, 2, False),
    "zero2-kd": ("finetune", 2, 2, True),
    "zero3": ("finetune", 3, 2, False),
    "zero3-kd": ("finetune", 3, 2, True),
}
# random-init Llamas (SmolLM2's vocab, so its tokenizer fits); 350m: 24 x 12.8M + 50M tied embeddings = ~358M
RANDOM_LLAMAS = {
    "350m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "tie_word_embeddings": True},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_random_llama(size: str, folder: Path) -> Path:
    """A random-init Llama of RANDOM_LLAMAS[size] with the demo model's vocab and tokenizer, saved to `folder`."""
    _, tokenizer = load_model(DEMO_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **RANDOM_LLAMAS[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_model(model, tokenizer, folder)
    return folder


def model_from_config_file(config_json: Path, folder: Path) -> Path:
    """`--model CONFIG.json`: a random-init model of that config with the demo tokenizer, saved to `folder`."""
    _, tokenizer = load_model(DEMO_MODEL)
    config = AutoConfig.from_pretrained(config_json)
    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer, folder)
    return folder


def recipe_for(model: str, zero_stage: int, kd: bool, args: argparse.Namespace) -> Recipe:
    """A one-stage recipe with this bench's settings (50 % prune of `nsamples` rows, `steps` of fine-tuning)."""
    finetune = {"steps": args.steps, "seqlen": args.seqlen}
    if kd:
        finetune["kd"] = {"teacher": "dense", "logit_weight": 1.0}
    return Recipe.model_validate({
        "name": "membench", "model": model, "dtype": args.dtype,
        "data": {"calibration": "stdlib-docs", "finetune": "stdlib-docs", "eval": ["stdlib-docs"]},
        "distributed": {"zero_stage": zero_stage, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                        "mixed_precision": args.mixed_precision},
        "stages": [{"name": "s50", "target": 0.5,
                    "prune": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": min(8, args.nsamples)},
                    "finetune": finetune}]})


def estimator_numbers(config, model: str, name: str, args: argparse.Namespace) -> dict:
    """The estimator's per-process numbers (MiB) for configuration `name`."""
    task, zero, world, kd = CONFIGS[name]
    est = estimate(config, recipe_for(model, zero or 0, kd, args), world_size=world)
    step = est[task]
    return {"device_mb": step["device"] * GIB / 2**20, "cpu_mb": step["cpu"] * GIB / 2**20,
            "parts_mb": {k: round(v * GIB / 2**20, 1) for k, v in step.items() if k not in ("stage", "device", "cpu")}}


def magnitude_pruned(model: str, folder: Path, dtype: str, sparsity: float = 0.5) -> Path:
    """The model with the smallest-|w| fraction of each prunable linear zeroed (a cheap stand-in for a pruned
    stage), saved to `folder` with its mask.safetensors, as a stage's pruned/ folder is."""
    dense, tokenizer = load_model(model, dtype=dtype)
    with torch.no_grad():
        for module in prunable_linears(dense).values():
            w = module.weight
            k = int(sparsity * w.numel())
            if k:
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    save_model(dense, tokenizer, folder)
    MaskSet.from_model(dense).save(folder / "mask.safetensors")
    return folder


def worker_command(name: str, model: str, out: Path, args: argparse.Namespace,
                   pruned: Path | None = None) -> tuple[list[str], dict]:
    task, zero, world, kd = CONFIGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore",
           **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    worker = [str(WORKER), "--task", task, "--model", model, "--dtype", args.dtype, "--steps", str(args.steps),
              "--seqlen", str(args.seqlen), "--micro-batch", str(args.micro_batch), "--nsamples", str(args.nsamples),
              "--mixed-precision", args.mixed_precision,
              "--out", str(out), *(["--kd"] if kd else []), *(["--pruned", str(pruned)] if pruned else [])]
    if zero is None:
        return [sys.executable, *worker], env
    env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})  # the CPU form of the configs' headers
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", f"recipes/accelerate/zero{zero}.yaml",
              "--num_processes", str(world), "--mixed_precision", args.mixed_precision,
              "--main_process_port", str(_free_port())]
    return [*launch, *worker], env


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    return {"cpu": next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?"),
            "cores": os.cpu_count(), "mem_gb": round(int(meminfo[1]) / 2**20, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def report(results: dict, meta: dict) -> str:
    m = meta["machine"]
    lines = [f"# Peak host memory per rank: {meta['model']} ({meta['params'] / 1e6:.1f} M params, {meta['dtype']})",
             "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
             f"python {m['python']}, torch {m['torch']}",
             f"- date: {meta['date']}; load average (1/5/15 min) at start {meta['load_start']}, at end "
             f"{meta['load_end']}",
             f"- command: `{meta['command']}`",
             f"- allocator: glibc, MALLOC_MMAP_THRESHOLD_={meta['mmap_threshold']}" if meta.get("mmap_threshold")
             else "- allocator: glibc defaults (dynamic mmap threshold)",
             f"- settings: seqlen {meta['seqlen']}, {meta['steps']} fine-tune steps, micro batch "
             f"{meta['micro_batch']}, {meta['dtype']} weights, mixed precision "
             f"{meta.get('mixed_precision', 'no')}, prune: SparseGPT 50 % on {meta['nsamples']} calibration rows; "
             "fine-tune: 50 % magnitude mask, AdamW (DeepSpeed's under ZeRO), KD = logit KL from the dense model",
             "- measured: VmHWM at the process's end minus its VmRSS right after the imports (torch, transformers,"
             " accelerate, sparsegpt); estimator: `sparsegpt.run.memory.estimate(config, recipe, world_size)` for the "
             "same settings, its `device` + `cpu` columns (on this CPU-only machine the device is the host).",
             "",
             "- `x 1 process`: this rank's peak over the 1-process fine-tune with the same KD setting (`single` or "
             "`single-kd`); below 1 would mean the sharding saves host memory per rank.",
             "",
             "| configuration | rank | processes | peak host MB above imports | imports RSS MB | estimator MB "
             "(what) | measured / estimate | x 1 process | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | failed: {r['error']} | | | | | |")
            continue
        e = r["estimate"]
        est, what = e["cpu_mb"] + e["device_mb"], f"cpu {e['cpu_mb']:.0f} + device {e['device_mb']:.0f}"
        single = results.get("single-kd" if CONFIGS[name][3] else "single", {}).get("ranks")
        for rank in r["ranks"]:
            versus = (f"{rank['peak_above_imports_mb'] / single[0]['peak_above_imports_mb']:.2f}"
                      if single and CONFIGS[name][0] == "finetune" else "-")
            lines.append(f"| {name} | {rank['rank']} | {rank['world']} | {rank['peak_above_imports_mb']:.0f} | "
                         f"{rank['imports_rss_mb']:.0f} | {est:.0f} ({what}) | "
                         f"{rank['peak_above_imports_mb'] / est:.2f} | {versus} | {r['seconds']:.0f} |")
    lines += ["", "Per-rank marks, MB: RSS / peak so far, above imports [absolute RssAnon + RssFile], at each point of "
              "the worker:", ""]
    for name, r in results.items():
        for rank in r.get("ranks", []):
            marks = "; ".join(f"{p['mark']} {p['rss_mb']:.0f}/{p['hwm_mb']:.0f} [{p.get('anon_mb', 0):.0f}+"
                              f"{p.get('file_mb', 0):.0f}]" for p in rank["marks"])
            lines.append(f"- {name} rank {rank['rank']}: {marks}")
    lines += ["", "Estimator parts (MB):", ""]
    for name, r in results.items():
        if "estimate" in r:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["estimate"]["parts_mb"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=DEMO_MODEL,
                        help="a model name/folder load_model knows, or a config.json (random init, demo tokenizer)")
    source.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), help="a random-init Llama of this size")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's load dtype")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                        help="fine-tuning precision (accelerate's; under ZeRO the DeepSpeed bf16 mode)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=4, help="calibration rows of the prune run")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every worker: allocations above it are "
                             "mmapped and given back to the OS when freed (0: glibc's default, a dynamic threshold)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, help="also write the raw per-rank results as JSON here")
    parser.add_argument("--pins", type=Path, help="add the measured peaks to this file "
                        "(tests/data/memory_measured.json is what tests/test_memory.py holds the estimator to)")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    started = datetime.datetime.now()
    with tempfile.TemporaryDirectory(prefix="membench-") as tmp:
        tmp = Path(tmp)
        if args.random_llama:
            model = str(build_random_llama(args.random_llama, tmp / f"llama-{args.random_llama}"))
        elif args.model.endswith(".json") and Path(args.model).is_file():
            model = str(model_from_config_file(Path(args.model), tmp / "from-config"))
        else:
            model = args.model
        config = AutoConfig.from_pretrained(resolve_model_path(model))
        pruned = magnitude_pruned(model, tmp / "pruned", args.dtype) if any(
            CONFIGS[n][0] == "finetune" for n in names) else None
        results = {}
        for name in names:
            out = tmp / name
            cmd, env = worker_command(name, model, out, args, pruned)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
            seconds = time.time() - t0
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                results[name] = {"error": f"exit {proc.returncode}", "seconds": seconds}
                continue
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            results[name] = {"seconds": seconds, "ranks": ranks,
                             "estimate": estimator_numbers(config, model, name, args)}
            peaks = ", ".join(f"rank {r['rank']} {r['peak_above_imports_mb']:.0f} MB" for r in ranks)
            print(f"  {seconds:.0f}s; peak above imports: {peaks}", file=sys.stderr, flush=True)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    meta = {"machine": machine(), "date": f"{started:%Y-%m-%d %H:%M}-{datetime.datetime.now():%H:%M} (local time)",
            "load_start": load_start, "load_end": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
            "model": args.random_llama and f"random-init Llama {args.random_llama}" or args.model, "params": params,
            "dtype": args.dtype, "seqlen": args.seqlen, "steps": args.steps, "micro_batch": args.micro_batch,
            "nsamples": args.nsamples, "mmap_threshold": args.mmap_threshold, "mixed_precision": args.mixed_precision}
    text = report(results, meta)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.pins is not None:
        write_pins(args.pins, config, model, results, meta, args)


def write_pins(path: Path, config, model: str, results: dict, meta: dict, args: argparse.Namespace) -> None:
    """Add this run's measured peaks to the file tests/test_memory.py checks the estimator against: per
    configuration the model config, the recipe, the world size and the highest rank's peak above imports (the
    entries of another model, precision or allocator setting are kept)."""
    pins = json.loads(path.read_text()) if path.is_file() else []
    key = (meta["model"], meta["mixed_precision"], meta["mmap_threshold"])
    pins = [p for p in pins if (p["model"], p["mixed_precision"], p["mmap_threshold"]) != key
            or p["configuration"] not in results]
    for name, r in results.items():
        if "ranks" not in r:
            continue
        task, zero, world, kd = CONFIGS[name]
        pins.append({"model": meta["model"], "configuration": name, "task": task, "world_size": world,
                     "mixed_precision": meta["mixed_precision"], "mmap_threshold": meta["mmap_threshold"],
                     "measured_mb": max(rank["peak_above_imports_mb"] for rank in r["ranks"]),
                     "date": meta["date"], "machine": meta["machine"]["cpu"], "config": config.to_dict(),
                     "recipe": recipe_for(model, zero or 0, kd, args).model_dump(mode="json")})
    path.write_text(json.dumps(pins, indent=1) + "\n")


if __name__ == "__main__":
    main()
