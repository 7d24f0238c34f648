"""Issue 24, the GPU paths reviewed line by line: what a CPU run can show of each fix.

What no CPU run can show, and where it is checked instead (bench/gpu/issue24.py, a step of bench/gpu_check.sh,
on the first GPU lent):
- (1) ZeRO-3 placeholders on the rank's GPU after `load_for_training`: on a CPU machine the accelerator's device
  and the CPU are the same, so a device assert passes before the fix too; here the test checks that the load
  asks for `accelerator.device`, and the GPU check that every parameter's `.device` is cuda before any forward.
  The crash itself (a gather copying each weight to the CPU) needs 2 GPUs.
- (5) offloaded ZeRO-3 enforcement: here, no call of DeepSpeed's copying accessor (tests/test_zero.py); the GPU
  check counts host<->device copies inside the enforcer.
- (6) fp16 teacher autocast and (7) the masks' bytes on the GPU: the same code as here, measured there.
- (8a) TF32: accelerate switches it on only on CUDA; here a stand-in Accelerator does what accelerate does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs
from launching import free_port
from transformers import LlamaConfig, LlamaForCausalLM

from sparsegpt.commands import finetune as finetune_command
from sparsegpt.config.recipe import load_recipe
from sparsegpt.core import world as world_module
from sparsegpt.core.masks import KeepMask
from sparsegpt.heal import dsconfig
from sparsegpt.heal.distill import prepare_teacher
from sparsegpt.heal.enforce import MaskEnforcer
from sparsegpt.run import scheduler
from sparsegpt.storage.models import save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a process singleton: each test here builds its own."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# -- (2) collective timeouts -----------------------------------------------------------------------------------------

def test_init_from_env_waits_the_collective_timeout(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append((a, k)))
    world_module.init_from_env()
    assert len(calls) == 1 and calls[0][1]["timeout"] == world_module.COLLECTIVE_TIMEOUT >= timedelta(hours=1)


class _Built(Exception):
    """Raised by the stand-in Accelerator once it has recorded its arguments."""


def _record_accelerator(monkeypatch) -> list[dict]:
    seen: list[dict] = []

    def fake(**kwargs):
        seen.append(kwargs)
        raise _Built

    monkeypatch.setattr(dsconfig, "Accelerator", fake)
    return seen


def _timeouts(kwargs: dict) -> list[timedelta]:
    """The collective timeouts accelerate would pass to init_process_group / deepspeed.init_distributed."""
    return [h.to_kwargs().get("timeout") for h in kwargs.get("kwargs_handlers") or []
            if isinstance(h, InitProcessGroupKwargs)]


def test_finetune_command_and_scheduler_pass_the_collective_timeout(monkeypatch, tiny_llama_dir, tmp_path):
    seen = _record_accelerator(monkeypatch)
    parser = __import__("sparsegpt.cli", fromlist=["build_parser"]).build_parser("finetune")
    args = parser.parse_args(["finetune", "--model", str(tiny_llama_dir), "--data", "stdlib-docs", "--steps", "1",
                              "--out", str(tmp_path / "out")])
    with pytest.raises(_Built):
        finetune_command.run(args)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {tiny_llama_dir}\ndata: {{calibration: stdlib-docs}}\n"
                      "defaults: {finetune: {steps: 1}}\nstages:\n  - {name: s50, target: 0.5}\n")
    with pytest.raises(_Built):
        scheduler.build_accelerator(load_recipe(recipe), tmp_path / "run")
    assert len(seen) == 2
    for kwargs in seen:  # NCCL's default (and DeepSpeed's) is 10 minutes: rank 0 saving a 70B model takes longer
        assert _timeouts(kwargs) == [world_module.COLLECTIVE_TIMEOUT], kwargs


# -- (8a) TF32 ---------------------------------------------------------------------------------------------------------

def test_make_accelerator_leaves_tf32_as_it_was(monkeypatch):
    class SwitchesTf32On:  # what accelerate/state.py does with a dynamo backend, mixed_precision "no", on CUDA
        def __init__(self, **kwargs):
            torch.backends.cuda.matmul.allow_tf32 = True

    monkeypatch.setattr(dsconfig, "Accelerator", SwitchesTf32On)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    SwitchesTf32On()
    assert torch.backends.cuda.matmul.allow_tf32  # the stand-in does the harm...
    torch.backends.cuda.matmul.allow_tf32 = False
    assert isinstance(dsconfig.make_accelerator(mixed_precision="no"), SwitchesTf32On)
    assert not torch.backends.cuda.matmul.allow_tf32  # ...which make_accelerator undoes


# -- (6) the KD teacher's precision beside a bf16 student (DDP / single process) ---------------------------------------

def test_teacher_runs_in_bf16_beside_a_bf16_student(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).float()
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        reference = teacher(ids).logits.double()
    prepared = prepare_teacher(teacher, accelerator)
    assert {(p.dtype, p.device) for p in prepared.parameters()} == {(torch.bfloat16, accelerator.device)}
    with torch.no_grad():
        got = prepared(ids).logits.double()
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 rounding, not another model


def test_teacher_autocasts_in_fp16_beside_an_fp16_student(fresh_accelerate_state):
    """fp16: the weights stay fp32 (fp16 weights would overflow where fp32 masters are what the student trains)
    and the forward runs under torch's autocast (accelerate's autocast is a no-op under DeepSpeed)."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).float()
    prepared = prepare_teacher(teacher, accelerator)
    assert {p.dtype for p in prepared.parameters()} == {torch.float32}
    with torch.no_grad():
        assert prepared(torch.randint(0, 96, (1, 8))).logits.dtype == torch.float16


