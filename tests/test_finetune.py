"""Single-process fine-tuning: the mask survives (and demonstrably would not without enforcement), resume is
bitwise identical, NaN stops before the update with checkpoints intact, bad inputs fail before step 1."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from zero_worker import magnitude_prune, tiny_llama, toy_ids

from sparsegpt.cli import main
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.dsconfig import deepspeed_config
from sparsegpt.heal.finetune import DataOrder, TrainingDiverged, finetune, lr_factor
from sparsegpt.heal.lora import LoraSettings
from sparsegpt.storage.models import load_model, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def accelerator():
    """A fresh single-process Accelerator; accelerate's process-wide state is reset afterwards."""
    yield Accelerator()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _cfg(**overrides) -> FinetuneConfig:
    base = dict(steps=4, lr=3e-3, micro_batch_size=2, grad_accum=2, weight_decay=0.1, warmup_steps=1, seed=0)
    return FinetuneConfig(**{**base, **overrides})


def _zeros_equal_mask(model, masks: MaskSet) -> bool:
    return all(torch.equal(MaskSet.from_model(model).masks[name], mask) for name, mask in masks.masks.items())


def _adam_nonzero_at_masks(ckpt: Path, model, masks: MaskSet) -> int:
    """Non-zero Adam moments at masked positions in an accelerate checkpoint (state indexed by parameter order)."""
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    index = {name: i for i, (name, p) in enumerate(model.named_parameters()) if p.requires_grad}
    total = 0
    for name, mask in masks.masks.items():
        for key in ("exp_avg", "exp_avg_sq"):
            total += int(torch.count_nonzero(state[index[f"{name}.weight"]][key][mask]))
    return total


def test_lr_schedules_against_their_formulas():
    cfg = FinetuneConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    for s in range(2, 10):
        assert lr_factor(s, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 2) / 8)), abs=1e-15)
    linear = FinetuneConfig(steps=10, warmup_steps=2, schedule="linear")
    assert [lr_factor(s, linear) for s in (2, 6, 9)] == pytest.approx([1.0, 0.5, 0.125])
    assert {lr_factor(s, FinetuneConfig(steps=5, schedule="constant")) for s in range(5)} == {1.0}


def test_data_order_is_deterministic_and_each_process_takes_its_shard():
    cfg = FinetuneConfig(steps=1, micro_batch_size=2, grad_accum=3)
    order = DataOrder(10, seed=7)
    shards = [torch.cat([DataOrder(10, 7).micro_batch(0, m, cfg, 2, rank) for m in range(3)]) for rank in (0, 1)]
    step0 = order.rows(0, 12)
    assert sorted(torch.cat(shards).tolist()) == sorted(step0.tolist())  # the two shards are the global batch
    assert sorted(step0[:10].tolist()) == list(range(10))  # an epoch is a permutation
    assert torch.equal(step0, DataOrder(10, 7).rows(0, 12)) and not torch.equal(step0, DataOrder(10, 8).rows(0, 12))


def test_recipe_jsons_are_what_deepspeed_config_builds():
    for name, args in {"zero2": (2,), "zero3": (3,), "zero3_offload": (3, True, True)}.items():
        assert json.loads((REPO / "recipes/deepspeed" / f"{name}.json").read_text()) == deepspeed_config(*args)
    for stage in (2, 3):
        assert f"recipes/deepspeed/zero{stage}.json" in (REPO / f"recipes/accelerate/zero{stage}.yaml").read_text()
    with pytest.raises(UserError, match="parameter offload needs ZeRO stage 3"):
        deepspeed_config(2, offload_params=True)


def test_finetune_learns_and_keeps_the_mask_bit_for_bit(accelerator, tmp_path):
    model, ids = tiny_llama(), toy_ids()
    masks = magnitude_prune(model)
    before = {n: m.weight.detach().clone() for n, m in masks.modules(model).items()}
    fixed = ids[:4]
    with torch.no_grad():
        loss_before = float(model(input_ids=fixed, labels=fixed).loss)
    result = finetune(model, ids, masks, _cfg(steps=6, checkpoint_every=6), accelerator=accelerator,
                      ckpt_dir=tmp_path)
    with torch.no_grad():
        assert float(model(input_ids=fixed, labels=fixed).loss) < loss_before
    assert result.steps == 6 and len(result.losses) == 6 and result.final_loss == result.losses[-1]
    assert result.tokens_per_s > 0
    masks.verify(model)
    assert _zeros_equal_mask(model, masks)
    assert all(not torch.equal(before[n], m.weight) for n, m in masks.modules(model).items())
    assert _adam_nonzero_at_masks(tmp_path / "step-00000006", model, masks) == 0


