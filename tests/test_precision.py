"""mixed_precision auto: bf16 where the CPU/GPU multiplies bf16 natively, fp32 elsewhere; resolved once per run."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsegpt.config.recipe import Recipe
from sparsegpt.core import precision
from sparsegpt.core.precision import resolve_mixed_precision
from sparsegpt.run.configs import with_mixed_precision


@pytest.fixture
def cpu_with(monkeypatch, tmp_path):
    def make(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(precision, "CPUINFO", info)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        precision.cpu_flags.cache_clear()
    yield make
    precision.cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, expected", [("avx2 amx_bf16 amx_tile", "bf16"), ("avx512f avx512_bf16", "bf16"),
                                             ("avx2 avx512f", "no"), ("", "no")])
def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(cpu_with, flags, expected):
    cpu_with(flags)
    value, why = resolve_mixed_precision("auto", "float32")
    assert value == expected
    assert ("amx_bf16" in why or "avx512_bf16" in why)


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


def test_recipe_auto_is_resolved_logged_and_recorded_in_the_run_recipe(cpu_with, caplog):
    cpu_with("amx_bf16")
    recipe = Recipe.model_validate({"name": "t", "model": "m", "data": {"calibration": "stdlib-docs"},
                                    "distributed": {"mixed_precision": "auto"},
                                    "defaults": {"finetune": {"steps": 1}}, "stages": [{"name": "a", "target": 0.5}]})
    with caplog.at_level(logging.INFO, logger="sparsegpt.run.configs"):
        resolved = with_mixed_precision(recipe)
    assert resolved.distributed.mixed_precision == "bf16"
    assert "mixed precision auto -> bf16 (CPU has amx_bf16)" in caplog.text
    assert "mixed_precision: bf16" in resolved.to_yaml()  # what the run dir keeps: resuming elsewhere is checked
    assert resolved.fingerprint() != recipe.fingerprint()
    plain = recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"mixed_precision": "no"})})
    assert with_mixed_precision(plain) is plain
