"""Evaluation: perplexity against transformers' own loss and a float64 reference, the sparsity report against
hand-built masks, hooks (custom failing, lm-eval on a local offline task), metrics.jsonl, tables."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsegpt.config.hooks import HOOKS, HookContext, runner, validate_hooks
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.evaluate.runners import generate_samples, lm_eval_tasks, perplexity, run_hooks, sparsity_report
from sparsegpt.run.compare import flatten_for_trackers, format_stage_table
from sparsegpt.run.rundir import append_metrics, read_metrics

torch.set_num_threads(1)
TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <eos>) built offline."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def windows(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 257, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# -- perplexity -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_equals_transformers_loss(model, batch_size):
    ids = windows(5, 17)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.double() for w in ids]
    expected = math.exp(torch.stack(losses).mean().item())  # equal-length windows: mean of means = mean
    assert perplexity(model, ids, batch_size=batch_size) == pytest.approx(expected, rel=1e-6)


def test_perplexity_matches_float64_reference():
    model = tiny_llama(seed=3).double()
    ids = windows(3, 9, seed=4)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).sum() / (3 * 8)
    assert perplexity(model, ids, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-6)


def test_perplexity_restores_training_mode_and_rejects_bad_input(model):
    model.train()
    perplexity(model, windows(1, 4))
    assert model.training
    model.eval()
    with pytest.raises(UserError, match="seqlen >= 2"):
        perplexity(model, windows(2, 1))
    with pytest.raises(UserError, match="batch_size"):
        perplexity(model, windows(2, 4), batch_size=0)


def test_layerwise_perplexity_equals_whole_model(model):
    ids = windows(5, 16)
    whole = perplexity(model, ids, batch_size=2)
    assert perplexity(model, ids, batch_size=2, layerwise=True, device="cpu") == pytest.approx(whole, rel=1e-5)


# -- sparsity report ------------------------------------------------------------------------------------------

def prune_by_hand(model):
    """2:4 on every q_proj (first two of each four columns), 4:8 on layer 1's down_proj (first four of each eight)."""
    masks = {}
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            mask = torch.zeros_like(module.weight, dtype=torch.bool)
            mask[:, 0::4] = mask[:, 1::4] = True
        elif name == "model.layers.1.mlp.down_proj":
            mask = torch.zeros_like(module.weight, dtype=torch.bool)
            mask[:, torch.arange(module.weight.shape[1]) % 8 < 4] = True
        else:
            continue
        with torch.no_grad():
            module.weight[mask] = 0
        masks[name] = mask
    return masks