@pytest.mark.parametrize("enforcement", ["hooks", "step", "none"])
def test_each_guard_alone_keeps_the_mask_and_without_both_it_drifts(accelerator, tmp_path, enforcement):
    model = tiny_llama()
    masks = magnitude_prune(model)
    finetune(model, toy_ids(), masks, _cfg(mask_enforcement=enforcement, checkpoint_every=4),
             accelerator=accelerator, ckpt_dir=tmp_path)
    moments = _adam_nonzero_at_masks(tmp_path / "step-00000004", model, masks)
    if enforcement == "none":  # the negative control: this is what the guards prevent
        assert moments > 0
        with pytest.raises(UserError, match="pruned weights of .* are non-zero"):
            masks.verify(model)
    else:
        assert moments == 0
        assert _zeros_equal_mask(model, masks)


class _Crash(Exception):
    """Stands in for a killed process."""


def _crash_at_forward(model, n: int):
    """A forward hook that raises on the model's n-th forward call (simulates a killed run)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash("simulated crash")

    return model.register_forward_hook(hook)


def test_interrupted_and_resumed_run_is_bitwise_identical(accelerator, tmp_path):
    cfg = _cfg(steps=5, checkpoint_every=2)
    ids = toy_ids()
    reference = tiny_llama()
    masks = magnitude_prune(reference)
    expected = finetune(reference, ids, masks, cfg, accelerator=accelerator, ckpt_dir=tmp_path / "a")

    crashed = tiny_llama()
    magnitude_prune(crashed)
    handle = _crash_at_forward(crashed, 2 * cfg.grad_accum + 1)  # first forward of step 3, after checkpoint 2
    with pytest.raises(_Crash):
        finetune(crashed, ids, masks, cfg, accelerator=Accelerator(), ckpt_dir=tmp_path / "b")
    handle.remove()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000002"]

    resumed = tiny_llama(seed=5)  # different init: everything must come from the checkpoint
    masks.apply(resumed)
    got = finetune(resumed, ids, masks, cfg, accelerator=Accelerator(), ckpt_dir=tmp_path / "b")
    assert got.losses == expected.losses
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000004", "step-00000005"]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(accelerator, tmp_path):
    model = tiny_llama()
    masks = magnitude_prune(model)
    cfg = _cfg(steps=5, checkpoint_every=2)
    seen = {}

    def poison(module, args, output):  # NaN loss on step 3's first micro-batch
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 2 * cfg.grad_accum + 1:
            seen["digest"] = _tree_digest(tmp_path / "step-00000002")
            seen["weights"] = {k: v.clone() for k, v in module.state_dict().items()}
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="at step 3;") as info:
        finetune(model, toy_ids(), masks, cfg, accelerator=accelerator, ckpt_dir=tmp_path)
    assert info.value.step == 3 and isinstance(info.value, UserError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]
    assert _tree_digest(tmp_path / "step-00000002") == seen["digest"]
    saved = load_file(str(tmp_path / "step-00000002" / "model.safetensors"))
    for name, value in model.state_dict().items():  # step 3 never updated the weights
        assert torch.equal(value, seen["weights"][name]), name
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_bad_inputs_fail_before_step_one(accelerator, make_tiny_model, tmp_path):
    model, ids = tiny_llama(), toy_ids()
    masks = magnitude_prune(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(masks.masks))
    with pytest.raises(UserError, match=f"mask for {name} is \\(3, 3\\)"):
        finetune(model, ids, MaskSet({**masks.masks, name: torch.zeros(3, 3, dtype=torch.bool)}), _cfg(),
                 accelerator=accelerator)
    other = tiny_llama(seed=1)
    magnitude_prune(other)
    with pytest.raises(UserError, match="masked weights are non-zero before training"):
        finetune(other, ids, masks, _cfg(), accelerator=accelerator)
    with pytest.raises(UserError, match="teacher vocab"):
        finetune(model, ids, masks, _cfg(kd=KDConfig(logit_weight=1.0)), accelerator=accelerator,
                 teacher=make_tiny_model("llama"))
    with pytest.raises(UserError, match="need a teacher model"):
        finetune(model, ids, masks, _cfg(kd=KDConfig(logit_weight=1.0)), accelerator=accelerator)
    with pytest.raises(UserError, match="a teacher was given but KD is off"):
        finetune(model, ids, masks, _cfg(kd=KDConfig(ce_weight=1.0)), accelerator=accelerator, teacher=tiny_llama())
    with pytest.raises(UserError, match="needs a checkpoint directory"):
        finetune(model, ids, masks, _cfg(checkpoint_every=2), accelerator=accelerator)
    with pytest.raises(UserError, match="has 3 rows but one optimizer step needs 4"):
        finetune(model, ids[:3], masks, _cfg(), accelerator=accelerator)
    with pytest.raises(UserError, match="token id"):
        finetune(model, ids + 1000, masks, _cfg(), accelerator=accelerator)
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name
    gpt2 = make_tiny_model("gpt2")
    with pytest.raises(UserError, match="not an nn.Linear"):
        finetune(gpt2, ids, magnitude_prune(gpt2), _cfg(lora=LoraSettings(r=4)), accelerator=accelerator)
    for bad, message in [({"steps": 0}, "steps must be > 0"), ({"schedule": "step"}, "schedule 'step' is unknown"),
                         ({"warmup_steps": 9}, "warmup_steps 9 exceeds steps 4"),
                         ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0")]:
        with pytest.raises(UserError, match=message):
            _cfg(**bad)


def test_kd_with_checkpointing_and_lora_keep_the_mask(accelerator):
    ids = toy_ids()
    teacher = tiny_llama()
    model = tiny_llama()
    masks = magnitude_prune(model)
    result = finetune(model, ids, masks, _cfg(steps=2, kd=KDConfig(logit_weight=1.0, hidden_weight=0.5),
                                              gradient_checkpointing=True),
                      accelerator=accelerator, teacher=teacher)
    assert all(math.isfinite(x) for x in result.losses)
    assert _zeros_equal_mask(model, masks)

    lora_model = tiny_llama()
    magnitude_prune(lora_model)
    before = {k: v.clone() for k, v in lora_model.state_dict().items()}
    finetune(lora_model, ids, masks, _cfg(steps=2, lora=LoraSettings(r=4)), accelerator=Accelerator())
    assert set(lora_model.state_dict()) == set(before)  # merged back into a plain model
    assert _zeros_equal_mask(lora_model, masks)
    assert not torch.equal(before[f"{next(iter(masks.masks))}.weight"],
                           lora_model.get_submodule(next(iter(masks.masks))).weight)


def test_save_finetuned_reloads_with_plain_transformers(accelerator, tiny_tokenizer, tmp_path):
    model = tiny_llama()
    masks = magnitude_prune(model)
    save_finetuned(accelerator, model, tiny_tokenizer, masks, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _zeros_equal_mask(reloaded, masks)
    assert MaskSet.load(tmp_path / "out" / "mask.safetensors").masks.keys() == masks.masks.keys()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    with torch.no_grad():
        model.get_submodule(next(iter(masks.masks))).weight.fill_(1.0)
    with pytest.raises(UserError, match="not saving it"):
        save_finetuned(accelerator, model, None, masks, tmp_path / "out")
    assert _zeros_equal_mask(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), masks)  # old one intact


def test_cli_finetune_writes_a_sparse_model_folder(accelerator, tiny_llama_dir, tmp_path, capsys):
    model, tokenizer = load_model(tiny_llama_dir)
    masks = magnitude_prune(model)
    save_model(model, tokenizer, tmp_path / "pruned")  # no mask file: the command takes the exact zeros
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(list(topics.values())[:12]))
    common = ["finetune", "--model", str(tmp_path / "pruned"), "--data", str(text), "--seqlen", "32",
              "--micro-batch", "2", "--lr", "1e-3", "--out", str(tmp_path / "out")]
    assert main([*common, "--steps", "0"]) == 2
    assert "error: finetune steps must be > 0" in capsys.readouterr().err
    assert main([*common, "--steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["sparsity"] == pytest.approx(masks.sparsity())
    healed, _ = load_model(tmp_path / "out")
    assert MaskSet.load(tmp_path / "out" / "mask.safetensors").masks.keys() == masks.masks.keys()
    assert _zeros_equal_mask(healed, masks)
    assert not torch.equal(healed.get_submodule(next(iter(masks.masks))).weight,
                           model.get_submodule(next(iter(masks.masks))).weight)
