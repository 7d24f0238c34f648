"""Mask-exact fine-tuning inside the trainers people use: the real transformers Trainer (1 process; 2 processes under
ZeRO-3 from its own DeepSpeed config), TRL's SFTTrainer (full and LoRA), distillation in a Trainer, the public
MaskGuard in a plain loop, the examples as documented, and the one-line errors for what cannot be kept exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port
from trainer_worker import arguments, dataset, saved_mask_exact, scenario
from transformers import Trainer
from zero_worker import magnitude_prune, tiny_llama, toy_ids

from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.guard import MaskGuard, load_mask, mask_report
from sparsegpt.heal.trainer import DistillationMixin, DistillingTrainer, SparseMaskCallback
from sparsegpt.storage.models import save_model

REPO = Path(__file__).resolve().parents[1]
EXACT = {"weight": 0, "fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}


def _check_scenario(record: dict, world: int, bitwise_resume: bool = True) -> None:
    """Guarded and resumed runs: every pruned entry 0, every kept weight trained, the resume equal bit for bit to the
    uninterrupted run (to float rounding with DeepSpeed's CPU Adam); the unguarded control drifts in all four."""
    guarded, resumed, control = record["guarded"], record["resumed"], record["control"]
    for run in (guarded, resumed, control):
        assert run["world"] == world and run["global_step"] == 4
        assert run["kinds"] == ["exp_avg", "exp_avg_sq", "fp32", "weight"]
        assert run["moved"] == run["kept"] > 0  # every kept weight of every masked linear changed
    assert guarded["nonzero"] == EXACT and resumed["nonzero"] == EXACT
    assert all(v > 0 for v in control["nonzero"].values()), control["nonzero"]
    if bitwise_resume:
        assert resumed["digest"] == guarded["digest"] and resumed["losses"] == guarded["losses"]
    else:  # DeepSpeedCPUAdam (optimizer offload): the resumed step 4 differed in the 7th digit (4.397686 / 4.397685)
        assert resumed["losses"] == pytest.approx(guarded["losses"], rel=1e-5)
    assert guarded["losses"][-1] < guarded["losses"][0]


@pytest.mark.slow
def test_trainer_one_process_keeps_the_mask_exact_through_accumulation_checkpointing_and_resume(tmp_path):
    _check_scenario(scenario(tmp_path), world=1)
    assert saved_mask_exact(tmp_path / "guarded" / "checkpoint-4", magnitude_prune(tiny_llama()))


OPTIMIZERS = {"zero2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3",
              "zero3_offload": "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero3", "zero2", "zero3_offload"])