# -- (7) masks at 1 bit per weight where every rank holds the weight ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_mask_holds_packed_bits_and_zeroes_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(13, 7, generator=gen).to(dtype))  # 91 weights: not a multiple of 8
    mask = torch.rand(13, 7, generator=gen) < 0.6
    keep = KeepMask(weight, mask)
    assert sum(t.untyped_storage().nbytes() for t in keep.tensors()) == (91 + 7) // 8
    grad = torch.randn(13, 7, generator=gen, dtype=torch.float64)
    got = keep(grad.to(dtype).clone())
    assert torch.equal(got, grad.to(dtype).masked_fill(mask, 0))
    assert torch.equal(keep.keep_like(weight), (~mask).to(dtype))


def test_enforcer_zeroes_weights_and_moments_with_packed_masks(pruned_model_and_masks):
    model, masks = pruned_model_and_masks
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # no hooks: masked gradients are non-zero
    optimizer.step()
    enforcer = MaskEnforcer(model, masks, optimizer)
    assert enforcer.revived() > 0
    enforcer()
    assert enforcer.revived() == 0
    for param, mask in masks.param_masks(model).values():
        state = optimizer.state[param]
        assert all(torch.count_nonzero(t[mask]) == 0 for t in (param, state["exp_avg"], state["exp_avg_sq"]))
    assert enforcer.held_bytes() == sum((m.numel() + 7) // 8 for _, m in masks.param_masks(model).values())


@pytest.fixture
def pruned_model_and_masks():
    from zero_worker import magnitude_prune, tiny_llama

    model = tiny_llama()
    return model, magnitude_prune(model)


# -- (1) + (8b) ZeRO-3 loading: placement, and F.linear left as torch's ------------------------------------------------

ZERO3_LOAD = textwrap.dedent("""
    import sys
    import torch
    from accelerate import Accelerator
    from sparsegpt.core.zero import torch_linear_kept, whole_models
    from sparsegpt.heal.distill import prepare_teacher
    from sparsegpt.heal.dsconfig import cpu_deepspeed_handlers, deepspeed_plugin
    from sparsegpt.storage.models import load_for_training, load_model
    torch.set_num_threads(1)
    plugin = deepspeed_plugin(3, micro_batch=1, grad_accum=1, zero3_init=True)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=cpu_deepspeed_handlers(deepspeed=True))
    moves, to = [], torch.nn.Module.to
    def spy(self, *args, **kwargs):
        moves.append(str(args[0] if args else kwargs.get("device")))
        return to(self, *args, **kwargs)
    torch.nn.Module.to = spy
    with torch_linear_kept():
        teacher, _ = load_for_training(sys.argv[1], accelerator, dtype="float32")
        print("PATCHED_INSIDE", torch.nn.functional.linear is not torch._C._nn.linear)
    torch.nn.Module.to = to
    print("PATCHED_AFTER", torch.nn.functional.linear is not torch._C._nn.linear)
    params = list(teacher.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "not loaded into ZeRO-3 partitions"
    assert str(accelerator.device) in moves, (moves, accelerator.device)
    assert all(p.device == accelerator.device for p in params)
    with whole_models(accelerator):
        whole, _ = load_model(sys.argv[1], dtype="float32")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    engine = prepare_teacher(teacher, accelerator)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, whole(ids).logits, rtol=1e-5, atol=1e-5)
    print("ZERO3_LOAD_OK", moves)
""")


def _single_deepspeed_env() -> dict:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
            "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true",
            "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_zero3_load_asks_for_the_accelerator_device_and_restores_linear(tiny_llama_dir, tmp_path):
    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_LOAD)
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama_dir)], env=_single_deepspeed_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "ZERO3_LOAD_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "PATCHED_INSIDE True" in proc.stdout  # zero.Init did patch it (the test can fail)...
    assert "PATCHED_AFTER False" in proc.stdout  # ...and torch_linear_kept put torch's back


# -- (3) + (8b) two processes, two stages: no model carried on ranks > 0, F.linear restored after fine-tuning ----------

