"""One-shot prune a causal LM (SparseGPT, Wanda or magnitude) and save it as a Hugging Face folder.

The output folder holds the pruned model (safetensors + tokenizer), `mask.safetensors` (1 bit per weight)
and `sparsity.json` (overall and per-linear sparsity; per matrix its time, reconstruction error, calibration
tokens and, for MoE experts, the expert index and the share of the layer's pooled Hessian it was given).
MoE models: every expert is pruned with its own Hessian from the tokens routed to it; routers and shared
experts stay dense unless --prune-router / --prune-shared-experts.
Under torchrun or `accelerate launch` every process prunes (its share of the calibration set, its share of
each layer's solves; gloo on CPU, NCCL with one GPU per process) and sparsity.json records each rank's share
under "world"; the main process writes the folder, the others wait. Bad input fails on every rank, before
anything is written.

examples:
  sparsegpt prune --model smollm2-135m --sparsity 0.5 --calib stdlib-docs --nsamples 32 --seqlen 256 --out out/s50
  sparsegpt prune --model facebook/opt-125m --method wanda --nm 2:4 --calib c4 --out out/opt-2of4
  sparsegpt prune --model meta-llama/Llama-2-7b-hf --sparsity 0.7 --allocation owl --calib c4 \\
      --nsamples 128 --seqlen 2048 --offload-activations --dtype float16 --device cuda --out out/l7b-owl70
  # a further stage that never revives what the first pruned:
  sparsegpt prune --model out/s50 --base-mask out/s50/mask.safetensors --sparsity 0.8 --calib c4 --out out/s80
  sparsegpt prune --model mistralai/Mixtral-8x7B-v0.1 --sparsity 0.5 --calib c4 --min-expert-tokens 512 --out out/mx
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from transformers import AutoConfig

from sparsegpt.core.data import calibration_ids, check_source, default_seqlen
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.precision import FORWARD_DTYPES
from sparsegpt.core.world import World, agree, joined
from sparsegpt.core.world import rank_device as _device  # --device: under a launch, cuda is this rank's GPU
from sparsegpt.prune.reconstruct import ReconstructConfig
from sparsegpt.prune.sequential import HESSIAN_DTYPES, PruneConfig, prune_model
from sparsegpt.prune.streaming import prune_streamed
from sparsegpt.storage.models import check_model, load_model, load_tokenizer, local_folder, save_model

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt prune`."""
    p.add_argument("--model", required=True, help="hub name, local HF folder, GGUF file or alias (smollm2-135m)")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured target, e.g. 0.7")
    target.add_argument("--nm", metavar="N:M", help="semi-structured N of every M weights pruned, e.g. 2:4")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"], help="per-layer targets")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: per-layer targets span target ± lambda")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier = |W|·‖x‖ above M × its layer mean")
    p.add_argument("--calib", required=True, help="calibration text: wikitext2, c4, ptb, stdlib-docs or a .txt/.jsonl")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=int, help="tokens per sequence (default: the model's context, capped at 2048)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT columns per lazy-update block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H)")
    p.add_argument("--include", help="regex: prune only linears whose name matches (e.g. 'mlp\\.')")
    p.add_argument("--exclude", help="regex: skip linears whose name matches (e.g. 'layers\\.0\\.')")
    p.add_argument("--base-mask", type=Path, help="mask.safetensors of an earlier stage: its zeros stay zero")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per layer forward")
    p.add_argument("--offload-activations", action="store_true", help="keep layer inputs on CPU between layers")
    p.add_argument("--stream", action="store_true",
                   help="hold one decoder layer in host memory at a time: read from the model folder's safetensors, "
                        "written to --out as it is pruned (same result, bit for bit; a hub model is downloaded first)")
    p.add_argument("--per-linear-hessian", action="store_true",
                   help="one Hessian per linear instead of one per shared input (q/k/v, gate/up); slower, same result")
    p.add_argument("--prune-router", action="store_true", help="MoE: also prune the routers (gates); default dense")
    p.add_argument("--prune-shared-experts", action="store_true",
                   help="MoE: also prune always-active shared experts (Qwen2-MoE's shared_expert); default dense")
    p.add_argument("--min-expert-tokens", type=int,
                   help="MoE: an expert matrix routed fewer calibration tokens gets the layer's pooled Hessian mixed "
                        "in up to this many tokens (default: its input width; 0 = only experts that saw none)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after each decoder layer is pruned, Adam on its kept weights (mask held) towards the dense "
                        "layer's outputs on the calibration rows")
    p.add_argument("--reconstruct-passes", type=int, help="reconstruction: passes over the calibration rows (3)")
    p.add_argument("--reconstruct-lr", type=float, help="reconstruction: Adam learning rate (4e-3)")
    p.add_argument("--reconstruct-batch", type=int, help="reconstruction: calibration rows per step (2)")
    p.add_argument("--reconstruct-inputs", choices=["dense", "pruned"],
                   help="reconstruction: train each layer on the dense prefix's outputs or the pruned one's (pruned)")
    p.add_argument("--device", default=None,
                   help="where each decoder layer is pruned (default: cuda if available, else cpu; the rest of the "
                        "model stays on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--dtype", default="auto", help="model weight dtype: auto, float32, bfloat16, float16")
    p.add_argument("--solver-dtype", default="float32", choices=["float32", "float64"], help="SparseGPT math dtype")
    p.add_argument("--hessian-dtype", default="float32", choices=list(HESSIAN_DTYPES),
                   help="the per-sequence Hessian products: float32 (default), or bfloat16 GEMMs whose products are "
                        "rounded to bf16 before the float64 sum (faster on AVX512-BF16/AMX; measured in RESULTS.md)")
    p.add_argument("--true-sequential", action="store_true",
                   help="one forward per layer: each input group (q/k/v, o, gate/up, down) solved when first called, "
                        "on inputs the groups before it already see pruned; all calibration rows in one forward")
    p.add_argument("--forward-dtype", default="float32", choices=list(FORWARD_DTYPES),
                   help="the layer forwards (calibration, propagation) of float32 weights: float32, bfloat16 "
                        "autocast, or auto = bfloat16 where the device multiplies it natively (default float32)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")