def test_trainer_deepspeed_two_processes_keeps_the_mask_exact_and_resumes(backend, tmp_path):
    """torchrun, not accelerate launch: the Trainer builds its own DeepSpeed accelerator from TrainingArguments."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/trainer_worker.py", str(tmp_path), backend]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1]  # gathered counts and weights agree on both ranks
    _check_scenario(records[0], world=2, bitwise_resume=backend != "zero3_offload")
    assert records[0]["guarded"]["optimizer"] == OPTIMIZERS[backend]
    assert saved_mask_exact(tmp_path / "guarded" / "checkpoint-4", magnitude_prune(tiny_llama()))
    if backend != "zero3":
        return
    late = records[0]["late_attach"]
    assert "was wrapped or cast (DeepSpeed, accelerate prepare, .to()) after the mask guard attached" in late["late"]
    assert "the optimizer given is not the DeepSpeed engine's" in late["other"]
    assert late["engine"].endswith("14 masked parameters: weight 0, fp32 0, exp_avg 0, exp_avg_sq 0")
    assert saved_mask_exact(tmp_path / "guarded" / "checkpoint-4", magnitude_prune(tiny_llama()))


def _sft_dataset(n: int = 24):
    from datasets import Dataset

    from sparsegpt.core.data import load_text

    text = load_text("stdlib-docs", "train")
    return Dataset.from_dict({"text": [text[i * 400:(i + 1) * 400] for i in range(n)]})


def _sft_config(out: Path, **overrides):
    from trl import SFTConfig

    settings = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    learning_rate=3e-3, max_length=64, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                    disable_tqdm=True, optim="adamw_torch", logging_steps=1)
    return SFTConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_trl_sft_full_and_lora_keep_the_mask_and_lora_merges_sparse(make_tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig
    from trl import SFTTrainer

    data = _sft_dataset()
    model = make_tiny_model("llama")
    masks = magnitude_prune(model)
    before = {name: module.weight.detach().clone() for name, module in masks.modules(model).items()}
    callback = SparseMaskCallback(masks)
    trainer = SFTTrainer(model=model, args=_sft_config(tmp_path / "full"), train_dataset=data,
                         processing_class=tiny_tokenizer, callbacks=[callback])
    trainer.train()
    assert mask_report(masks, trainer.model, trainer.optimizer).nonzero == EXACT
    assert all(bool((module.weight.detach()[~masks.masks[name]] != before[name][~masks.masks[name]]).all())
               for name, module in masks.modules(trainer.model).items())

    model = make_tiny_model("llama")
    masks = magnitude_prune(model)
    save_model(model, tiny_tokenizer, tmp_path / "pruned")
    masks.save(tmp_path / "pruned" / "mask.safetensors")
    before = {name: module.weight.detach().clone() for name, module in masks.modules(model).items()}
    callback = SparseMaskCallback(tmp_path / "pruned")  # the mask read from a pruned model folder
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    trainer = SFTTrainer(model=model, args=_sft_config(tmp_path / "lora", learning_rate=1e-2), train_dataset=data,
                         processing_class=tiny_tokenizer, callbacks=[callback], peft_config=lora)
    trainer.train()
    merged = callback.guard.merge(trainer.model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    zeros = MaskSet.from_model(merged)
    for name, mask in masks.masks.items():
        assert torch.equal(zeros.masks[name], mask), name
    for name, module in masks.modules(merged).items():  # the adapted linears moved at kept positions only
        delta = module.weight.detach() != before[name]
        assert bool(delta.any()) == name.endswith(("q_proj", "v_proj", "down_proj")), name

    class DistillingSFT(DistillationMixin, SFTTrainer):
        pass

    model = make_tiny_model("llama")
    masks = magnitude_prune(model)
    trainer = DistillingSFT(model=model, args=_sft_config(tmp_path / "kd", max_steps=2), train_dataset=data,
                            processing_class=tiny_tokenizer, callbacks=[SparseMaskCallback(masks)],
                            teacher=make_tiny_model("llama", seed=1), kd=KDConfig(logit_weight=1.0, temperature=2.0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert mask_report(masks, trainer.model, trainer.optimizer).nonzero == EXACT


@pytest.mark.slow
def test_trl_sft_resume_from_a_checkpoint_keeps_the_mask_and_equals_the_uninterrupted_run(make_tiny_model,
                                                                                           tiny_tokenizer, tmp_path):
    """SFTTrainer saves at step 2 of 4; a fresh trainer resumed from that checkpoint (weights, Adam moments, data
    order restored by the Trainer, the callback re-attached on train begin) ends exactly where the uninterrupted run
    ends, with every pruned entry of the weights and both Adam moments exactly 0."""
    from trl import SFTTrainer

    data = _sft_dataset()

    def trainer(out: Path) -> tuple:
        model = make_tiny_model("llama")
        masks = magnitude_prune(model)
        args = _sft_config(out, max_steps=4, save_strategy="steps", save_steps=2)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer,
                          callbacks=[SparseMaskCallback(masks)]), masks

    whole, _ = trainer(tmp_path / "whole")
    whole.train()
    resumed, masks = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert mask_report(masks, resumed.model, resumed.optimizer).nonzero == EXACT
    ours, theirs = resumed.model.state_dict(), whole.model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.fixture
def pruned_dir(tiny_llama_dir, tmp_path):
    """The tiny Llama magnitude-pruned to 70 %, saved with its mask.safetensors as `sparsegpt prune` leaves it."""
    from sparsegpt.storage.models import load_model

    model, tokenizer = load_model(tiny_llama_dir)
    masks = magnitude_prune(model)
    save_model(model, tokenizer, tmp_path / "pruned")
    masks.save(tmp_path / "pruned" / "mask.safetensors")
    return tmp_path / "pruned"


def _example(*args: str, processes: int = 0, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run an example as the README shows it: python, or `torchrun --nproc_per_node N` with DeepSpeed on CPU."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "SPARSEGPT_NO_PROGRESS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(free_port())] if processes else []
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + proc.stderr[-3000:]
    return proc


def _check_healed(folder: Path, pruned: Path) -> None:
    """A plain transformers model whose zeros are the pruned model's mask, kept weights trained, mask saved."""
    from sparsegpt.storage.models import load_model

    healed, _ = load_model(folder)
    before, _ = load_model(pruned)
    masks = MaskSet.load(pruned / "mask.safetensors")
    assert torch.equal(MaskSet.load(folder / "mask.safetensors").masks["model.layers.0.mlp.down_proj"],
                       masks.masks["model.layers.0.mlp.down_proj"])
    zeros = MaskSet.from_model(healed)
    moved = 0
    for name, module in masks.modules(healed).items():
        assert torch.equal(zeros.masks[name], masks.masks[name]), name
        moved += int((module.weight != masks.modules(before)[name].weight).sum())
    assert moved > 0


