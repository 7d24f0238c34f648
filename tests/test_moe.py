"""Mixture-of-experts pruning on tiny offline configs (transformers 5.x fused experts): every expert's matrices get
their own Hessian from the tokens routed to it (checked against a float64 hand computation), under-calibrated
experts get the documented pooled top-up, routers and shared experts are left dense unless asked, the per-expert
stats reach sparsity.json, a single-process fine-tune saved with `save_finetuned` reloads in plain transformers
with the expert masks exact, LoRA leaves fused experts alone, and a 2-process ZeRO-3 fine-tune (router aux loss
included) keeps the expert masks exact in the fp32 master weights and Adam moments (tests/moe_zero_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
import transformers as T
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from test_families import BATCH, MOE_KINDS, calib, one_thread, tiny_model  # noqa: F401 (autouse fixture)
from test_sequential import spy_hessians
from transformers.activations import ACT2FN

from sparsegpt import cli
from sparsegpt.core.architectures import ExpertLinear, decoder_layers, prunable_linears, weight_as_linear
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.evaluate.runners import sparsity_report
from sparsegpt.heal.checkpoint import save_finetuned
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.enforce import MaskEnforcer
from sparsegpt.heal.finetune import finetune
from sparsegpt.heal.lora import _target_names
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.storage.models import save_model

REPO = Path(__file__).resolve().parents[1]


def routed_by_hand(model, ids, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's router input x (float64) and the top-k experts the model chose, from the dense forward;
    `check`: they are the top-k logits recomputed in float64."""
    router = decoder_layers(model)[0].mlp.gate
    xs, picks = [], []

    def record(module, args, out):
        xs.append(args[0].reshape(-1, args[0].shape[-1]))
        picks.append(out[2])

    handle = router.register_forward_hook(record)
    with torch.no_grad():
        for batch in ids.split(BATCH):
            model(batch)
    handle.remove()
    x, top_k = torch.cat(xs).double(), torch.cat(picks)
    logits = x @ router.weight.double().t()  # softmax is monotone: top-k of the logits is the router's choice
    assert not check or torch.equal(logits.topk(top_k.shape[1], dim=-1).indices.sort(-1).values, top_k.sort(-1).values)
    return x, top_k