def test_sparsity_report_matches_hand_built_masks():
    model = tiny_llama()
    masks = prune_by_hand(model)
    report = sparsity_report(model)
    assert report["source"] == "weights"
    q = report["linears"]["model.layers.0.self_attn.q_proj"]
    assert q["sparsity"] == 0.5 and q["2:4"] == 1.0 and q["4:8"] == 1.0
    down = report["linears"]["model.layers.1.mlp.down_proj"]
    assert down["sparsity"] == 0.5 and down["2:4"] == 0.5 and down["4:8"] == 1.0
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    pruned = sum(int(m.sum()) for m in masks.values())
    assert report["prunable"] == total and report["overall"] == pruned / total
    layer1 = [m for n, m in model.named_modules() if n.startswith("model.layers.1.") and isinstance(m, torch.nn.Linear)]
    layer1_pruned = sum(int(m.sum()) for n, m in masks.items() if n.startswith("model.layers.1."))
    assert report["layers"]["1"] == layer1_pruned / sum(m.weight.numel() for m in layer1)
    assert report["params_total"] == sum(p.numel() for p in model.parameters())
    assert report["params_total"] - report["params_nonzero"] == pruned
    groups_24 = sum(m.weight.numel() // 4 for m in linears)
    down_w = model.model.layers[1].mlp.down_proj.weight
    ok_24 = sum(m.numel() // 4 for n, m in masks.items() if n.endswith("q_proj")) + down_w.numel() // 8
    assert report["2:4"] == ok_24 / groups_24

    mask_set = MaskSet(masks)
    with_masks = sparsity_report(model, mask_set)
    assert with_masks["source"] == "masks" and with_masks["overall"] == mask_set.sparsity()
    assert {n: e["sparsity"] for n, e in with_masks["linears"].items()} == mask_set.per_module()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1.0
    with pytest.raises(UserError, match="q_proj"):
        sparsity_report(model, MaskSet(masks))


# -- hooks ----------------------------------------------------------------------------------------------------

def install_hook_module(monkeypatch) -> str:
    """A custom-hook module (one good, one failing hook) importable as `_eval_hooks_for_tests`."""
    module = types.ModuleType("_eval_hooks_for_tests")

    def n_params(model, tokenizer, *, context, scale=1.0):
        return {"count": scale * sum(p.numel() for p in model.parameters()), "phase": context.phase}

    def broken(model, tokenizer, *, context):
        raise RuntimeError("boom")

    module.n_params, module.broken = n_params, broken
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_run_hooks_records_failing_custom_hook_without_raising(model, tokenizer, monkeypatch):
    mod = install_hook_module(monkeypatch)
    hooks = [{"type": "custom", "path": f"{mod}:broken"},
             {"type": "custom", "path": f"{mod}:n_params", "name": "size", "args": {"scale": 2.0}},
             {"type": "sparsity"},
             {"type": "samples", "prompts": ["Hi"], "max_new_tokens": 3}]
    ctx = HookContext(stage=1, name="s1", phase="pruned", target=0.5, device="cpu")
    metrics, errors = run_hooks(model, tokenizer, hooks, ctx)
    assert errors == {"broken": "RuntimeError: boom"}
    assert metrics["size/count"] == 2.0 * sum(p.numel() for p in model.parameters())
    assert metrics["size/phase"] == "pruned"
    assert metrics["sparsity/overall"] == 0.0 and metrics["sparsity/params_nonzero"] == metrics["sparsity/params_total"]
    assert metrics["samples"][0]["prompt"] == "Hi" and isinstance(metrics["samples"][0]["completion"], str)
    with pytest.raises(RuntimeError, match="boom"):
        run_hooks(model, tokenizer, hooks[:1], ctx, fail_fast=True)


def test_generate_samples_is_greedy(model, tokenizer):
    out = generate_samples(model, tokenizer, ["ab"], max_new_tokens=4)
    ids = tokenizer("ab", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert out == [{"prompt": "ab", "completion": tokenizer.decode(ids[0, 2:], skip_special_tokens=True)}]


def test_perplexity_hook_uses_eval_windows(model, tokenizer):
    from sparsegpt.core.data import eval_ids

    hook = {"type": "perplexity", "source": "stdlib-docs", "seqlen": 32, "max_windows": 3, "batch_size": 2}
    metrics, errors = run_hooks(model, tokenizer, [hook], HookContext(device="cpu"))
    expected = perplexity(model, eval_ids("stdlib-docs", tokenizer, seqlen=32, max_windows=3))
    assert errors == {} and metrics == {"ppl/stdlib-docs": pytest.approx(expected, rel=1e-12)}


def test_perplexity_hooks_on_two_splits_of_one_source_keep_both(model, tokenizer):
    """A tune-split hook beside the test-split one (how a run reports what it was tuned on) gets its own key."""
    from sparsegpt.core.data import eval_ids

    hooks = [{"type": "perplexity", "source": "stdlib-docs", "seqlen": 32, "max_windows": 2, "split": s}
             for s in ("test", "tune")]
    validate_hooks(hooks)
    metrics, errors = run_hooks(model, tokenizer, hooks, HookContext(device="cpu"))
    tune = perplexity(model, eval_ids("stdlib-docs", tokenizer, seqlen=32, split="tune", max_windows=2))
    assert errors == {} and set(metrics) == {"ppl/stdlib-docs", "ppl/stdlib-docs@tune"}
    assert metrics["ppl/stdlib-docs@tune"] == pytest.approx(tune, rel=1e-12)
    assert metrics["ppl/stdlib-docs@tune"] != pytest.approx(metrics["ppl/stdlib-docs"], rel=1e-6)


@pytest.mark.parametrize("hooks, match", [
    ([{"type": "bleu"}], "type 'bleu' is unknown"),
    ([{"type": "perplexity"}], "required \\['source'\\]"),
    ([{"type": "sparsity", "extra": 1}], "keys \\['extra'\\] are wrong"),
    ([{"type": "custom", "path": "no_colon"}], "package.module:function"),
    ([{"type": "custom", "path": "sparsegpt_no_such_module_x:f"}], "cannot import module"),
    ([{"type": "custom", "path": "json:no_such_fn"}], "has no attribute"),
    ([{"type": "lm_eval", "tasks": []}], "non-empty list of strings"),
    ([{"type": "sparsity"}, {"type": "sparsity"}], "second hook named 'sparsity'"),
])
def test_validate_hooks_rejects(hooks, match):
    with pytest.raises(UserError, match=match):
        validate_hooks(hooks)


def test_validate_hooks_accepts_all_types():
    validate_hooks([{"type": "perplexity", "source": "stdlib-docs", "seqlen": 64, "layerwise": True},
                    {"type": "lm_eval", "tasks": ["sparsegpt_tiny_mc"], "include_path": str(TASKS_DIR)},
                    {"type": "sparsity"}, {"type": "samples", "prompts": ["a"]},
                    {"type": "custom", "path": "json:dumps", "name": "j"}])


def choice_accuracy(model, tokenizer, docs) -> float:
    """Reference for the tiny task: argmax over choices of the summed log-probability of the choice's tokens."""
    correct = 0
    for doc in docs:
        ctx = tokenizer(f"Question: {doc['question']}\nAnswer:")["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tokenizer(choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(docs)


def test_lm_eval_hook_runs_local_task_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama(seed=0, init=0.5)  # peaked enough that the choices' scores differ (accuracy 0.4)
    docs = [json.loads(line) for line in (TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    hook = {"type": "lm_eval", "tasks": ["sparsegpt_tiny_mc"], "include_path": str(TASKS_DIR), "limit": 5}
    metrics, errors = run_hooks(model, tokenizer, [hook], HookContext(device="cpu"), fail_fast=True)
    assert errors == {}
    assert metrics["lm_eval/sparsegpt_tiny_mc/acc"] == pytest.approx(choice_accuracy(model, tokenizer, docs))
    with pytest.raises(UserError, match="unknown lm-eval task.*no_such_task_xyz.*include_path"):
        lm_eval_tasks(model, tokenizer, ["no_such_task_xyz"], include_path=str(TASKS_DIR))


# -- metrics.jsonl and tables ---------------------------------------------------------------------------------

def record(stage, phase, ppl, **extra):
    return {"stage": stage, "name": f"s{stage}", "phase": phase, "target": 0.5 + 0.2 * stage,
            "sparsity": 0.5 + 0.2 * stage, "metrics": {"ppl/stdlib-docs": ppl, "samples": []}, "seconds": 10.0,
            **extra}


def test_metrics_roundtrip_table_and_trackers(tmp_path):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_metrics(tmp_path)
    recs = [record(0, "pruned", 40.0), record(0, "finetuned", 20.0), record(1, "pruned", 90.0)]
    for r in recs:
        append_metrics(tmp_path, r)
    back = read_metrics(tmp_path)
    assert [{k: v for k, v in b.items() if k != "time"} for b in back] == recs
    assert all(isinstance(b["time"], float) for b in back)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": 2, "na')  # a crash mid-append
    assert len(read_metrics(tmp_path)) == 3
    with pytest.raises(ValueError, match="phase"):
        append_metrics(tmp_path, record(2, "dense", 1.0))

    lines = format_stage_table(back).splitlines()
    assert lines[0].split() == ["stage", "name", "target", "sparsity", "ppl/stdlib-docs", "pruned",
                                "ppl/stdlib-docs", "finetuned", "seconds"]
    assert lines[1].split() == ["0", "s0", "0.5", "0.5000", "40", "20", "20.0"]
    assert lines[2].split() == ["1", "s1", "0.7", "0.7000", "90", "-", "10.0"]

    flat = flatten_for_trackers(back[1])
    assert flat == {"finetuned/sparsity": 0.5, "target": 0.5, "finetuned/seconds": 10.0,
                    "finetuned/ppl/stdlib-docs": 20.0}


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(0, "pruned", 1.0)) + "\nnot json\n")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_every_registered_hook_type_resolves_to_its_runner():
    """The registry names runners as strings (so recipes validate without torch); each must resolve."""
    for kind, spec in HOOKS.items():
        fn = runner({"type": kind})
        assert callable(fn) and fn.__name__ == f"run_{kind}_hook", (kind, spec.runner)