@pytest.mark.slow
def test_example_trainer_zero3_two_processes_with_distillation(pruned_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "healed"
    _example("examples/trainer_zero3.py", "--model", str(pruned_dir), "--out", str(out), "--steps", "3",
             "--seqlen", "32", "--teacher", str(tiny_llama_dir), processes=2)
    _check_healed(out, pruned_dir)


@pytest.mark.slow
def test_example_trl_sft_lora_merges_sparse(pruned_dir, tmp_path):
    out = tmp_path / "sft"
    _example("examples/trl_sft_lora.py", "--model", str(pruned_dir), "--out", str(out), "--steps", "3",
             "--seqlen", "32")
    _check_healed(out, pruned_dir)


@pytest.mark.slow
def test_example_accelerate_loop(pruned_dir, tmp_path):
    out = tmp_path / "loop"
    proc = _example("examples/accelerate_loop.py", "--model", str(pruned_dir), "--out", str(out), "--steps", "3",
                    "--seqlen", "32")
    assert "14 masked parameters: weight 0, fp32 0, exp_avg 0, exp_avg_sq 0" in proc.stdout
    _check_healed(out, pruned_dir)


# -- distillation inside a Trainer ----------------------------------------------------------------------------------

def _reference_kd(student, teacher, ids: torch.Tensor, kd: KDConfig) -> float:
    """ce_weight·CE + logit_weight·T²·KL(teacher‖student at T) + hidden_weight·mean_l Σ(s−t)²/Σt², in float64."""
    with torch.no_grad():
        s = student(input_ids=ids, output_hidden_states=True)
        t = teacher(input_ids=ids, output_hidden_states=True)
    logits, target = s.logits.double(), t.logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    log_p_s = torch.log_softmax(logits / kd.temperature, -1)
    log_p_t = torch.log_softmax(target / kd.temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * kd.temperature ** 2
    hidden = torch.stack([((a.double() - b.double()) ** 2).sum() / (b.double() ** 2).sum()
                          for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])]).mean()
    return float(kd.ce_weight * ce + kd.logit_weight * kl + kd.hidden_weight * hidden)


@pytest.mark.slow
def test_distilling_trainer_loss_is_the_kd_objective_and_keeps_the_mask(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)
    masks = magnitude_prune(student)
    kd = KDConfig(logit_weight=1.0, hidden_weight=0.5, temperature=2.0, ce_weight=0.5)
    trainer = DistillingTrainer(model=student, args=arguments(tmp_path, max_steps=2, save_steps=10,
                                                              activation_checkpointing=False),
                                train_dataset=dataset(), teacher=teacher, kd=kd,
                                callbacks=[SparseMaskCallback(masks)])
    ids = torch.stack([row["input_ids"] for row in dataset()[:4]])
    student.eval()
    got = float(trainer.compute_loss(student, {"input_ids": ids, "labels": ids}).detach())
    assert got == pytest.approx(_reference_kd(student, teacher, ids, kd), rel=1e-5)
    trainer.train()  # the callback verifies weights, masters and moments at the end (UserError otherwise)
    assert trainer._prepared is None  # the teacher was released
    with pytest.raises(UserError, match="teacher vocab 50 != student vocab 96"):
        other = tiny_llama(2)
        other.config.vocab_size = 50
        DistillingTrainer(model=tiny_llama(0), args=arguments(tmp_path), train_dataset=dataset(), teacher=other,
                          kd=kd)


# -- the public guard in a plain loop, and what it refuses -----------------------------------------------------------

def _adamw(model, **kwargs):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **kwargs)