def expert_inputs_by_hand(model, x, top_k, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s gate_up input (its routed tokens) and down_proj input act(gate) * up, in float64."""
    experts = decoder_layers(model)[0].mlp.experts
    routed = x[(top_k == expert).any(-1)]
    gate, up = (routed @ experts.gate_up_proj[expert].double().t()).chunk(2, dim=-1)
    return routed, ACT2FN[model.config.hidden_act](gate) * up


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / len(x) * x.t() @ x


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_each_expert_gets_the_hessian_of_its_routed_tokens(kind, monkeypatch):
    model, ids = tiny_model(kind), calib()
    x, top_k = routed_by_hand(model, ids)
    inputs = {e: expert_inputs_by_hand(model, x, top_k, e) for e in range(4)}  # from the dense weights
    used = spy_hessians(monkeypatch)
    result = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH, min_expert_tokens=0))
    by_name = {s["name"]: (s, h) for s, h in zip(result.stats, used)}
    prefix = "model.layers.0.mlp.experts"
    counts = [int((top_k == e).any(-1).sum()) for e in range(4)]
    assert sum(counts) == top_k.numel()  # every token went to k distinct experts
    for e in range(4):
        routed, inner = inputs[e]
        for param, seen in (("gate_up_proj", routed), ("down_proj", inner)):
            stats, used_h = by_name[f"{prefix}.{param}.{e}"]
            assert stats["tokens"] == counts[e] and stats["expert"] == e and stats["pooled_weight"] == 0.0
            expected = hessian(seen)
            torch.testing.assert_close(used_h.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    attention = by_name["model.layers.0.self_attn.q_proj"][0]
    assert attention["tokens"] == len(x) and attention["expert"] is None


def test_an_expert_without_tokens_gets_the_pooled_hessian(monkeypatch, caplog):
    """The rule: N < m routed tokens (m = input width by default) -> H = 2/m (Σ_own xxᵀ + (m − N) S_pool / N_pool).
    Layer 0's router is made to never pick expert 3, which then is pruned on the pooled Hessian (not zeroed)."""
    model, ids = tiny_model("mixtral"), calib()

    def never_expert_3(module, args, out):
        logits, scores, top_k = out
        other = top_k.flip(-1)  # k = 2: the token's other expert
        return logits, scores, torch.where(top_k == 3, torch.where(other == 0, 1, 0), top_k)

    decoder_layers(model)[0].mlp.gate.register_forward_hook(never_expert_3)
    x, top_k = routed_by_hand(model, ids, check=False)
    assert not (top_k == 3).any()
    inputs = {e: expert_inputs_by_hand(model, x, top_k, e) for e in range(4)}
    used = spy_hessians(monkeypatch)
    result = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH))
    by_name = {s["name"]: (s, h) for s, h in zip(result.stats, used)}
    for k, param in enumerate(("gate_up_proj", "down_proj")):
        pooled_sum = sum(inputs[e][k].t() @ inputs[e][k] for e in range(4))
        pooled_n = sum(len(inputs[e][k]) for e in range(4))
        for e in range(4):
            own = inputs[e][k]
            need = own.shape[1]  # the default: the matrix's input width
            if len(own) >= need:
                expected, weight = hessian(own), 0.0
            else:
                expected = 2 / need * (own.t() @ own + (need - len(own)) * pooled_sum / pooled_n)
                weight = (need - len(own)) / need
            stats, used_h = by_name[f"model.layers.0.mlp.experts.{param}.{e}"]
            assert stats["tokens"] == len(own) and stats["pooled_weight"] == pytest.approx(weight)
            torch.testing.assert_close(used_h.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    starved = by_name["model.layers.0.mlp.experts.down_proj.3"][0]
    assert starved["tokens"] == 0 and starved["pooled_weight"] == 1.0
    for param in ("gate_up_proj", "down_proj"):  # a zero Hessian would have zeroed it (all columns dead)
        assert result.masks.masks[f"model.layers.0.mlp.experts.{param}.3"].float().mean().item() == 0.5
    assert "topped up with the layer's pooled Hessian" in caplog.text and "down_proj.3 (0 tokens)" in caplog.text
    with pytest.raises(UserError, match="min_expert_tokens must be >= 0"):
        prune_model(model, ids, PruneConfig(min_expert_tokens=-1))


def test_routers_and_shared_experts_stay_dense_unless_asked():
    model, ids = tiny_model("qwen2_moe"), calib()
    layer = decoder_layers(model)[0].mlp
    dense = {"gate": layer.gate.weight.clone(), "shared": layer.shared_expert.down_proj.weight.clone(),
             "shared_gate": layer.shared_expert_gate.weight.clone()}
    default = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH))
    assert not any(".mlp.gate" in n and "gate_up" not in n or "shared_expert" in n for n in default.masks.masks)
    assert torch.equal(layer.gate.weight, dense["gate"]) and torch.equal(layer.shared_expert_gate.weight,
                                                                           dense["shared_gate"])
    assert torch.equal(layer.shared_expert.down_proj.weight, dense["shared"])

    model = tiny_model("qwen2_moe")
    everything = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH, prune_router=True,
                                                     prune_shared_experts=True))
    extra = {f"model.layers.{i}.mlp.{n}" for i in range(2)
             for n in ("gate", "shared_expert_gate", "shared_expert.gate_proj", "shared_expert.up_proj",
                       "shared_expert.down_proj")}
    assert set(everything.masks.masks) == set(default.masks.masks) | extra
    assert all(everything.masks.masks[n].float().mean().item() == 0.5 for n in extra)
    rebuilt = MaskSet.from_model(model, routers=True, shared_experts=True)
    assert rebuilt.masks.keys() == everything.masks.masks.keys()
    assert all(torch.equal(rebuilt.masks[n], m) for n, m in everything.masks.masks.items())
    assert set(prunable_linears(model, routers=True, shared_experts=True)) == set(everything.masks.masks)


