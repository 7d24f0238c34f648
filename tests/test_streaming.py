"""Layer-streamed pruning (`sparsegpt.prune.streaming`): the same bits as the in-memory path, a folder plain
transformers loads, a checkpoint checked before any layer is pruned, and a previous output that survives a kill."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sparsegpt.core.data import calibration_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import MaskSet
from sparsegpt.prune import streaming
from sparsegpt.prune.reconstruct import ReconstructConfig
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.prune.streaming import prune_streamed
from sparsegpt.storage.models import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = dict(sparsity=0.5, batch_size=2)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_folders(streamed: Path, in_memory: Path) -> None:
    """Same tensor names, dtypes and bits; same masks, config and generation config."""
    a, b = folder_tensors(streamed), folder_tensors(in_memory)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    ma, mb = MaskSet.load(streamed / "mask.safetensors"), MaskSet.load(in_memory / "mask.safetensors")
    assert list(ma.masks) == list(mb.masks)
    assert all(torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((in_memory / name).read_text()), name
    index = json.loads((streamed / streaming.INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(a) and not (streamed / streaming.SINGLE_FILE).exists()


def in_memory(source: Path, calib, cfg: PruneConfig, out: Path, *, base=None, dtype="auto") -> MaskSet:
    """The reference: what the scheduler's prune phase does with the whole model in memory."""
    model, tok = load_model(source, dtype=dtype)
    masks = prune_model(model, calib, cfg, base_masks=base).masks
    save_model(model, tok, out)
    masks.save(out / "mask.safetensors")
    return masks


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    return calibration_ids("stdlib-docs", tiny_tokenizer, nsamples=4, seqlen=32, seed=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, make_tiny_model, tiny_tokenizer) -> dict[str, Path]:
    """Tiny checkpoints (single model.safetensors): Llama untied and tied, OPT (ties its lm_head by default)."""
    root = tmp_path_factory.mktemp("stream-src")
    llama = make_tiny_model("llama")
    config = copy.deepcopy(llama.config)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    opt = make_tiny_model("opt")
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert opt.lm_head.weight is opt.get_input_embeddings().weight
    assert llama.lm_head.weight is not llama.get_input_embeddings().weight
    folders = {}
    for name, model in (("llama", llama), ("llama-tied", tied), ("opt", opt)):
        save_model(model, tiny_tokenizer, root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def sharded(sources, calib, tmp_path_factory) -> Path:
    """A streamed output (sharded, with an index): the input of the checks below."""
    out = tmp_path_factory.mktemp("stream-sharded") / "model"
    prune_streamed(sources["llama"], calib, PruneConfig(**STAGE1), out)
    return out


@pytest.mark.parametrize("source, settings, dtype", [
    ("llama", {}, "auto"),
    ("llama-tied", {"allocation": "owl", "owl_lambda": 0.2}, "auto"),
    ("opt", {}, "auto"),
    ("llama-tied", {}, "bfloat16"),
    ("llama", {"reconstruct": ReconstructConfig(passes=2, lr=1e-3, batch=3, inputs="dense")}, "auto"),
    ("llama-tied", {"reconstruct": ReconstructConfig(passes=2, lr=1e-3, batch=2, inputs="pruned")}, "bfloat16"),
], ids=["llama", "llama-tied-owl", "opt", "llama-tied-bf16", "llama-recon", "llama-tied-bf16-recon-pruned"])
def test_streamed_equals_in_memory_bitwise(sources, calib, tiny_tokenizer, tmp_path, source, settings, dtype):
    cfg = PruneConfig(**STAGE1, **settings)
    reference = in_memory(sources[source], calib, cfg, tmp_path / "memory", dtype=dtype)
    result = prune_streamed(sources[source], calib, cfg, tmp_path / "stream", tokenizer=tiny_tokenizer, dtype=dtype)
    assert_same_folders(tmp_path / "stream", tmp_path / "memory")
    assert all(torch.equal(result.masks.masks[n], reference.masks[n]) for n in reference.masks)
    if "reconstruct" in settings:  # the layers were reconstructed, the same way
        assert [r["error_after"] < r["error_before"] for r in result.reconstruction] == [True, True]
    if settings.get("allocation") == "owl":  # OWL really gave the layers different targets
        assert len({round(s["target"], 6) for s in result.stats}) > 1
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")  # plain transformers reads the folder
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    assert plain.dtype == expected.dtype
    got, want = plain.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    if source != "llama":
        assert plain.lm_head.weight is plain.get_input_embeddings().weight
    model, _ = load_model(tmp_path / "stream")
    assert MaskSet.load(tmp_path / "stream" / "mask.safetensors").verify(model)


def test_second_stage_from_a_sharded_checkpoint_with_base_masks(sharded, calib, tmp_path):
    """Stage 2 reads stage 1's sharded output (index + one shard per layer) and keeps its zeros, OWL on top."""
    base = MaskSet.load(sharded / "mask.safetensors")
    cfg = PruneConfig(sparsity=0.7, batch_size=2, allocation="owl", owl_lambda=0.05)
    in_memory(sharded, calib, cfg, tmp_path / "memory", base=base)
    result = prune_streamed(sharded, calib, cfg, tmp_path / "stream", base_masks=base,
                            extra_files=lambda r: {"sparsity.json": json.dumps(r.masks.sparsity()).encode()})
    assert_same_folders(tmp_path / "stream", tmp_path / "memory")
    assert json.loads((tmp_path / "stream" / "sparsity.json").read_text()) == result.masks.sparsity()
    assert all(bool((result.masks.masks[n] | ~base.masks[n]).all()) for n in base.masks)  # nothing revived


@pytest.fixture
def no_pruning(monkeypatch):
    """Fail the test if a layer would be pruned (the checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("prune_model ran before the checkpoint was checked")
    monkeypatch.setattr(streaming, "prune_model", refuse)


def _broken_copy(sharded: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    return broken


def test_missing_shard_fails_first_naming_it(sharded, calib, tmp_path, no_pruning):
    broken = _broken_copy(sharded, tmp_path)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match=r"model-00002-of-00003\.safetensors is missing"):
        prune_streamed(broken, calib, PruneConfig(**STAGE1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_fails_first_naming_it(sharded, calib, tmp_path, no_pruning):
    broken = _broken_copy(sharded, tmp_path)
    shard = broken / "model-00003-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(UserError, match=r"model-00003-of-00003\.safetensors holds \d+ bytes .* truncated"):
        prune_streamed(broken, calib, PruneConfig(**STAGE1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_shape_and_missing_tensor_fail_first(sharded, calib, tmp_path, no_pruning):
    broken = _broken_copy(sharded, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight is \[\d+, \d+\], the model built from config"):
        prune_streamed(broken, calib, PruneConfig(**STAGE1), tmp_path / "out")
    (broken / "config.json").write_text(json.dumps(config))
    shard = broken / "model-00001-of-00003.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        rest = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(rest, str(shard), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"has no tensor model\.norm\.weight"):
        prune_streamed(broken, calib, PruneConfig(**STAGE1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_config_with_two_different_stored_tensors_is_refused(sources, calib, tmp_path, no_pruning):
    """from_pretrained unties such a model silently; streaming says what is inconsistent instead."""
    broken = _broken_copy(sources["llama"], tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(UserError, match=r"ties lm_head\.weight to model\.embed_tokens\.weight .* different values"):
        prune_streamed(broken, calib, PruneConfig(**STAGE1), tmp_path / "out")


KILLED_RUN = """
import sys
from safetensors.torch import load_file
from sparsegpt.prune.sequential import PruneConfig
from sparsegpt.prune.streaming import prune_streamed
prune_streamed(sys.argv[1], load_file(sys.argv[2])["ids"], PruneConfig(sparsity=0.7, batch_size=2), sys.argv[3])
"""


def test_kill_during_the_write_keeps_the_previous_folder(sources, sharded, calib, tmp_path):
    """SIGKILL after the first layer's shard is written (save/before-rename: test_progressive)."""
    out = tmp_path / "model"
    shutil.copytree(sharded, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save_file({"ids": calib.contiguous()}, str(tmp_path / "calib.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1", "SPARSEGPT_FAILPOINT": "prune/layer:1"}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(sources["llama"]), str(tmp_path / "calib.safetensors"),
                           str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    partial = list(tmp_path.glob(".model.tmp-*"))  # killed mid-write: layer 0's shard was in the temp folder
    assert len(partial) == 1 and (partial[0] / "model-00002-of-00003.safetensors").is_file()
    cfg = PruneConfig(sparsity=0.7, batch_size=2)  # run again: it completes and replaces the folder
    prune_streamed(sources["llama"], calib, cfg, out)
    in_memory(sources["llama"], calib, cfg, tmp_path / "memory")
    assert_same_folders(out, tmp_path / "memory")


TWO_RANKS = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from sparsegpt.storage.models import load_model, save_model
from sparsegpt.prune.reconstruct import ReconstructConfig
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.prune.streaming import prune_streamed
from sparsegpt.core.world import init_from_env
world = init_from_env()
source, calib, out = sys.argv[1], load_file(sys.argv[2])["ids"], Path(sys.argv[3])
cfg = PruneConfig(sparsity=0.5, batch_size=2, allocation="owl", owl_lambda=0.2)
model, tok = load_model(source)
masks = prune_model(model, calib, cfg, world=world).masks
if world.is_main:
    save_model(model, tok, out / "memory")
    masks.save(out / "memory" / "mask.safetensors")
result = prune_streamed(source, calib, cfg, out / "stream", world=world)
(out / f"rank{world.rank}.json").write_text(json.dumps({"in_place": (out / "stream" / "config.json").is_file(),
                                                        "world": result.world}))
"""


@pytest.mark.slow
def test_two_ranks_stream_like_the_distributed_in_memory_pass(sources, calib, tmp_path):
    """Under a 2-process gloo group every rank streams its layers, rank 0 writes: bit for bit the in-memory pass."""
    script, ids = tmp_path / "two_ranks.py", tmp_path / "calib.safetensors"
    script.write_text(TWO_RANKS)
    save_file({"ids": calib.contiguous()}, str(ids))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SPARSEGPT_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(sources["llama-tied"]), str(ids), str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_folders(tmp_path / "stream", tmp_path / "memory")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["in_place"] for r in ranks)  # rank 1 returned only after rank 0 renamed the folder in
    assert [row["calibration_rows"] for row in ranks[0]["world"]["ranks"]] == [2, 2]
