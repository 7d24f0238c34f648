"""sparsegpt.storage.compact and `sparsegpt export`: bit-identical round trips (unstructured and 2:4, fp32/bf16/fp16,
Llama and GPT-2 Conv1D), the bytes a 90 % model takes, the CUTLASS layout of 2:4 weights, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.sparse import to_sparse_semi_structured
from transformers import AutoModelForCausalLM, LlamaConfig

from sparsegpt import cli
from sparsegpt.core.architectures import prunable_linears, weight_as_linear
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.storage import compact, compact_codec
from sparsegpt.storage.models import load_model, save_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so -0.0 != 0.0 and NaN payloads count)."""
    return t.view(BITS[t.element_size()]) if t.dtype != torch.bool else t


def assert_bit_identical(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for k in expected:
        assert expected[k].dtype == got[k].dtype and expected[k].shape == got[k].shape, k
        assert torch.equal(bits(expected[k]), bits(got[k])), k


def prune(model, pattern: str, sparsity: float = 0.9, seed: int = 0) -> MaskSet:
    """Random masks on every prunable linear (unstructured `sparsity`, or exact 2:4), applied to the model."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in prunable_linears(model).items():
        rows, cols = weight_as_linear(module).shape
        if pattern == "2:4":
            pruned = torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=-1)[..., :2]
            mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, pruned, True)
            masks[name] = mask.reshape(rows, cols)
        else:
            mask = torch.zeros(rows * cols, dtype=torch.bool)
            mask[torch.randperm(rows * cols, generator=generator)[:round(sparsity * rows * cols)]] = True
            masks[name] = mask.reshape(rows, cols)
    result = MaskSet(masks)
    result.apply(model)
    return result


def save_pruned(model, tokenizer, masks: MaskSet | None, folder: Path) -> Path:
    """A model folder as `sparsegpt prune` writes it: safetensors, tokenizer, mask.safetensors (if any)."""
    extra = {}
    if masks is not None:
        masks.save(folder.parent / f"{folder.name}.mask")
        extra["mask.safetensors"] = (folder.parent / f"{folder.name}.mask").read_bytes()
    save_model(model, tokenizer, folder, extra_files=extra)
    return folder


def rewrite_shard(folder: Path, edit) -> Path:
    """Rewrite the (only) compact shard with edit(tensors, metadata) applied, using safetensors' own writer."""
    shard = next(folder.glob("compact-*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    edit(tensors, metadata)
    save_file(tensors, str(shard), metadata=metadata)
    return shard


@pytest.fixture(scope="module")
def pruned_llama(make_tiny_model, tiny_tokenizer, tmp_path_factory):
    """(dense folder, compact folder, masks) of the tiny Llama at 90 %, fp32."""
    root = tmp_path_factory.mktemp("compact-llama")
    model = make_tiny_model("llama")
    masks = prune(model, "unstructured")
    dense = save_pruned(model, tiny_tokenizer, masks, root / "dense")
    compact.export(dense, root / "compact")
    return dense, root / "compact", masks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_round_trip_is_bit_identical(family, dtype, pattern, make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model(family).to(DTYPES[dtype])
    masks = prune(model, pattern)
    dense = save_pruned(model, tiny_tokenizer, masks, tmp_path / "dense")
    summary = compact.export(dense, tmp_path / "compact")

    encoding = compact.SEMI_24 if pattern == "2:4" else compact.BITMASK
    assert summary.encodings[encoding] == len(masks.masks) and sum(summary.encodings.values()) == len(masks.masks)
    files = sorted(p.name for p in (tmp_path / "compact").iterdir())
    assert files == sorted(["compact-00001-of-00001.safetensors", compact.INDEX_FILE, "config.json",
                            "generation_config.json", "tokenizer.json", "tokenizer_config.json"])
    assert_bit_identical(load_file(dense / "model.safetensors"), compact.read_state_dict(tmp_path / "compact"))
    loaded_masks = compact.load_masks(tmp_path / "compact")
    assert loaded_masks.masks.keys() == masks.masks.keys()
    assert all(torch.equal(loaded_masks.masks[k], m) for k, m in masks.masks.items())

    reference, _ = load_model(dense)
    restored, tokenizer = load_model(tmp_path / "compact")
    assert type(restored) is type(reference) and not restored.training and restored.config.use_cache is False
    assert_bit_identical(reference.state_dict(), restored.state_dict())
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab() and tokenizer.pad_token == tiny_tokenizer.pad_token
    if family == "gpt2":
        assert restored.lm_head.weight is restored.transformer.wte.weight
    ids = torch.tensor([tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, restored(ids).logits)


def test_load_casts_like_the_dense_load(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama").to(torch.bfloat16)
    dense = save_pruned(model, tiny_tokenizer, prune(model, "unstructured"), tmp_path / "dense")
    compact.export(dense, tmp_path / "compact")
    for dtype in ("float32", "float16"):
        reference, _ = load_model(dense, dtype=dtype)
        restored, _ = compact.load_compact(tmp_path / "compact", dtype=dtype)
        assert restored.dtype == DTYPES[dtype]
        assert_bit_identical(reference.state_dict(), restored.state_dict())
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        compact.load_compact(tmp_path / "compact", dtype="fp8")


def test_ninety_percent_takes_at_most_017_of_dense(tiny_tokenizer, tmp_path):
    """Measured from the file: the stored bytes of the encoded linears against their dense bytes, same dtype."""
    config = LlamaConfig(hidden_size=384, intermediate_size=768, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64)
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        masks = prune(model, "unstructured", 0.9)
        out = tmp_path / str(dtype)
        summary = compact.export(save_pruned(model, tiny_tokenizer, masks, tmp_path / f"dense-{dtype}"), out)
        stored = dense_bytes = 0
        with safe_open(str(next(out.glob("compact-*.safetensors"))), framework="pt") as f:
            params = json.loads(f.metadata()["params"])
            for key in f.keys():
                param = key.rpartition(".")[0]
                if param in params:
                    piece = f.get_slice(key)
                    itemsize = compact_codec._DTYPE_OF_CODE[piece.get_dtype()].itemsize
                    stored += torch.Size(piece.get_shape()).numel() * itemsize
        for name in masks.masks:
            dense_bytes += masks.masks[name].numel() * dtype.itemsize
        assert len(params) == len(masks.masks) == 7
        assert (stored, dense_bytes) == (summary.linear_bytes, summary.linear_dense_bytes)
        assert stored <= 0.17 * dense_bytes, (dtype, stored / dense_bytes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_semi_24_is_the_cutlass_layout(dtype):
    """values = CUTLASS's packed tensor; indices (as int16) = its metadata before the tile reordering."""
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    torch.manual_seed(0)
    weight = torch.randn(64, 128).to(dtype)
    groups = weight.abs().float().reshape(64, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.argsort(-1)[..., 2:], True)
    keep = keep.reshape(64, 128)
    weight = torch.where(keep, weight, torch.zeros((), dtype=dtype))
    stored = compact.encode_semi_24(weight, keep)
    packed, meta_reordered = conversions.sparse_semi_structured_from_dense_cutlass(weight)
    assert torch.equal(bits(stored["values"]), bits(packed))
    offsets = conversions._calculate_meta_reordering_scatter_offsets(64, 128 // 16, torch.int16, "cpu")
    meta = torch.gather(meta_reordered.view(-1), 0, offsets).view(64, -1)
    assert torch.equal(stored["indices"].view(torch.int16), meta)
    spec = {"encoding": compact.SEMI_24, "shape": [64, 128], "dtype": dtype, "transposed": False}
    assert torch.equal(bits(compact.decode("w", spec, stored)), bits(weight))


@pytest.mark.gpu
def test_semi_24_matmul_on_cuda(tmp_path, make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("llama").to(torch.float16)
    dense = save_pruned(model, tiny_tokenizer, prune(model, "2:4"), tmp_path / "dense")
    compact.export(dense, tmp_path / "compact")
    state = compact.read_state_dict(tmp_path / "compact")
    w = state["model.layers.0.mlp.up_proj.weight"].cuda()
    x = torch.randn(64, w.shape[1], dtype=w.dtype, device="cuda")
    torch.testing.assert_close(torch.nn.functional.linear(x, to_sparse_semi_structured(w)), x @ w.t())


def test_kept_zeros_shards_and_row_blocks(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model("gpt2")
    masks = prune(model, "unstructured", 0.5)
    with torch.no_grad():  # kept weights that are exactly 0 (and -0.0) must come back as they were
        weight = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
        kept = (~masks.masks["transformer.h.0.mlp.c_fc"]).t().nonzero()[:2]
        weight[kept[0, 0], kept[0, 1]] = 0.0
        weight[kept[1, 0], kept[1, 1]] = -0.0
    dense = save_pruned(model, tiny_tokenizer, masks, tmp_path / "dense")
    monkeypatch.setattr(compact_codec, "COPY_BLOCK_BYTES", 3000)  # unpruned tensors copied in blocks of a few rows
    summary = compact.export(dense, tmp_path / "compact", max_shard_bytes=20_000)
    assert summary.shards > 3 and len(list((tmp_path / "compact").glob("compact-*-of-*.safetensors"))) == summary.shards
    assert_bit_identical(load_file(dense / "model.safetensors"), compact.read_state_dict(tmp_path / "compact"))
    loaded = compact.load_masks(tmp_path / "compact").masks
    assert all(torch.equal(loaded[k], m) for k, m in masks.masks.items())  # kept zeros stay kept


def test_without_mask_file_the_exact_zeros_are_encoded(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    masks = prune(model, "unstructured", 0.7)
    dense = save_pruned(model, tiny_tokenizer, None, tmp_path / "dense")
    summary = compact.export(dense, tmp_path / "compact")
    assert summary.encodings[compact.BITMASK] == len(masks.masks)
    assert_bit_identical(load_file(dense / "model.safetensors"), compact.read_state_dict(tmp_path / "compact"))
    assert compact.load_masks(tmp_path / "compact").masks.keys() == masks.masks.keys()


def test_save_compact_equals_export_of_the_dense_save(make_tiny_model, tiny_tokenizer, tmp_path):
    for family in ("llama", "gpt2"):
        model = make_tiny_model(family).to(torch.bfloat16)
        masks = prune(model, "unstructured")
        compact.export(save_pruned(model, tiny_tokenizer, masks, tmp_path / f"{family}-dense"),
                       tmp_path / f"{family}-exported")
        out = tmp_path / f"{family}-saved"
        out.mkdir()
        (out / "stale.txt").write_text("replaced")
        compact.save_compact(model, tiny_tokenizer, masks, out)
        assert not (out / "stale.txt").exists()
        assert_bit_identical(compact.read_state_dict(tmp_path / f"{family}-exported"), compact.read_state_dict(out))
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            assert json.loads((out / name).read_text()) == json.loads((tmp_path / f"{family}-dense" / name).read_text())
        bad = dict(masks.masks.items())  # lookups are fresh tensors: edit a copy and build a new set
        first = bad[next(iter(bad))]
        first[tuple((~first).nonzero()[0])] = True  # a pruned weight that is not zero
        with pytest.raises(UserError, match="pruned weights of .* are non-zero"):
            compact.save_compact(model, tiny_tokenizer, MaskSet(bad), tmp_path / f"{family}-bad")
        assert not (tmp_path / f"{family}-bad").exists()


def test_export_from_a_run_dir_and_the_cli(pruned_llama, tmp_path, capsys):
    dense, _, _ = pruned_llama
    run = tmp_path / "run"
    for index, name in ((0, "s50"), (1, "s90"), (2, "s95")):
        shutil.copytree(dense, run / "stages" / f"{index:02d}-{name}" / "model")
    (run / "stages" / "01-s90" / "model" / "extra").mkdir()
    (run / "stages" / "01-s90" / "model" / "extra" / "marker.txt").write_text("stage 1")
    state = {"stages": {"0": {"name": "s50", "done": ["prune", "complete"], "seconds": {}},
                        "1": {"name": "s90", "done": ["prune", "eval_pruned", "complete"], "seconds": {}},
                        "2": {"name": "s95", "done": ["prune"], "seconds": {}}}}
    (run / "state.json").write_text(json.dumps(state))
    assert compact.resolve_source(run) == run / "stages" / "01-s90" / "model"

    assert cli.main(["export", str(run), "--out", str(tmp_path / "from-run")]) == 0
    assert "pruned linears (14 bitmask) take" in capsys.readouterr().out
    assert (tmp_path / "from-run" / "extra" / "marker.txt").read_text() == "stage 1"  # other files come along
    assert cli.main(["export", str(dense), "--out", str(tmp_path / "from-model"), "--max-shard-size", "30kB"]) == 0
    capsys.readouterr()
    assert_bit_identical(compact.read_state_dict(tmp_path / "from-run"),
                         compact.read_state_dict(tmp_path / "from-model"))

    assert cli.main(["export", str(dense), "--out", str(tmp_path / "from-model")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'from-model'} already exists and is not an empty")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(dense), "--out", str(tmp_path / "x"), "--max-shard-size", "big"])
    assert exit_info.value.code == 2 and "'big' is not a positive size" in capsys.readouterr().err


def test_sources_that_are_refused_before_anything_is_written(pruned_llama, tmp_path):
    dense, packed, _ = pruned_llama
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "neither a model folder"),
             (packed, "already a compact folder")]
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"stages": {"0": {"name": "a", "done": ["prune"]}}}))
    cases.append((run, "has no finished stage yet"))
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    cases.append((broken, "is not a run state file"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(dense / "config.json", no_weights / "config.json")
    cases.append((no_weights, "has no model.safetensors"))
    for source, message in cases:
        with pytest.raises(UserError, match=message):
            compact.export(source, out)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_export_refuses_a_non_empty_out_dir_and_bad_masks(pruned_llama, make_tiny_model, tiny_tokenizer, tmp_path):
    dense, _, masks = pruned_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        compact.export(dense, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    compact.export(dense, out)  # an empty folder is fine

    model = make_tiny_model("llama")
    revived = MaskSet({k: m.clone() for k, m in masks.masks.items()})  # masks of another model: weights not zero
    with pytest.raises(UserError, match="pruned weights of model.layers.0.self_attn.q_proj.weight are non-zero"):
        compact.export(save_pruned(model, tiny_tokenizer, revived, tmp_path / "revived"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    foreign = MaskSet({"model.layers.0.not_there": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.raises(UserError, match="names model.layers.0.not_there, which is no nn.Linear"):
        compact.export(save_pruned(model, tiny_tokenizer, foreign, tmp_path / "foreign"), tmp_path / "out3")
    wrong = MaskSet({"model.layers.0.mlp.up_proj": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.raises(UserError, match=r"mask for model.layers.0.mlp.up_proj is \[4, 4\] but the weight"):
        compact.export(save_pruned(model, tiny_tokenizer, wrong, tmp_path / "wrong"), tmp_path / "out4")


PARAM = "model.layers.0.mlp.down_proj.weight"


def _drop(name):
    return lambda tensors, metadata: tensors.pop(name)


def _shorten_values(tensors, metadata):
    tensors[f"{PARAM}.values"] = tensors[f"{PARAM}.values"][:-1].clone()


def _bad_rowptr(tensors, metadata):
    tensors[f"{PARAM}.rowptr"][1] += 1


def _bad_bitmask_padding(tensors, metadata):
    spec = json.loads(metadata["params"])
    spec["model.layers.0.self_attn.k_proj.weight"]["shape"] = [31, 64]  # 1984 weights: 248 bytes, not 256
    metadata["params"] = json.dumps(spec)


def _foreign_shard(tensors, metadata):
    metadata["format"] = "sparsegpt-compact-v0"


def _bad_spec(tensors, metadata):
    spec = json.loads(metadata["params"])
    spec[PARAM]["encoding"] = "csr"
    metadata["params"] = json.dumps(spec)


@pytest.mark.parametrize("edit, message", [
    (_drop(f"{PARAM}.bitmask"), f"lacks tensor {PARAM}.bitmask"),
    (_shorten_values, f"{PARAM}.values holds 818 values .*, its bitmask keeps 819"),
    (_bad_rowptr, rf"{PARAM}.rowptr\[1\] is"),
    (_bad_bitmask_padding, r"k_proj.weight.bitmask is torch.uint8 \(256,\), expected uint8 \(248,\)"),
    (_foreign_shard, "has format 'sparsegpt-compact-v0', expected 'sparsegpt-compact-v1'"),
    (_bad_spec, f"the header entry of {PARAM} is"),
])
def test_corrupt_files_fail_naming_the_tensor(edit, message, pruned_llama, tmp_path):
    _, packed, _ = pruned_llama
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    rewrite_shard(broken, edit)
    with pytest.raises(UserError, match=message):
        load_model(broken)


def test_truncated_foreign_and_2_4_corruption(pruned_llama, make_tiny_model, tiny_tokenizer, tmp_path):
    _, packed, _ = pruned_llama
    truncated = tmp_path / "truncated"
    shutil.copytree(packed, truncated)
    shard = next(truncated.glob("compact-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"cannot read {shard} as safetensors"):
        compact.load_compact(truncated)

    index = truncated / compact.INDEX_FILE
    index.write_text(json.dumps({"format": "someone-else-v3", "weight_map": {}}))
    with pytest.raises(UserError, match="has format 'someone-else-v3', expected 'sparsegpt-compact-v1'"):
        compact.load_compact(truncated)
    index.write_text("{")
    with pytest.raises(UserError, match="expected the index of a compact folder"):
        load_model(truncated)
    with pytest.raises(UserError, match="is not a compact folder"):
        compact.load_compact(tmp_path)

    model = make_tiny_model("llama")
    dense = save_pruned(model, tiny_tokenizer, prune(model, "2:4"), tmp_path / "dense24")
    compact.export(dense, tmp_path / "c24")

    def same_positions(tensors, metadata):
        tensors[f"{PARAM}.indices"][0, 0] = 0b0101_0101  # p0 == p1 == 1

    rewrite_shard(tmp_path / "c24", same_positions)
    with pytest.raises(UserError, match=f"{PARAM}.indices holds a group whose kept positions"):
        load_model(tmp_path / "c24")

    def dropped_weight(tensors, metadata):
        spec = json.loads(metadata["params"])
        del spec[PARAM]
        metadata["params"] = json.dumps(spec)
        for suffix in ("values", "indices"):
            del tensors[f"{PARAM}.{suffix}"]

    shutil.rmtree(tmp_path / "c24")
    compact.export(dense, tmp_path / "c24")
    rewrite_shard(tmp_path / "c24", dropped_weight)
    index = json.loads((tmp_path / "c24" / compact.INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(PARAM)}
    (tmp_path / "c24" / compact.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"do not fit the config \\(missing keys: {PARAM}\\)"):
        load_model(tmp_path / "c24")


def test_folder_masks_reads_dense_and_compact_folders_alike(make_tiny_model, tiny_tokenizer, tmp_path):
    """What eval, finetune and the scheduler use: the mask saved with a folder, whichever way it was saved."""
    model = make_tiny_model("llama")
    dense = save_pruned(model, tiny_tokenizer, prune(model, "unstructured"), tmp_path / "dense")
    compact.export(dense, tmp_path / "compact")
    a, b = compact.folder_masks(dense), compact.folder_masks(tmp_path / "compact")
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    (tmp_path / "bare").mkdir()
    assert compact.folder_masks(tmp_path / "bare") is None  # no mask saved: callers use the exact zeros
