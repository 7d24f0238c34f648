"""mixed_precision auto: bf16 where the CPU/GPU multiplies bf16 natively, fp32 elsewhere; resolved once per run.
Half-precision weights train only with float32 masters (DeepSpeed); otherwise refused before anything runs."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from zero_worker import magnitude_prune, tiny_llama, toy_ids

from sparsegpt.cli import main
from sparsegpt.commands import finetune as finetune_command
from sparsegpt.config.recipe import Recipe
from sparsegpt.core import precision
from sparsegpt.core.errors import UserError
from sparsegpt.core.precision import check_master_weights, resolve_mixed_precision
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.finetune import finetune
from sparsegpt.heal.lora import LoraSettings
from sparsegpt.run.configs import with_mixed_precision


@pytest.mark.parametrize("flags", ["avx2 amx_bf16 amx_tile", "avx512f avx512_bf16", "avx2 avx512f", ""])
def test_auto_keeps_fp32_on_every_cpu_and_says_why(cpu_with, flags):
    cpu_with(flags)
    value, why = resolve_mixed_precision("auto", "float32")
    assert value == "no"
    assert ("amx_bf16" in why or "avx512_bf16" in why)
    assert ("not yet shown" in why) == ("bf16" in flags)  # native: fp32 for quality; emulated: fp32 for speed


@pytest.fixture
def cuda_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "H100")


def test_auto_picks_bf16_on_a_gpu_with_bf16(cuda_bf16):
    assert resolve_mixed_precision("auto", "float32") == ("bf16", "CUDA device H100 supports bf16")


def test_auto_follows_half_precision_weights_and_leaves_explicit_values(cpu_with):
    cpu_with("")
    assert resolve_mixed_precision("auto", "bfloat16")[0] == "bf16"
    assert resolve_mixed_precision("auto", "float16")[0] == "fp16"
    cpu_with("amx_bf16")
    assert resolve_mixed_precision("no", "float32")[0] == "no"
    assert resolve_mixed_precision("fp16", "float32")[0] == "fp16"


def test_missing_cpuinfo_means_no_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision.cpu_flags.cache_clear()
    try:
        assert precision.cpu_flags() == frozenset()
        assert resolve_mixed_precision("auto", "float32")[0] == "no"
    finally:
        precision.cpu_flags.cache_clear()


def test_recipe_auto_is_resolved_logged_and_recorded_in_the_run_recipe(cuda_bf16, caplog):
    recipe = Recipe.model_validate({"name": "t", "model": "m", "data": {"calibration": "stdlib-docs"},
                                    "distributed": {"mixed_precision": "auto"},
                                    "defaults": {"finetune": {"steps": 1}}, "stages": [{"name": "a", "target": 0.5}]})
    with caplog.at_level(logging.INFO, logger="sparsegpt.run.configs"):
        resolved = with_mixed_precision(recipe)
    assert resolved.distributed.mixed_precision == "bf16"
    assert "mixed precision auto -> bf16 (CUDA device H100 supports bf16)" in caplog.text
    assert "mixed_precision: bf16" in resolved.to_yaml()  # what the run dir keeps: resuming elsewhere is checked
    assert resolved.fingerprint() != recipe.fingerprint()
    plain = recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"mixed_precision": "no"})})
    assert with_mixed_precision(plain) is plain


@pytest.fixture
def accelerator_state():
    """accelerate's process-wide state is reset after the test (each test builds its own Accelerator)."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("dtypes, stage, mp, refused", [
    ({torch.float32}, -1, "no", False), ({torch.float32}, -1, "bf16", False),
    ({torch.bfloat16}, -1, "bf16", True), ({torch.float16, torch.float32}, -1, "fp16", True),
    ({torch.bfloat16}, 0, "no", True), ({torch.bfloat16}, 0, "bf16", False),
    ({torch.bfloat16}, 2, "bf16", False), ({torch.float16}, 3, "fp16", False)])
def test_half_weights_train_only_where_deepspeed_keeps_float32_masters(dtypes, stage, mp, refused):
    if refused:
        with pytest.raises(UserError, match="no float32 master copy"):
            check_master_weights(dtypes, zero_stage=stage, mixed_precision=mp)
    else:
        check_master_weights(dtypes, zero_stage=stage, mixed_precision=mp)


def test_bf16_finetune_without_deepspeed_is_refused_before_any_step(accelerator_state):
    model = tiny_llama().to(torch.bfloat16)
    masks = magnitude_prune(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(steps=2, lr=1e-3, micro_batch_size=2)
    with pytest.raises(UserError, match="bfloat16 trainable weights with no DeepSpeed"):
        finetune(model, toy_ids(), masks, cfg, accelerator=Accelerator(mixed_precision="bf16"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # LoRA on bf16 base weights trains: peft keeps the adapters, the only trainable weights, in float32
    result = finetune(model, toy_ids(), masks, dataclasses.replace(cfg, lora=LoraSettings(r=2)),
                      accelerator=Accelerator())
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)


def test_cli_refuses_bf16_weights_without_deepspeed_before_loading(accelerator_state, tiny_llama_dir, tmp_path,
                                                                   capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the dtype was checked")

    monkeypatch.setattr(finetune_command, "load_for_training", no_loading)
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(tiny_llama_dir), "--data", "stdlib-docs", "--steps", "1",
                 "--dtype", "bfloat16", "--out", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "error: bfloat16 trainable weights with no DeepSpeed" in err and "--dtype float32" in err