def test_owl_and_later_stages_work_on_experts():
    """OWL's outlier pass pools the experts' diagonal Hessians like any linear's; a second stage keeps every
    expert weight the first pruned."""
    model, ids = tiny_model("mixtral"), calib()
    first = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH, allocation="owl", owl_m=2.0,
                                                owl_lambda=0.1))
    assert sorted({(s["layer"], round(s["target"], 6)) for s in first.stats}) == [(0, 0.6), (1, 0.4)]
    second = prune_model(model, ids, PruneConfig(method="wanda", sparsity=0.75, batch_size=BATCH),
                         base_masks=first.masks)
    for name, mask in second.masks.masks.items():
        assert (mask | ~first.masks.masks[name]).all(), f"{name} revived a pruned weight"
    assert second.masks.sparsity() == pytest.approx(0.75, abs=1e-3)


def test_expert_masks_save_load_apply_verify(tmp_path):
    model, ids = tiny_model("olmoe"), calib()
    masks = prune_model(model, ids, PruneConfig(prune_n=2, prune_m=4, batch_size=BATCH)).masks
    masks.save(tmp_path / "mask.safetensors")
    loaded = MaskSet.load(tmp_path / "mask.safetensors")
    assert all(torch.equal(loaded.masks[n], m) for n, m in masks.masks.items())
    fresh = tiny_model("olmoe", seed=1)
    loaded.apply(fresh)
    assert loaded.verify(fresh) == pytest.approx(loaded.per_module())
    name = "model.layers.1.mlp.experts.down_proj.2"
    expert = loaded.modules(fresh)[name]
    assert isinstance(expert, ExpertLinear) and expert.index == 2
    fused, stacked = loaded.param_masks(fresh)["model.layers.1.mlp.experts.down_proj"]
    assert fused is fresh.model.layers[1].mlp.experts.down_proj and stacked.shape == fused.shape
    assert torch.equal(stacked[2], loaded.masks[name]) and torch.equal(fused.detach() == 0, stacked)
    row, col = loaded.masks[name].nonzero()[0].tolist()
    with torch.no_grad():
        weight_as_linear(expert)[row, col] = 1.0  # revive one pruned entry of one expert's slice
    with pytest.raises(UserError, match=f"^1 pruned weights of {name} are non-zero"):
        loaded.verify(fresh)


def test_finetune_then_save_finetuned_reloads_with_expert_masks_exact(tmp_path):
    model, ids = tiny_model("mixtral"), calib()
    masks = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH)).masks
    enforcer = MaskEnforcer(model, masks, torch.optim.AdamW(model.parameters()))
    assert len(enforcer.slots) == len(masks.param_masks(model)) < len(masks.masks)  # one slot per fused parameter
    accelerator = Accelerator()
    try:
        finetune(model, ids, masks, FinetuneConfig(steps=2, lr=1e-3, micro_batch_size=2, seed=0),
                 accelerator=accelerator)
        save_finetuned(accelerator, model, None, masks, tmp_path / "model")
        with torch.no_grad():  # a revived expert weight is refused, named by its fused parameter
            weight_as_linear(masks.modules(model)["model.layers.1.mlp.experts.down_proj.2"]).add_(1.0)
        with pytest.raises(UserError, match="^[0-9]+ pruned weights of model.layers.1.mlp.experts.down_proj are "
                                            "non-zero in the trained model"):
            save_finetuned(accelerator, model, None, masks, tmp_path / "revived")
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # plain transformers
    saved = MaskSet.load(tmp_path / "model" / "mask.safetensors")
    assert saved.masks.keys() == masks.masks.keys() and any(".experts." in n for n in saved.masks)
    for name, module in saved.modules(reloaded).items():
        assert torch.equal(weight_as_linear(module) == 0, masks.masks[name]), name  # bit for bit
    assert not (tmp_path / "revived").exists()


def test_lora_without_targets_skips_fused_experts(caplog):
    model = tiny_model("mixtral")
    with caplog.at_level("WARNING", logger="sparsegpt.heal.lora"):
        names = _target_names(model, None)
    assert names and not any(".experts." in n for n in names)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert "LoRA skips the 16 fused expert matrices (LoRA on fused 3-D MoE experts is not supported)" in caplog.text


