"""Calibration driver on tiny random models of all five families: exact Hessians, propagation through the
pruned layers, shared vs per-linear Hessians, base masks, OWL, N:M, and layer-by-layer hidden states."""

import json
import math
import re

import pytest
import torch
import transformers as T
from test_architectures import FIVE

from sparsegpt.core.architectures import decoder_layers, prunable_linears, weight_as_linear
from sparsegpt.core.data import calibration_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.prune import allocation, sequential
from sparsegpt.prune.capture import layerwise_hidden_states
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.prune.solver import prune_matrix, reconstruction_error
from sparsegpt.storage.models import load_model

NSAMPLES, SEQLEN, BATCH = 6, 64, 4  # uneven last batch on purpose; 384 tokens > 256 cols: H full rank


@pytest.fixture(autouse=True)
def quiet_single_thread(monkeypatch):
    """No progress bars; one thread, since tiny ops on a busy 2-core box mostly spin-wait with two."""
    monkeypatch.setenv("SPARSEGPT_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calib(seed=1, vocab=512):
    return torch.randint(0, vocab, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


def record_layer_inputs(model):
    """Pre-hooks that keep every (args, kwargs) each decoder layer is called with; returns (log, handles)."""
    log = {i: [] for i in range(len(decoder_layers(model)))}
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: log[i].append((a, k)), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    return log, handles


def out_hidden(out):
    return out[0] if isinstance(out, tuple) else out


def layer0_reference(model, ids):
    """Dense layer-0 weights and H = 2/N Σ xxᵀ in float64 from the model's own forward, per linear."""
    linears = {n: m for n, m in prunable_linears(model).items() if ".0." in n}
    xs = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items()]
    with torch.no_grad():
        for batch in ids.split(BATCH):
            model(batch)
    for h in handles:
        h.remove()
    xs = {n: torch.cat(x).double() for n, x in xs.items()}
    return {n: (weight_as_linear(m).clone(), 2 / len(xs[n]) * xs[n].t() @ xs[n]) for n, m in linears.items()}


def spy_hessians(monkeypatch):
    """Record the Hessian the driver used for each linear (reconstruction_error sees it), calling through."""
    seen = []

    def spy(w_old, w_new, hessian):
        seen.append(hessian.clone())
        return reconstruction_error(w_old, w_new, hessian)

    monkeypatch.setattr(sequential, "reconstruction_error", spy)
    return seen


@pytest.mark.parametrize("kind", FIVE)
def test_prune_end_to_end(make_tiny_model, monkeypatch, kind):
    model, ids = make_tiny_model(kind), calib()
    cfg = PruneConfig(sparsity=0.5, batch_size=BATCH, blocksize=16)
    dense0 = layer0_reference(model, ids)
    hessians = spy_hessians(monkeypatch)
    log, handles = record_layer_inputs(model)
    result = prune_model(model, ids, cfg)
    for h in handles:
        h.remove()

    linears = prunable_linears(model)
    assert set(result.masks.masks) == set(linears)
    assert sorted(s["name"] for s in result.stats) == sorted(linears)
    assert result.masks.verify(model) == pytest.approx({n: 0.5 for n in linears})
    for s in result.stats:
        mask = result.masks.masks[s["name"]]
        assert s["sparsity"] == 0.5 == mask.float().mean().item()
        assert s["error"] > 0 and s["seconds"] >= 0 and math.isfinite(s["error"])
        assert (weight_as_linear(linears[s["name"]])[mask] == 0).all()
    used = {s["name"]: h for s, h in zip(result.stats, hessians)}
    for name, (weight, hessian) in dense0.items():  # hooks built the right H; the solver got it and W
        torch.testing.assert_close(used[name].double(), hessian, rtol=1e-5, atol=1e-6 * hessian.abs().max().item())
        expected = prune_matrix(weight, used[name], cfg.sparsity, blocksize=cfg.blocksize)[0]
        torch.testing.assert_close(weight_as_linear(linears[name]), expected, rtol=0, atol=0)

    nbatches = math.ceil(NSAMPLES / BATCH)
    layers = decoder_layers(model)
    with torch.no_grad():
        for i in range(len(layers) - 1):  # layer i+1 was calibrated on the *pruned* layer i's outputs
            for b in range(nbatches):
                args, kwargs = log[i][b]
                torch.testing.assert_close(out_hidden(layers[i](*args, **kwargs)), log[i + 1][b][0][0])
        fresh, handles = record_layer_inputs(model)  # ... and they are what the pruned model computes itself
        logits = torch.cat([model(batch).logits for batch in ids.split(BATCH)])
        for h in handles:
            h.remove()
    for i in range(len(layers)):
        for b in range(nbatches):
            torch.testing.assert_close(fresh[i][b][0][0], log[i][b][0][0])
    assert torch.isfinite(logits).all()


def test_shared_and_per_linear_hessians_agree(make_tiny_model):
    ids = calib()
    shared, alone = make_tiny_model("llama"), make_tiny_model("llama")
    prune_model(shared, ids, PruneConfig(sparsity=0.6, batch_size=BATCH))
    prune_model(alone, ids, PruneConfig(sparsity=0.6, batch_size=BATCH, shared_hessian=False))
    for (name, a), b in zip(prunable_linears(shared).items(), prunable_linears(alone).values()):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_base_masks_never_revived(make_tiny_model, method):
    model, ids = make_tiny_model("gpt2"), calib()
    first = prune_model(model, ids, PruneConfig(method=method, sparsity=0.5, batch_size=BATCH)).masks
    second = prune_model(model, ids, PruneConfig(method=method, sparsity=0.75, batch_size=BATCH),
                         base_masks=first).masks
    for name, mask in second.masks.items():
        assert (mask | ~first.masks[name]).all(), f"{name} revived a pruned weight"
        assert mask.float().mean().item() == 0.75


def test_base_masks_must_cover_the_pruned_linears(make_tiny_model):
    model = make_tiny_model("llama")
    partial = MaskSet({n: torch.zeros_like(weight_as_linear(m), dtype=torch.bool)
                       for n, m in prunable_linears(model, include="mlp").items()})
    with pytest.raises(UserError, match="base masks have no entry for model.layers.0.self_attn.q_proj"):
        prune_model(model, calib(), PruneConfig(batch_size=BATCH), base_masks=partial)


def test_owl_targets_follow_dense_outlier_ratios(make_tiny_model):
    model, ids = make_tiny_model("opt"), calib()
    cfg = PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=2.0, batch_size=BATCH)
    # reference: |W|·‖x‖ outlier ratios from the dense model's own forward, in float64
    linears = prunable_linears(model)
    sq = {n: 0 for n in linears}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: sq.__setitem__(
        n, sq[n] + a[0].double().reshape(-1, a[0].shape[-1]).square().sum(0))) for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    ratios = {i: allocation.outlier_ratio([weight_as_linear(m) for n, m in linears.items() if f".{i}." in n],
                                          [sq[n].sqrt() for n in linears if f".{i}." in n], cfg.owl_m)
              for i in range(2)}
    expected = allocation.owl(ratios, 0.6, lam=0.1)
    result = prune_model(model, ids, cfg)
    got = {s["layer"]: s["target"] for s in result.stats}
    assert got == pytest.approx(expected, abs=1e-9)
    assert sum(got.values()) / 2 == pytest.approx(0.6)
    for s in result.stats:
        assert s["sparsity"] == pytest.approx(s["target"], abs=1 / 64)