def _parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--nm {text!r} is not N:M; write e.g. --nm 2:4") from None
    return n, m


RECONSTRUCT_FLAGS = ("passes", "lr", "batch", "inputs")


def _reconstruct(args: argparse.Namespace) -> ReconstructConfig | None:
    given = {k: getattr(args, f"reconstruct_{k}") for k in RECONSTRUCT_FLAGS
             if getattr(args, f"reconstruct_{k}", None) is not None}
    if not args.reconstruct:
        if given:
            raise UserError(f"--reconstruct-{next(iter(given))} needs --reconstruct; add it or drop the flag")
        return None
    return ReconstructConfig(**given)


def _config(args: argparse.Namespace) -> PruneConfig:
    n, m = _parse_nm(args.nm) if args.nm else (0, 0)
    cfg = PruneConfig(method=args.method, sparsity=args.sparsity if args.nm is None else n / m, prune_n=n,
                      prune_m=m, blocksize=args.blocksize, percdamp=args.percdamp, allocation=args.allocation,
                      owl_lambda=args.owl_lambda, owl_m=args.owl_m, include=args.include, exclude=args.exclude,
                      batch_size=args.batch_size, offload_activations=args.offload_activations,
                      shared_hessian=not args.per_linear_hessian, dtype=args.solver_dtype,
                      forward_dtype=args.forward_dtype, true_sequential=args.true_sequential,
                      hessian_dtype=args.hessian_dtype,
                      prune_router=args.prune_router, prune_shared_experts=args.prune_shared_experts,
                      min_expert_tokens=args.min_expert_tokens, reconstruct=_reconstruct(args))
    cfg.validate()
    return cfg


