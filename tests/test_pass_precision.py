"""The pruning pass's layer forwards: `forward_dtype` (float32 / bfloat16 autocast / auto = bfloat16 where the device
multiplies it natively) and the calibration forward that stops at the layer's last Hessian hook."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sparsegpt.cli import main
from sparsegpt.config.recipe import to_dataclass
from sparsegpt.config.settings import PruneSettings
from sparsegpt.core.architectures import prunable_linears, weight_as_linear
from sparsegpt.core.errors import UserError
from sparsegpt.core.precision import resolve_forward_dtype
from sparsegpt.prune.sequential import PruneConfig, prune_model


@pytest.mark.parametrize("flags, expected", [("avx2 amx_bf16", torch.bfloat16), ("avx512f avx512_bf16", torch.bfloat16),
                                             ("avx2 avx512f", None), ("", None)])
def test_auto_autocasts_where_bf16_is_native_and_says_why(cpu_with, flags, expected):
    cpu_with(flags)
    dtype, why = resolve_forward_dtype("auto", torch.float32)
    assert dtype is expected
    assert ("amx_bf16" in why or "avx512_bf16" in why)


def test_explicit_values_and_half_weights(cpu_with):
    cpu_with("avx2")  # emulated bf16: an explicit bfloat16 is still honoured (slow, not wrong)
    assert resolve_forward_dtype("bfloat16", torch.float32) == (torch.bfloat16, "set in the config")
    assert resolve_forward_dtype("float32", torch.float32) == (None, "set in the config")
    dtype, why = resolve_forward_dtype("auto", torch.bfloat16)
    assert dtype is None and "bfloat16" in why  # half weights already run in their dtype
    with pytest.raises(UserError, match="forward_dtype 'fp8' is unknown; choose one of"):
        resolve_forward_dtype("fp8", torch.float32)
    with pytest.raises(UserError, match="forward_dtype 'bf16' is unknown"):
        PruneConfig(forward_dtype="bf16").validate()


def _ids(rows=8, seqlen=32):
    return torch.randint(0, 512, (rows, seqlen), generator=torch.Generator().manual_seed(0))


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: weight_as_linear(m).clone() for n, m in prunable_linears(model).items()}


def _watch(model, kind: str):
    """Per module name, the dtype of each input it received (pre-hooks) or a count of completed calls (hooks)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "layers." in name:
            if kind == "dtype":
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, name=name: seen.setdefault(name, set()).add(a[0].dtype)))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, name=name: seen.__setitem__(name, seen.get(name, 0) + 1)))
    return seen, handles


def test_bfloat16_forwards_autocast_the_matmuls_and_keep_float32_weights_and_hidden_states(make_tiny_model, caplog):
    reference = make_tiny_model("llama")
    prune_model(reference, _ids(), PruneConfig(sparsity=0.5, batch_size=4, blocksize=16))
    model = make_tiny_model("llama")
    seen, handles = _watch(model, "dtype")
    with caplog.at_level(logging.INFO, logger="sparsegpt.prune.sequential"):
        result = prune_model(model, _ids(), PruneConfig(sparsity=0.5, batch_size=4, blocksize=16,
                                                        forward_dtype="bfloat16"))
    for h in handles:
        h.remove()
    assert "layer forwards in bfloat16 (forward_dtype bfloat16: set in the config)" in caplog.text
    assert result.world["ranks"][0]["forward_dtype"] == "bfloat16"
    # o_proj and down_proj read outputs of autocast matmuls; the norms before q/k/v and gate/up stay float32
    assert seen["model.layers.0.self_attn.o_proj"] == {torch.bfloat16}
    assert seen["model.layers.0.mlp.down_proj"] == {torch.bfloat16}
    assert seen["model.layers.1.self_attn.q_proj"] == {torch.float32}  # layer 1's input: stored in float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.masks.sparsity() == pytest.approx(0.5)
    ours, theirs = _weights(model), _weights(reference)
    same = sum(((a == 0) == (b == 0)).sum().item() for a, b in zip(ours.values(), theirs.values()))
    total = sum(a.numel() for a in ours.values())
    assert 0.9 < same / total < 1.0  # the same masks up to near-ties: bf16 rounding moves some choices