RELEASE_RECIPE = """\
name: release
model: {model}
dtype: float32
seed: 0
distributed: {{zero_stage: 3, micro_batch_size: 1, grad_accum: 1}}
data: {{calibration: stdlib-docs}}
defaults:
  prune: {{nsamples: 4, seqlen: 32, batch_size: 2, blocksize: 128}}
  finetune: {{steps: 1, seqlen: 32, lr: 1.0e-4}}
  eval:
    hooks:
      - {{type: perplexity, source: stdlib-docs, seqlen: 32, max_windows: 2}}
stages:
  - {{name: s50, target: 0.5}}
  - {{name: s70, target: 0.7}}
"""


def _launch2(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "tests/gpu_review_worker.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_carry_no_model_between_stages(tiny_tokenizer, tmp_path):
    """Every rank: no whole model alive at a prune's entry (before: ranks > 0 kept the previous stage's model,
    placed on their GPU by its evaluation, through the whole next prune), at most one inside the pass;
    torch's F.linear back after each fine-tuning. The per-rank resident sets are printed (-s) for bench/RESULTS."""
    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(tiny_tokenizer), max_position_embeddings=64,
                         eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config).float(), tiny_tokenizer, tmp_path / "model")  # 8.9 M params, 36 MB
    recipe = tmp_path / "release.yaml"
    recipe.write_text(RELEASE_RECIPE.format(model=tmp_path / "model"))
    proc = _launch2("release", str(recipe), str(tmp_path / "run"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        events = report["events"]
        print(f"rank {rank}: " + ", ".join(f"{e['where']}@{e['stage']} live={e['live']} {e['rss_mb']:.0f}MB"
                                           for e in events))
        prunes = [e for e in events if e["where"] == "prune:enter"]
        assert [e["stage"] for e in prunes] == [0, 1] and all(e["live"] == 0 for e in prunes), (rank, events)
        assert all(e["live"] <= 1 for e in events if e["where"] == "prune_model"), (rank, events)
        tuned = [e for e in events if e["where"] == "finetune:exit"]
        assert len(tuned) == 2 and not any(e["linear_patched"] for e in tuned), (rank, events)


# -- (8d) ZeRO-3 padding is not a revived weight -----------------------------------------------------------------------

@pytest.mark.slow
def test_zero3_padding_is_not_counted_as_revived(tmp_path):
    proc = _launch2("padding", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["padded"] == 0 and reports[1]["padded"] > 0, reports  # the last rank holds the padding
    assert [r["revived"] for r in reports] == [0, 0], reports


# -- (8f) `sparsegpt eval` under torchrun -----------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_under_torchrun_splits_the_windows_and_reports_once(tiny_llama_dir, tmp_path):
    flags = ["-m", "sparsegpt.cli", "eval", "--model", str(tiny_llama_dir), "--ppl", "stdlib-docs", "--seqlen", "32",
             "--max-windows", "4", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, *flags, "--out", str(tmp_path / "one.json")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *flags, "--out", str(tmp_path / "two.json")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(re.findall(r"^ppl/stdlib-docs: ", two.stdout, re.M)) == 1, two.stdout  # the main rank alone prints
    ppl = [json.loads((tmp_path / f"{n}.json").read_text())["metrics"]["ppl/stdlib-docs"] for n in ("one", "two")]
    assert ppl[0] == ppl[1], ppl  # batch 1: the same per-window forwards, float64 sums


# -- (8c) no collective on a CPU tensor under NCCL: world.sum_scalar is gone ------------------------------------------

def test_world_has_no_cpu_tensor_collective():
    assert not hasattr(world_module, "sum_scalar")


# -- (8g) bench/gpu_check.sh fits its budget ---------------------------------------------------------------------------

GPU_CHECK = REPO / "bench" / "gpu_check.sh"


def _caps() -> tuple[int, list[int]]:
    text = GPU_CHECK.read_text()
    budget = int(re.search(r"^BUDGET_S=(\d+)", text, re.M).group(1))
    caps = [int(c) for c in re.findall(r"\bstep \"[^\"]+\" (\d+)\b", text)]
    return budget, caps


def test_gpu_check_step_caps_sum_to_at_most_its_budget():
    budget, caps = _caps()
    assert len(caps) >= 6, caps
    assert sum(caps) <= budget <= 8 * 60 - 20, (sum(caps), budget)  # 8 minutes, with 20 s for start-up and summary


@pytest.mark.slow
def test_gpu_check_dry_only_passes_on_cpu(tiny_llama_dir, tmp_path):
    """The CPU rehearsal: recipe and dry-run estimate within the GPU run's caps (the tiny model: the demo model's
    first use in a fresh cache converts its GGUF, which is not what the cap is for)."""
    env = {**os.environ, "GPU_CHECK_DRY_ONLY": "1", "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           "GPU_CHECK_MODEL": str(tiny_llama_dir)}
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "dry-run estimate: ok" in summary, summary