def test_nm_every_group_of_m_has_n_zeros(make_tiny_model):
    model = make_tiny_model("gpt_neox")
    result = prune_model(model, calib(), PruneConfig(prune_n=2, prune_m=4, batch_size=BATCH))
    for name, mask in result.masks.masks.items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name


@pytest.mark.parametrize("cfg, match", [
    (PruneConfig(method="obs"), "method 'obs' is unknown"),
    (PruneConfig(prune_n=4, prune_m=2), "N:M needs 0 < N < M, got 4:2"),
    (PruneConfig(prune_n=2, prune_m=4, allocation="owl"), "N:M sparsity fixes"),
    (PruneConfig(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (PruneConfig(include="nothing_matches"), "no prunable linears match include='nothing_matches'"),
    (PruneConfig(dtype="float16"), "solver dtype 'float16' is unknown"),
])
def test_bad_config_is_a_user_error(make_tiny_model, cfg, match):
    with pytest.raises(UserError, match=match):
        prune_model(make_tiny_model("llama"), calib(), cfg)


def test_include_prunes_only_matching_layers(make_tiny_model):
    model, ids = make_tiny_model("opt"), calib()
    dense = {n: weight_as_linear(m).clone() for n, m in prunable_linears(model).items()}
    result = prune_model(model, ids, PruneConfig(sparsity=0.5, batch_size=BATCH, include=r"layers\.1\.",
                                                 exclude="fc2"))
    pruned = set(result.masks.masks)
    assert pruned == {n for n in dense if ".1." in n and "fc2" not in n}
    for name, module in prunable_linears(model).items():
        assert torch.equal(weight_as_linear(module), dense[name]) != (name in pruned)


def test_mixed_attention_types_prune_with_each_layers_own_mask(make_tiny_model):
    """Qwen2 with a sliding-window layer 0 and a full-attention layer 1 (once refused): the driver replays each
    layer with the mask the model gives it, so its layer-by-layer forward is the model's own."""
    model = T.AutoModelForCausalLM.from_config(T.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, use_sliding_window=True, sliding_window=4, max_window_layers=1)).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = calib()
    hidden = torch.cat(layerwise_hidden_states(model, ids, device="cpu", batch_size=BATCH))
    with torch.no_grad():
        torch.testing.assert_close(hidden, model.base_model(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert prune_model(model, ids, PruneConfig(batch_size=BATCH)).masks.sparsity() == 0.5


def _custom_forward(model, call):
    """Replace the base model's forward (as remote code might) by one that runs the layers through `call`."""
    base = model.base_model

    def forward(input_ids=None, **kwargs):
        hidden = base.embed_tokens(input_ids)
        for layer in base.layers:
            hidden = call(layer, hidden)
        return T.modeling_outputs.BaseModelOutputWithPast(last_hidden_state=base.norm(hidden))

    base.forward = forward


@pytest.mark.parametrize("call, match", [
    (lambda layer, h: layer.mlp(h), "forward called 0 of its 2 decoder layers"),
    (lambda layer, h: layer(hidden_states=h), "layer 0 was called without its hidden states as first positional"),
    (lambda layer, h: layer(h).hidden_states, r"failed after layer 0 returned its input unchanged \(AttributeError"),
])
def test_uncapturable_layers_fail_before_pruning_naming_the_class(make_tiny_model, call, match):
    model = make_tiny_model("llama")
    _custom_forward(model, call)
    dense = {n: weight_as_linear(m).clone() for n, m in prunable_linears(model).items()}
    with pytest.raises(UserError, match=f"cannot capture the inputs of the decoder layers \\(LlamaDecoderLayer\\): "
                                        f".*{match}") as error:
        prune_model(model, calib()[:2], PruneConfig(batch_size=BATCH))
    assert "\n" not in str(error.value)
    assert all(torch.equal(weight_as_linear(m), dense[n]) for n, m in prunable_linears(model).items())
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in decoder_layers(model))  # layers restored


def test_capture_keeps_transformers_output_recording_working(make_tiny_model):
    """transformers installs its output-recording hooks on the first forward that asks for outputs, walking the
    module tree; a capture pass that comes first must leave that tree (and so those hooks) whole."""
    model, ids = make_tiny_model("llama"), calib()[:2]
    model.config.output_hidden_states = True  # so the capture pass is the one that installs the hooks
    layerwise_hidden_states(model, ids, device="cpu", batch_size=2)
    model.config.output_hidden_states = False
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[1], decoder_layers(model)[0](
        out.hidden_states[0], position_embeddings=model.base_model.rotary_emb(out.hidden_states[0],
                                                                              torch.arange(SEQLEN)[None])))


@pytest.mark.parametrize("kind", FIVE)
def test_layerwise_hidden_states_match_the_model(make_tiny_model, kind):
    model, ids = make_tiny_model(kind), calib()
    hidden = layerwise_hidden_states(model, ids, device="cpu", batch_size=BATCH, offload=kind == "bloom")
    assert [h.shape[0] for h in hidden] == [4, 2]
    with torch.no_grad():
        expected = model.base_model(ids).last_hidden_state
    torch.testing.assert_close(torch.cat(hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def prune_cli(monkeypatch):
    """`sparsegpt prune ...` through the real dispatcher, with only the prune subcommand registered."""
    from sparsegpt import cli

    monkeypatch.setattr(cli, "COMMANDS", {"prune": "one-shot prune"})
    return lambda *argv: cli.main(["prune", *map(str, argv)])


def test_cli_prune_then_prune_further(prune_cli, tiny_llama_dir, tmp_path):
    common = ["--calib", "stdlib-docs", "--nsamples", 4, "--seqlen", 16, "--batch-size", 3,
              "--device", "cpu", "--blocksize", 16]
    first, second = tmp_path / "s50", tmp_path / "s75"
    assert prune_cli("--model", tiny_llama_dir, "--sparsity", 0.5, *common, "--out", first) == 0
    assert prune_cli("--model", first, "--method", "wanda", "--sparsity", 0.75, "--base-mask",
                     first / "mask.safetensors", *common, "--out", second) == 0
    for out, target in ((first, 0.5), (second, 0.75)):
        report = json.loads((out / "sparsity.json").read_text())
        assert report["sparsity"] == target and set(report["per_linear"].values()) == {target}
        assert len(report["stats"]) == 14 and (out / "tokenizer.json").is_file()
    # the CLI did what the library does on the same calibration sample
    model, tokenizer = load_model(tiny_llama_dir)
    prune_model(model, calibration_ids("stdlib-docs", tokenizer, nsamples=4, seqlen=16, seed=0),
                PruneConfig(sparsity=0.5, batch_size=3, blocksize=16))
    for name, param in T.AutoModelForCausalLM.from_pretrained(first).state_dict().items():
        torch.testing.assert_close(param, model.state_dict()[name], rtol=0, atol=0, msg=name)
    masks1, masks2 = MaskSet.load(first / "mask.safetensors"), MaskSet.load(second / "mask.safetensors")
    model = T.AutoModelForCausalLM.from_pretrained(second)  # plain transformers
    assert masks2.verify(model) == pytest.approx({n: 0.75 for n in masks2.masks})
    for name, mask in masks2.masks.items():
        assert (mask | ~masks1.masks[name]).all()


def test_cli_stream_writes_what_the_in_memory_prune_writes(prune_cli, tiny_llama_dir, tmp_path):
    common = ["--model", tiny_llama_dir, "--sparsity", 0.6, "--calib", "stdlib-docs", "--nsamples", 4, "--seqlen", 16,
              "--batch-size", 3, "--device", "cpu", "--blocksize", 16]
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert prune_cli(*common, "--out", whole) == 0 and prune_cli(*common, "--stream", "--out", streamed) == 0
    a = T.AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = T.AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = MaskSet.load(whole / "mask.safetensors"), MaskSet.load(streamed / "mask.safetensors")
    assert all(torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks)
    report, reference = (json.loads((out / "sparsity.json").read_text()) for out in (streamed, whole))
    assert report["streamed"] and not reference["streamed"]
    assert (report["sparsity"], report["per_linear"]) == (reference["sparsity"], reference["per_linear"])


@pytest.mark.parametrize("argv, match", [
    (["--nm", "2-4"], "--nm '2-4' is not N:M"),
    (["--nm", "4:2"], "N:M needs 0 < N < M"),
    (["--sparsity", "1.5"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "0.5", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["--sparsity", "0.5", "--include", "("], "--include '\\(' is not a valid regular expression"),
    (["--sparsity", "0.5", "--base-mask", "nope.safetensors"], "--base-mask nope.safetensors is not a file"),
    (["--sparsity", "0.5", "--calib", "nope.txt"], "nope.txt"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(prune_cli, tiny_llama_dir, tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    code = prune_cli("--model", tiny_llama_dir, "--calib", "stdlib-docs", *argv, "--out", out)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and re.search(match, errors[0]) and not out.exists()


def test_cli_refuses_a_non_empty_out(prune_cli, tiny_llama_dir, capsys):
    code = prune_cli("--model", tiny_llama_dir, "--calib", "c4", "--sparsity", 0.5, "--out", tiny_llama_dir)
    assert code == 2 and "already exists and is not an empty folder" in capsys.readouterr().err