def _launch_zero3(out: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes of tests/moe_zero_worker.py under recipes/accelerate/zero3.yaml."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout's sparsegpt
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
           "tests/moe_zero_worker.py", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_zero3_finetune_keeps_fused_expert_masks_exact(tmp_path):
    proc = _launch_zero3(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and {r["stage"] for r in ranks} == {3}
    for runs in zip(*(r["runs"] for r in ranks)):
        assert runs[0]["losses"] == runs[1]["losses"]
        run = runs[0]
        assert run["partitioned_expert_params"] == 4  # 2 layers x (gate_up_proj, down_proj), really sharded
        sizes = run["mask_sizes"]  # this rank's half of the packed bits (+ a byte of rounding per parameter)
        assert max(run["held_bytes"]) <= sizes["full_bits"] / 2 + sizes["params"]
        assert all(v > 0 for v in run["kept_nonzero"].values())
        if run["enforcement"] == "none":  # negative control: unguarded, pruned expert weights revive
            assert run["masked_nonzero"]["fp32"] > 0 and run["masked_nonzero"]["exp_avg"] > 0
            continue
        assert run["masked_nonzero"] == {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0}
        assert run["aux_loss"] > 0  # the router's load-balancing loss is in the training loss
        assert run["loss"] == pytest.approx(run["ce"] + run["aux_coef"] * run["aux_loss"], rel=1e-5)
        assert run["fixed_after"] < run["fixed_before"]
    masks = MaskSet.load(tmp_path / "model" / "mask.safetensors")
    assert any(".experts.gate_up_proj." in n for n in masks.masks)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # plain transformers
    masks.verify(reloaded)
    assert all(torch.equal(weight_as_linear(m) == 0, masks.masks[n]) for n, m in masks.modules(reloaded).items())


def test_cli_sparsity_json_carries_the_expert_stats(tiny_tokenizer, tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    save_model(model, tiny_tokenizer, tmp_path / "dense")
    (tmp_path / "calib.txt").write_text("\n\n".join(list(topics.values())[:8]))  # small: quick to tokenize
    monkeypatch.setattr(cli, "COMMANDS", {"prune": "one-shot prune"})
    out = tmp_path / "pruned"
    code = cli.main(["prune", "--model", str(tmp_path / "dense"), "--calib", str(tmp_path / "calib.txt"),
                     "--nsamples", "4",
                     "--seqlen", "16", "--batch-size", "2", "--blocksize", "16", "--device", "cpu", "--sparsity", "0.5",
                     "--min-expert-tokens", "1000", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "sparsity.json").read_text())
    assert report["min_expert_tokens"] == 1000 and report["prune_router"] is False
    experts = [s for s in report["stats"] if s["expert"] is not None]
    assert len(experts) == 2 * 2 * 4 and sum(s["tokens"] for s in experts if "gate_up" in s["name"]) == 2 * 4 * 16 * 2
    assert all(0 < s["pooled_weight"] < 1 for s in experts)  # 64 tokens < 1000: every expert topped up
    assert all(s["expert"] is None and s["pooled_weight"] == 0 for s in report["stats"] if "self_attn" in s["name"])
    masks = MaskSet.load(out / "mask.safetensors")
    masks.verify(T.AutoModelForCausalLM.from_pretrained(out))
    assert set(masks.masks) == {s["name"] for s in report["stats"]}


def test_sparsity_report_counts_expert_masks():
    """The sparsity hook on a pruned MoE model: expert matrices are reported from their masks, per expert."""
    model = tiny_model("mixtral")
    masks = prune_model(model, calib(), PruneConfig(sparsity=0.5, blocksize=16)).masks
    report = sparsity_report(model, masks)
    experts = [name for name in report["linears"] if ".experts." in name]
    assert experts and report["overall"] == pytest.approx(masks.sparsity())
    assert all(report["linears"][name]["sparsity"] == pytest.approx(0.5, abs=0.02) for name in experts)
