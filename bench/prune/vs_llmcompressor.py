"""Side by side with llm-compressor: SparseGPT 50 % unstructured on SmolLM2-135M, the same calibration token ids.

  python bench/prune/vs_llmcompressor.py --setup      # once: .venv-llmcompressor/ with llmcompressor (CPU torch)
  python bench/prune/vs_llmcompressor.py --runs 2     # the bench: results_vs_llmcompressor.{json,md}

What it does:
1. loads the demo model with our `load_model("smollm2-135m", dtype="float32")` and saves it (+ tokenizer) with
   save_pretrained under --work, so both sides load the same safetensors by path;
2. draws `calibration_ids("stdlib-docs", nsamples=32, seqlen=512, seed=0)` once and saves the ids as a .pt file;
3. for each run, two child processes, one thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1)):
   - "ours": this interpreter, `prune_model(model, calib, PruneConfig(sparsity=0.5, blocksize=128, percdamp=0.01))`;
   - "llmcompressor": the venv's interpreter, `oneshot(model=model, dataset=Dataset{input_ids, attention_mask},
     recipe=SparseGPTModifier(sparsity=0.5, mask_structure="0:0", block_size=128, dampening_frac=0.01, ...))`;
   each times its load and its prune call in CPU seconds (time.process_time) and wall seconds, and its whole process
   CPU up to the end of pruning (getrusage(RUSAGE_SELF): interpreter start, imports, load, prune; not the save);
   the parent records each child's CPU as getrusage(RUSAGE_CHILDREN) too (that one includes the save);
   each child writes its pruned weights (a plain safetensors state dict, no compressed format);
4. evaluates the dense model and both pruned ones here with our perplexity on 32 × 128 test windows of stdlib-docs
   (the calibration's source) and debian-licenses (held out), and counts the zeros of the decoder linears.

The child modes (--child ours / --child llmcompressor) are internal; the llmcompressor child imports only torch,
transformers, datasets, safetensors and llmcompressor (sparsegpt is not installed in the venv).
The machine is usually shared: compare CPU seconds, not wall seconds, and read the load averages in the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-llmcompressor"
HERE = Path(__file__).resolve().parent
JSON_OUT = HERE / "results_vs_llmcompressor.json"
MD_OUT = HERE / "results_vs_llmcompressor.md"
LLMC_VERSION = "0.14.0"
TORCH_VERSION = "2.13.0"  # a CPU wheel of this version is on the machine's disk; unpinned, pip would fetch CUDA torch

MODEL = "smollm2-135m"
CALIB_SOURCE, NSAMPLES, SEQLEN, SEED = "stdlib-docs", 32, 512, 0
EVAL_SOURCES, EVAL_SEQLEN, EVAL_WINDOWS = ("stdlib-docs", "debian-licenses"), 128, 32
SPARSITY, BLOCKSIZE, DAMP = 0.5, 128, 0.01
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "DISABLE_TQDM": "1"}


def venv_python() -> Path:
    return VENV / "bin" / "python"


# ---------------------------------------------------------------- calibration file (shared by both sides)

def save_calibration(ids, path: str | os.PathLike) -> None:
    """The (nsamples, seqlen) int64 token ids as a .pt file both sides read."""
    import torch

    torch.save(ids.to(torch.int64).contiguous(), path)


def load_calibration(path: str | os.PathLike):
    import torch

    ids = torch.load(path, weights_only=True)
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise ValueError(f"{path}: expected a 2-D int64 tensor of token ids, got {ids.dtype} {tuple(ids.shape)}")
    return ids


def save_weights(model, path: str | os.PathLike) -> None:
    """The whole state dict as plain safetensors (tied tensors cloned, so save_file accepts them)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise RuntimeError(f"weights still offloaded (meta) after pruning: {meta[:3]}")
    save_file(state, str(path))


# ---------------------------------------------------------------- setup