def _check_args(args: argparse.Namespace) -> None:
    check_model(args.model)
    check_source(args.calib)
    if args.nsamples < 1:
        raise UserError(f"--nsamples must be >= 1, got {args.nsamples}")
    if args.seqlen is not None and args.seqlen < 1:
        raise UserError(f"--seqlen must be >= 1, got {args.seqlen}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"--out {args.out} already exists and is not an empty folder; choose a new one")
    if args.base_mask is not None and not args.base_mask.is_file():
        raise UserError(f"--base-mask {args.base_mask} is not a file; pass the mask.safetensors of the earlier stage")


def run(args: argparse.Namespace) -> int:
    """Join the launch's process group (if any), prune on every rank, write the folder on the main one."""
    with joined() as world:
        return _run(args, world)


def _settings(args: argparse.Namespace) -> tuple[PruneConfig, MaskSet | None]:
    """The checked config and the base mask, before any model is read."""
    cfg = _config(args)
    _check_args(args)
    return cfg, MaskSet.load(args.base_mask) if args.base_mask is not None else None


def _prepare(args: argparse.Namespace):
    return (*_settings(args), *load_model(args.model, dtype=args.dtype, device="cpu"))


def _calibration(args: argparse.Namespace, tokenizer, seqlen: int, world: World):
    calib = agree(world, lambda: calibration_ids(args.calib, tokenizer, nsamples=args.nsamples,
                                                 seqlen=seqlen, seed=args.seed) if world.is_main else None)
    return world.broadcast_object(calib)  # one calibration set, whatever each rank's tokenizer state


def _report(args: argparse.Namespace, cfg: PruneConfig, seqlen: int, result, per_linear: dict) -> dict:
    return {"model": args.model, "method": cfg.method, "target": cfg.target, "nm": args.nm,
            "allocation": cfg.allocation, "prune_router": cfg.prune_router,
            "prune_shared_experts": cfg.prune_shared_experts, "min_expert_tokens": cfg.min_expert_tokens,
            "calib": args.calib, "nsamples": args.nsamples, "seqlen": seqlen, "streamed": args.stream,
            "forward_dtype": cfg.forward_dtype, "hessian_dtype": cfg.hessian_dtype,
            "true_sequential": cfg.true_sequential,
            "reconstruct": dataclasses.asdict(cfg.reconstruct) if cfg.reconstruct else None,
            "reconstruction": result.reconstruction,
            "sparsity": result.masks.sparsity(), "per_linear": per_linear, "stats": result.stats,
            "seconds": result.seconds, "world": result.world}


def _run_streamed(args: argparse.Namespace, world: World) -> int:
    """--stream: one decoder layer in host memory at a time (`streaming.prune_streamed`; rank 0 writes)."""
    def prepare():
        settings, folder = _settings(args), local_folder(args.model)
        return (*settings, folder, load_tokenizer(folder), AutoConfig.from_pretrained(folder))

    cfg, base, folder, tokenizer, config = agree(world, prepare)
    seqlen = args.seqlen or default_seqlen(config)
    calib = _calibration(args, tokenizer, seqlen, world)
    result = prune_streamed(folder, calib, cfg, args.out, tokenizer=tokenizer, base_masks=base,
                            device=_device(args.device, world), dtype=args.dtype, world=world, extra_files=lambda r: {
                                "sparsity.json": json.dumps(_report(args, cfg, seqlen, r, r.masks.per_module()),
                                                            indent=1).encode()})
    if world.is_main:
        log.info("pruned %s to %.4f sparsity (%s, target %.4f, streamed) in %.1fs on %d process(es) -> %s",
                 args.model, result.masks.sparsity(), cfg.method, cfg.target, result.seconds, world.size, args.out)
    return 0


def _run(args: argparse.Namespace, world: World) -> int:
    """Load, calibrate, prune, verify, and write the folder atomically."""
    if args.stream:
        return _run_streamed(args, world)
    cfg, base, model, tokenizer = agree(world, lambda: _prepare(args))
    seqlen = args.seqlen or default_seqlen(model)
    calib = _calibration(args, tokenizer, seqlen, world)
    result = prune_model(model, calib, cfg, base_masks=base, device=_device(args.device, world), world=world)
    if not world.is_main:
        world.barrier()  # the main process writes the folder
        return 0
    report = _report(args, cfg, seqlen, result, result.masks.verify(model))
    with tempfile.TemporaryDirectory() as tmp:
        result.masks.save(Path(tmp) / "mask.safetensors")
        extra = {"mask.safetensors": (Path(tmp) / "mask.safetensors").read_bytes(),
                 "sparsity.json": json.dumps(report, indent=1).encode()}
    save_model(model, tokenizer, args.out, extra_files=extra)
    log.info("pruned %s to %.4f sparsity (%s, target %.4f) in %.1fs on %d process(es) -> %s", args.model,
             report["sparsity"], cfg.method, cfg.target, result.seconds, world.size, args.out)
    world.barrier()
    return 0