def test_guard_in_a_plain_loop_reads_the_mask_from_the_model_zeros_and_detaches():
    model = tiny_llama()
    masks = magnitude_prune(model)
    optimizer = _adamw(model, weight_decay=0.1)
    guard = MaskGuard().attach(model, optimizer)  # no mask given: the model's exact zeros
    assert all(torch.equal(guard.masks.masks[name], mask) for name, mask in masks.masks.items())
    ids = toy_ids()[:4]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        guard.step()
        optimizer.zero_grad()
    report = guard.verify()
    assert report.exact and report.kinds == {"weight", "fp32", "exp_avg", "exp_avg_sq"} and report.parameters == 14
    guard.detach()  # no hooks left: the next steps revive pruned weights, and the report says so
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    drift = mask_report(masks, model, optimizer)
    assert all(drift.nonzero[kind] > 0 for kind in ("weight", "exp_avg", "exp_avg_sq")), drift.nonzero
    with pytest.raises(UserError, match=r"pruned entries are non-zero \(weight \d+, fp32 \d+"):
        guard.verify()


class AdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes' class of that name (not installed): the guard refuses it by name."""


@pytest.mark.parametrize("make, message", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "optimizer SGD is not one the mask enforcement"),
    (lambda m: _adamw(m, amsgrad=True), r"AdamW\(amsgrad=True\) keeps a third moment"),
    (lambda m: AdamW8bit(m.parameters()), "optimizer AdamW8bit keeps block-quantized moments"),
    (lambda m: None, "MaskGuard.attach needs the optimizer"),
])
def test_guard_refuses_optimizers_whose_state_it_cannot_keep_exact(make, message):
    model = tiny_llama()
    magnitude_prune(model)
    with pytest.raises(UserError, match=message):
        MaskGuard().attach(model, make(model))


def test_guard_refuses_a_mask_of_another_model(make_tiny_model, tiny_llama_dir, tmp_path):
    model = tiny_llama()
    with pytest.raises(UserError, match="masked modules are not in the model"):
        MaskGuard(magnitude_prune(make_tiny_model("gpt2"))).attach(model, _adamw(model))
    wider = tiny_llama()
    wider.model.layers[0].mlp.down_proj = torch.nn.Linear(256, 64, bias=False)
    with pytest.raises(UserError, match=r"mask for model.layers.0.mlp.down_proj is \(64, 256\) but the weight is "
                                        r"\(out, in\) = \(64, 128\)"):
        MaskGuard(MaskSet.from_model(wider)).attach(model, _adamw(model))
    with pytest.raises(UserError, match="pruned weights are non-zero before training; the mask does not belong"):
        MaskGuard(magnitude_prune(tiny_llama())).attach(model, _adamw(model))  # a dense model
    with pytest.raises(UserError, match="holds no mask.safetensors"):
        load_mask(tiny_llama_dir)
    with pytest.raises(UserError, match="does not exist"):
        load_mask(tmp_path / "nowhere")


def test_guard_refuses_a_model_cast_or_wrapped_after_it_attached():
    model = tiny_llama()
    magnitude_prune(model)
    optimizer = _adamw(model)
    guard = MaskGuard().attach(model, optimizer)
    model.to(torch.bfloat16)
    with pytest.raises(UserError, match="wrapped or cast .* after the mask guard attached; attach after"):
        guard.step()


def test_callback_refuses_adafactor_and_fsdp(tmp_path):
    from types import SimpleNamespace

    model = tiny_llama()
    masks = magnitude_prune(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, optim="adafactor"), train_dataset=dataset(),
                      callbacks=[SparseMaskCallback(masks)])
    with pytest.raises(UserError, match="optimizer Adafactor keeps factored second moments .* optim='adamw_torch'"):
        trainer.train()
    with pytest.raises(UserError, match="does not support FSDP .* use DeepSpeed ZeRO-3"):
        SparseMaskCallback(masks).on_train_begin(SimpleNamespace(fsdp="full_shard"), None, None, model=model)


def test_load_mask_reads_every_source(tiny_llama_dir, tmp_path):
    from sparsegpt.storage.compact_export import save_compact
    from sparsegpt.storage.models import load_model

    model, tokenizer = load_model(tiny_llama_dir)
    masks = magnitude_prune(model)
    stage = tmp_path / "run" / "stages" / "01-s70"
    save_model(model, tokenizer, stage / "model")
    masks.save(stage / "model" / "mask.safetensors")
    save_compact(model, tokenizer, masks, tmp_path / "compact")
    for source in (masks, stage, stage / "model", stage / "model" / "mask.safetensors", tmp_path / "compact", model):
        loaded = load_mask(source)
        assert sorted(loaded.masks) == sorted(masks.masks), source  # a compact folder lists them sorted
        assert all(torch.equal(loaded.masks[name], mask) for name, mask in masks.masks.items()), source
    with pytest.raises(UserError, match="no mask given and no model"):
        load_mask(None)