def test_the_calibration_forward_stops_at_the_last_hook_and_changes_nothing(make_tiny_model):
    whole = make_tiny_model("llama")  # one batch: the forward runs to the end (nothing seen yet to stop at)
    prune_model(whole, _ids(), PruneConfig(sparsity=0.5, batch_size=8, blocksize=16))
    model = make_tiny_model("llama")
    calls, handles = _watch(model, "calls")
    prune_model(model, _ids(), PruneConfig(sparsity=0.5, batch_size=2, blocksize=16))
    for h in handles:
        h.remove()
    # 4 batches: down_proj (the last hook's linear) multiplies in the first calibration batch only, then in
    # every propagation batch (none after the last layer); the linears before it in all 4 calibration batches
    assert calls["model.layers.0.mlp.down_proj"] == 1 + 4 and calls["model.layers.1.mlp.down_proj"] == 1
    assert calls["model.layers.0.mlp.up_proj"] == 4 + 4 and calls["model.layers.1.mlp.up_proj"] == 4
    ours, reference = _weights(model), _weights(whole)
    assert all(torch.equal(ours[n], reference[n]) for n in reference)


def test_the_forward_runs_to_the_end_where_its_outputs_are_needed(make_tiny_model):
    model = make_tiny_model("llama")
    calls, handles = _watch(model, "calls")
    prune_model(model, _ids(), PruneConfig(sparsity=0.5, batch_size=2, blocksize=16, allocation="owl"))
    for h in handles:
        h.remove()
    # OWL's statistics pass keeps each layer's outputs (the next layer's inputs): down_proj runs in all 4 batches
    assert calls["model.layers.0.mlp.down_proj"] == 4 + 1 + 4


def test_recipe_and_cli_carry_forward_dtype(tmp_path, tiny_llama_dir, monkeypatch):
    assert to_dataclass(PruneConfig, PruneSettings(forward_dtype="auto")).forward_dtype == "auto"
    with pytest.raises(ValidationError, match="forward_dtype"):
        PruneSettings(forward_dtype="bf16")
    monkeypatch.setenv("SPARSEGPT_NO_PROGRESS", "1")
    with pytest.raises(SystemExit) as bad:
        main(["prune", "--model", str(tiny_llama_dir), "--forward-dtype", "fp16", "--out", str(tmp_path / "x")])
    assert bad.value.code == 2 and not (tmp_path / "x").exists()


def test_hessian_products_stay_float32_inside_autocast_forwards():
    """The Hessian hooks run inside the autocast layer forward: its matmuls must not turn into bf16 products
    (rounded to 8 bits of mantissa, they left H indefinite enough to need 4-8 % damping)."""
    from sparsegpt.prune.solver import add_gram_

    x = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))
    outside = add_gram_(torch.zeros(96, 96, dtype=torch.float64), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = add_gram_(torch.zeros(96, 96, dtype=torch.float64), x)
    assert torch.equal(inside, outside)


def test_bfloat16_hessian_products_are_opt_in_and_rounded():
    from sparsegpt.prune.solver import add_gram_

    x = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))
    exact = x.double().reshape(-1, 96).T @ x.double().reshape(-1, 96)
    fp32 = add_gram_(torch.zeros(96, 96, dtype=torch.float64), x)
    bf16 = add_gram_(torch.zeros(96, 96, dtype=torch.float64), x, dtype=torch.bfloat16)
    scale = exact.abs().max()
    assert (fp32 - exact).abs().max() / scale < 1e-6  # float32 products: rounding of a 64-term sum
    assert 1e-4 < (bf16 - exact).abs().max() / scale < 2e-2  # inputs and each sequence's product rounded to bf16
    assert torch.equal(bf16, bf16.T)
    with pytest.raises(UserError, match="hessian_dtype 'float16' is unknown; choose one of"):
        PruneConfig(hessian_dtype="float16").validate()
    assert to_dataclass(PruneConfig, PruneSettings(hessian_dtype="bfloat16")).hessian_dtype == "bfloat16"