def setup() -> None:
    """Create .venv-llmcompressor/: torch pinned first (CPU wheel), then llmcompressor under a constraint."""
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={TORCH_VERSION}\n")  # llmcompressor's requirements must not replace the CPU torch
    try:
        subprocess.run([*pip, f"llmcompressor=={LLMC_VERSION}", "-c", f.name], check=True)
    finally:
        os.unlink(f.name)
    check = "import torch, llmcompressor, transformers; print(torch.__version__, llmcompressor.__version__, " \
            "transformers.__version__)"
    out = subprocess.run([str(venv_python()), "-c", check], check=True, capture_output=True, text=True,
                         env={**os.environ, **ONE_THREAD})
    print(f"{VENV}: torch, llmcompressor, transformers = {out.stdout.strip().splitlines()[-1]}")


def venv_freeze() -> list[str]:
    out = subprocess.run([str(venv_python()), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    return out.stdout.split()


# ---------------------------------------------------------------- children

def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_ours(work: Path, out: Path, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from sparsegpt.prune.sequential import PruneConfig, prune_model
    from sparsegpt.storage.models import load_model

    t0, w0 = time.process_time(), time.perf_counter()
    model, _ = load_model(work / "base", dtype="float32", device="cpu")
    calib = load_calibration(work / "calib.pt")
    t1, w1 = time.process_time(), time.perf_counter()
    cfg = PruneConfig(method="sparsegpt", sparsity=SPARSITY, blocksize=BLOCKSIZE, percdamp=DAMP,
                      forward_dtype=args.ours_forward_dtype, true_sequential=args.ours_true_sequential,
                      hessian_dtype=args.ours_hessian_dtype)
    result = prune_model(model, calib, cfg, device="cpu")
    t2, w2 = time.process_time(), time.perf_counter()
    phases = result.world["ranks"][0]["seconds"]  # wall seconds per phase of the pass
    row = {"load_cpu_s": t1 - t0, "load_wall_s": w1 - w0, "prune_cpu_s": t2 - t1, "prune_wall_s": w2 - w1,
           "process_cpu_s": process_cpu(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads(), "solve_wall_s": phases["solve"], "phases_wall_s": phases,
           "settings": {"batch_size": cfg.batch_size, "shared_hessian": cfg.shared_hessian, "dtype": cfg.dtype,
                        "forward_dtype": cfg.forward_dtype, "true_sequential": cfg.true_sequential,
                        "hessian_dtype": cfg.hessian_dtype}}
    save_weights(model, out)
    return row


def child_llmcompressor(work: Path, out: Path, args) -> dict:
    import torch

    torch.set_num_threads(1)
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0, w0 = time.process_time(), time.perf_counter()
    batch_size = args.llmc_batch_size
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=getattr(torch, args.llmc_dtype))
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    ids = load_calibration(work / "calib.pt")
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t1, w1 = time.process_time(), time.perf_counter()
    recipe = SparseGPTModifier(sparsity=SPARSITY, mask_structure="0:0", block_size=BLOCKSIZE, dampening_frac=DAMP,
                               targets=["Linear"], ignore=["re:.*lm_head"])
    model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
                    num_calibration_samples=NSAMPLES, max_seq_length=SEQLEN, shuffle_calibration_samples=False,
                    batch_size=batch_size)
    t2, w2 = time.process_time(), time.perf_counter()
    row = {"load_cpu_s": t1 - t0, "load_wall_s": w1 - w0, "prune_cpu_s": t2 - t1, "prune_wall_s": w2 - w1,
           "process_cpu_s": process_cpu(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads(), "llmcompressor": llmcompressor.__version__,
           "settings": {"batch_size": batch_size, "dtype": args.llmc_dtype,
                        "pipeline": "independent -> sequential (inferred)",
                        "recipe": recipe.model_dump(exclude_none=True)}}
    save_weights(model, out)
    return row


def run_child(side: str, work: Path, out: Path, args) -> dict:
    """One side in a fresh process; its last stdout line is the JSON row; CPU from RUSAGE_CHILDREN as a check."""
    python = str(venv_python()) if side == "llmcompressor" else sys.executable
    env = {**os.environ, **ONE_THREAD}
    if side == "llmcompressor":
        env.pop("PYTHONPATH", None)  # nothing of ours in their process
    cmd = [python, str(Path(__file__).resolve()), "--child", side, "--work", str(work), "--weights", str(out),
           "--llmc-batch-size", str(args.llmc_batch_size), "--llmc-dtype", args.llmc_dtype,
           "--ours-forward-dtype", args.ours_forward_dtype, "--ours-hessian-dtype", args.ours_hessian_dtype] \
        + ["--ours-true-sequential"] * args.ours_true_sequential
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{side}.log").write_text(done.stdout + done.stderr)  # llm-compressor logs (loguru) to stdout
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{side} child failed (exit {done.returncode}); its stderr is in {work / f'{side}.log'}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if side == "llmcompressor":  # its CompressionLogger's wall time of each sparsify_weight, from its loguru lines
        row["solve_wall_s"] = sum(float(line.rsplit(" ", 1)[-1].rstrip("s")) for line in done.stdout.splitlines()
                                  if "| SGPT | METRIC - time " in line)
    row.update(side=side, child_wall_s=wall, child_cpu_s=(after.ru_utime - before.ru_utime)
               + (after.ru_stime - before.ru_stime))
    return row


# ---------------------------------------------------------------- parent

def prepare(work: Path) -> None:
    """The dense model folder and the calibration ids, made once per --work folder."""
    import torch

    from sparsegpt.core.data import calibration_ids
    from sparsegpt.storage.models import load_model

    base = work / "base"
    if (base / "config.json").exists() and (work / "calib.pt").exists():
        return
    model, tok = load_model(MODEL, dtype="float32", device="cpu")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    ids = calibration_ids(CALIB_SOURCE, tok, nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED)
    save_calibration(ids, work / "calib.pt")
    assert torch.equal(load_calibration(work / "calib.pt"), ids)


def evaluate(work: Path, weights: Path | None) -> dict:
    """Our perplexity on both sources and the zero fraction of the decoder linears."""
    import torch
    from safetensors.torch import load_file

    from sparsegpt.core.architectures import decoder_layers
    from sparsegpt.core.data import eval_ids
    from sparsegpt.evaluate.perplexity import perplexity
    from sparsegpt.storage.models import load_model

    model, tok = load_model(work / "base", dtype="float32", device="cpu")
    if weights is not None:
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"{weights}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    zeros = total = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    row = {"sparsity": zeros / total}
    for source in EVAL_SOURCES:
        ids = eval_ids(source, tok, seqlen=EVAL_SEQLEN, split="test", max_windows=EVAL_WINDOWS)
        row[f"ppl_{source}"] = perplexity(model, ids, batch_size=4, device="cpu")
    return row


def machine() -> dict:
    import torch
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    noted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cpu": model, "flags_of_note": noted, "cores": os.cpu_count(), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def git_head() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def bench(args) -> None:
    import torch

    torch.set_num_threads(1)
    if not venv_python().exists():
        raise SystemExit(f"no {VENV}; run: python {Path(__file__).relative_to(ROOT)} --setup")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    loads = [os.getloadavg()]
    prepare(work)
    freeze = venv_freeze()
    rows = []
    for run in range(args.runs):
        order = ("ours", "llmcompressor") if run % 2 == 0 else ("llmcompressor", "ours")
        for side in order:
            load_before = os.getloadavg()
            row = run_child(side, work, work / f"{side}-{run}.safetensors", args)
            row.update(run=run, load_before=load_before, load_after=os.getloadavg())
            print(f"run {run} {side}: prune {row['prune_cpu_s']:.1f} s CPU ({row['prune_wall_s']:.1f} s wall), "
                  f"process {row['process_cpu_s']:.1f} s CPU, load {load_before[0]:.1f}", flush=True)
            rows.append(row)
    dense = evaluate(work, None)
    for row in rows:
        row.update(evaluate(work, work / f"{row['side']}-{row['run']}.safetensors"))
        print(f"run {row['run']} {row['side']}: sparsity {row['sparsity']:.4f}, "
              + ", ".join(f"ppl {s} {row[f'ppl_{s}']:.2f}" for s in EVAL_SOURCES), flush=True)
    loads.append(os.getloadavg())
    record = {"date": started.isoformat(timespec="seconds"), "commit": git_head(), "machine": machine(),
              "load_average": {"start": loads[0], "end": loads[1]}, "venv_freeze": freeze, "dense": dense,
              "rows": rows, "runs": args.runs, "llmc_batch_size": args.llmc_batch_size, "llmc_dtype": args.llmc_dtype,
              "ours_forward_dtype": args.ours_forward_dtype, "ours_true_sequential": args.ours_true_sequential,
              "ours_hessian_dtype": args.ours_hessian_dtype,
              "work": str(work)}
    history = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else []
    history.append(record)
    JSON_OUT.write_text(json.dumps(history, indent=1) + "\n")
    MD_OUT.write_text(report(history))
    print(f"wrote {JSON_OUT.relative_to(ROOT)} and {MD_OUT.relative_to(ROOT)}")


def fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def fmt_load(load) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def section(rec: dict) -> list[str]:
    """One invocation: its machine, load, versions and table."""
    m, rows, dense = rec["machine"], rec["rows"], rec["dense"]
    freeze = {line.split("==")[0].lower(): line.split("==")[-1] for line in rec["venv_freeze"] if "==" in line}
    flags = ", ".join(m["flags_of_note"]) or "none"
    batch = rec.get("llmc_batch_size", 1)
    llmc_dtype, forward = rec.get("llmc_dtype", "float32"), rec.get("ours_forward_dtype", "float32")
    ours_batch = "all rows in one forward (true_sequential)" if rec.get("ours_true_sequential") else "8 rows"
    hessian = rec.get("ours_hessian_dtype", "float32")
    cmd = f"--runs {rec['runs']}" + (f" --llmc-batch-size {batch}" if batch != 1 else "") \
        + (f" --llmc-dtype {llmc_dtype}" if llmc_dtype != "float32" else "") \
        + (f" --ours-forward-dtype {forward}" if forward != "float32" else "") \
        + (" --ours-true-sequential" if rec.get("ours_true_sequential") else "") \
        + (f" --ours-hessian-dtype {hessian}" if hessian != "float32" else "")
    lines = [
        f"## {rec['date'][:16].replace('T', ' ')} UTC: `{cmd}`", "",
        f"- commit {rec['commit']}; machine: {m['cpu']}, {m['cores']} cores, flags of note: {flags}"
        + ("" if "amx_bf16" in m["flags_of_note"] else " (no AMX)"),
        f"- load average (1 / 5 / 15 min) at start {fmt_load(rec['load_average']['start'])}, at end "
        f"{fmt_load(rec['load_average']['end'])}",
        f"- ours: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; llm-compressor's venv: "
        f"llmcompressor {freeze.get('llmcompressor', '?')}, torch {freeze.get('torch', '?')}, transformers "
        f"{freeze.get('transformers', '?')}, compressed-tensors {freeze.get('compressed-tensors', '?')}",
        f"- calibration batch: ours {ours_batch}, "
        f"llm-compressor {batch}; precision: ours float32 weights with forward_dtype {forward} and "
        f"hessian_dtype {hessian}, llm-compressor's "
        f"model loaded in {llmc_dtype}", "",
        "| run | side | prune CPU s | process CPU s | child CPU s | prune wall s | ratio ours/theirs (prune CPU) "
        f"| solve wall s | sparsity | ppl {EVAL_SOURCES[0]} | ppl {EVAL_SOURCES[1]} | peak RSS MB | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| – | dense | – | – | – | – | – | – | {dense['sparsity']:.6f} | {dense[f'ppl_{EVAL_SOURCES[0]}']:.2f} | "
        f"{dense[f'ppl_{EVAL_SOURCES[1]}']:.2f} | – | – |",
    ]
    for row in rows:
        theirs = next(r for r in rows if r["run"] == row["run"] and r["side"] == "llmcompressor")
        ratio = row["prune_cpu_s"] / theirs["prune_cpu_s"]
        lines.append(
            f"| {row['run']} | {row['side']} | {row['prune_cpu_s']:.1f} | {row['process_cpu_s']:.1f} | "
            f"{row['child_cpu_s']:.1f} | {row['prune_wall_s']:.1f} | "
            f"{f'{ratio:.2f}×' if row['side'] == 'ours' else '1'} | {fmt(row.get('solve_wall_s'))} | "
            f"{row['sparsity']:.6f} | "
            f"{row[f'ppl_{EVAL_SOURCES[0]}']:.2f} | {row[f'ppl_{EVAL_SOURCES[1]}']:.2f} | "
            f"{row.get('peak_rss_mb', float('nan')):.0f} | {row['load_before'][0]:.1f} |")
    ours = [r for r in rows if r["side"] == "ours"]
    theirs = [r for r in rows if r["side"] == "llmcompressor"]
    total = sum(r["prune_cpu_s"] for r in ours) / sum(r["prune_cpu_s"] for r in theirs)
    proc = sum(r["process_cpu_s"] for r in ours) / sum(r["process_cpu_s"] for r in theirs)
    return lines + ["", f"Over these runs: ours / llm-compressor's prune CPU = **{total:.2f}×**, whole process "
                    f"(imports + load + prune) = **{proc:.2f}×**; issue 23's goal is ≤ 0.3×.", ""]


def report(history: list[dict]) -> str:
    """Every invocation in the JSON, oldest first, then what differs between the two sides."""
    lines = [
        "# Side by side with llm-compressor: SparseGPT 50 % on SmolLM2-135M", "",
        "Made by `python bench/prune/vs_llmcompressor.py` (after `--setup`); every invocation is appended to "
        "`results_vs_llmcompressor.json` and shown here.", "",
        f"- model: SmolLM2-135M-Instruct fp32 (our `load_model(\"{MODEL}\")`, saved once with save_pretrained; both "
        "sides load that folder); calibration: the same token ids, "
        f"`calibration_ids(\"{CALIB_SOURCE}\", nsamples={NSAMPLES}, seqlen={SEQLEN}, seed={SEED})`",
        "- one thread per side (OMP_NUM_THREADS=1, torch.set_num_threads(1)), each side a fresh process, the order "
        "alternating between runs; perplexity (ours, for the dense model and both pruned ones): "
        f"{EVAL_WINDOWS} × {EVAL_SEQLEN} test windows; sparsity: the zero fraction of the decoder linears",
        "- the 2 cores were shared with other jobs: wall seconds are inflated, CPU seconds are the comparison",
        "- prune = the pruning call alone (`prune_model` / `oneshot`); process = the child's own CPU up to the end of "
        "pruning (interpreter, imports, load, prune; no save); child = the parent's getrusage of the child "
        "(includes saving the weights); ratio = ours / llm-compressor's prune CPU in the same run; solve = the wall "
        "seconds of the per-linear SparseGPT solves inside the prune call (ours: the pass's `solve` phase; theirs: "
        "the sum of its `SGPT | METRIC - time` log lines), the rest of the call being the layer forwards, Hessian "
        "sums and propagation ('–': not recorded by that invocation)",
        "- perplexity windows are from the `test` split, which for these offline sources is the same text as "
        "`validation`", "",
    ]
    for rec in history:
        lines += section(rec)
    return "\n".join(lines + DIFFERENCES) + "\n"


DIFFERENCES = [
    "## What is the same and what differs",
    "",
    "Same: the calibration token ids (32 × 512, fed as they are: llm-compressor gets a `datasets.Dataset` of "
    "`input_ids` + all-ones `attention_mask`, `shuffle_calibration_samples=False`, so its length-aware sampler keeps "
    "all 32 rows; nothing is re-tokenized or truncated), 50 % unstructured (`mask_structure=\"0:0\"`), block size "
    "128 with the mask chosen per 128-column block by w² / [H⁻¹]²_jj, dampening 0.01 × mean(diag H), every "
    "`nn.Linear` of the decoder layers pruned, lm_head and embeddings left dense, sequential per decoder layer with "
    "each layer calibrated on the outputs of the already pruned layers before it (their SparseGPTModifier infers the "
    "`sequential` pipeline: a calibration pass, then a propagation pass through the pruned layer), fp32 weights.",
    "",
    "Differs:",
    "- batch: llm-compressor's default `batch_size=1` (what its docs advise, and what a user gets); ours runs the "
    "layer forwards 8 rows at a time (`PruneConfig.batch_size=8`, our default);",
    "- Hessian: ours multiplies each sequence's X Xᵀ in fp32 (upper block triangle only) and sums them into a "
    "float64 total, cast to fp32 for the solve, and shares one Hessian between linears with the same input (q/k/v, "
    "gate/up: 4 per layer instead of 7); theirs keeps one fp32 running mean per linear, rescaled at every batch "
    "(`H *= n/(n+b)`), 7 per layer, filled by forward hooks on each linear;",
    "- inverse: ours one Cholesky of the flipped H + damp·I and one triangular solve; theirs cholesky → "
    "cholesky_inverse → cholesky; damping: both 0.01 × mean(diag H), ours over live columns only, theirs over all "
    "after setting dead diagonals to 1 (the same when no input column is dead); dead columns zeroed on both sides;",
    "- column loop: theirs one Python iteration per column with a rank-1 update of the rest of the 128-block; ours "
    "nested lazy updates (rank-1 inside small sub-blocks, a GEMM per sub-block) with q/k/v and gate/up stacked into "
    "one loop; both solve in fp32;",
    "- mask quota: theirs prunes every entry ≤ the score at index ⌊n·s⌋ of the sorted block, one more than half "
    "(hence 0.500012); ours exactly half of each weight's block;",
    "- tracing: llm-compressor traces the model with torch.fx into per-layer subgraphs and offloads the cached "
    "activations to `sequential_offload_device=\"cpu\"` (a no-op here: everything is on the CPU); ours captures the "
    "first layer's inputs with a hook and runs the decoder layers themselves;",
    "- versions: each side runs its own transformers (llmcompressor 0.14 pins transformers ≤ 5.17); the same torch.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help=f"create {VENV.name}/ with llmcompressor=={LLMC_VERSION}")
    parser.add_argument("--runs", type=int, default=1, help="repeats of the pair (order alternates); default 1")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sparsegpt-vs-llmcompressor"),
                        help="folder for the dense model, calibration ids, pruned weights and child logs")
    parser.add_argument("--llmc-batch-size", type=int, default=1,
                        help="llm-compressor's calibration batch (default 1, its own default; ours is 8)")
    parser.add_argument("--ours-forward-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="our pass's layer-forward precision (PruneConfig.forward_dtype; default float32)")
    parser.add_argument("--ours-hessian-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="our Hessian products (PruneConfig.hessian_dtype; default float32)")
    parser.add_argument("--ours-true-sequential", action="store_true",
                        help="our pass with true_sequential (one forward per layer; PruneConfig.true_sequential)")
    parser.add_argument("--llmc-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the dtype llm-compressor loads the model in (default float32; bfloat16 is what "
                             "dtype='auto' gives for SmolLM2, whose config says bfloat16)")
    parser.add_argument("--child", choices=["ours", "llmcompressor"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = child_ours if args.child == "ours" else child_llmcompressor
        print(json.dumps(fn(Path(args.work), Path(args.weights), args)))
        return
    if args.setup:
        setup()
        return
    bench(args)


if __name__ == "__main__":
    main()
