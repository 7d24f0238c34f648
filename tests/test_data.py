"""sparsegpt.core.data: offline corpus, local files, window extraction, hub protocols (hub replaced by local rows)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sparsegpt.core import data
from sparsegpt.core.data import calibration_ids, check_source, default_seqlen, eval_ids, load_text, train_ids
from sparsegpt.core.errors import UserError

PARAGRAPHS = [f"Paragraph {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs." for i in range(400)]


def bucket(doc: str) -> int:
    """Reference split rule, written out independently of the module: 0 validation (= test), 1 tune, else train."""
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16], 16) % 10


def is_validation(doc: str) -> bool:
    return bucket(doc) == 0


def is_train(doc: str) -> bool:
    return bucket(doc) > 1


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def contains_window(ids: torch.Tensor, row: torch.Tensor) -> bool:
    return bool((ids.unfold(0, len(row), 1) == row).all(dim=1).any())


@pytest.fixture
def txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return path


def test_stdlib_docs_is_large_and_split_by_stable_hash():
    docs = data._stdlib_docs()
    assert sum(map(len, docs)) >= 1_500_000
    assert len(set(docs)) == len(docs)
    validation = [d for d in docs if is_validation(d)]
    tune = [d for d in docs if bucket(d) == 1]
    train = [d for d in docs if is_train(d)]
    assert 0.05 < len(validation) / len(docs) < 0.15 and 0.05 < len(tune) / len(docs) < 0.15
    assert load_text("stdlib-docs", "train") == "\n\n".join(train)
    assert load_text("stdlib-docs", "tune") == "\n\n".join(tune)
    assert load_text("stdlib-docs", "validation") == "\n\n".join(validation)
    assert load_text("stdlib-docs", "test") == load_text("stdlib-docs", "validation")


def test_stdlib_docs_identical_across_processes():
    code = ("import hashlib; from sparsegpt.core.data import load_text; "
            "print(hashlib.sha256((load_text('stdlib-docs', 'train') + '|' + load_text('stdlib-docs', 'tune'))"
            ".encode()).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]  # in parallel
    digests = [proc.communicate()[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    both = load_text("stdlib-docs", "train") + "|" + load_text("stdlib-docs", "tune")
    assert digests == [hashlib.sha256(both.encode()).hexdigest()] * 2


def test_stdlib_calibration_windows_come_from_train_split(tiny_tokenizer):
    ids = ids_of(tiny_tokenizer, load_text("stdlib-docs", "train"))
    calib = calibration_ids("stdlib-docs", tiny_tokenizer, nsamples=4, seqlen=32, seed=3)
    assert calib.shape == (4, 32) and calib.dtype == torch.long
    assert all(contains_window(ids, row) for row in calib)


def test_txt_split_partitions_paragraphs(txt_file):
    train, validation = load_text(str(txt_file), "train"), load_text(str(txt_file), "validation")
    assert train == "\n\n".join(p for p in PARAGRAPHS if is_train(p))
    assert validation == "\n\n".join(p for p in PARAGRAPHS if is_validation(p))
    assert validation and load_text(str(txt_file), "test") == validation
    assert load_text(str(txt_file), "tune") == "\n\n".join(p for p in PARAGRAPHS if bucket(p) == 1)


@pytest.mark.parametrize("source", ["stdlib-docs", "debian-licenses", "file"])
def test_tune_split_is_disjoint_and_train_only_lost_it(source, txt_file):
    """Documents: tune, validation (= test) and train partition the source; train is the rule before `tune`
    (sha256 % 10 != 0) minus exactly the tune documents, in the same order; a second read gives the same."""
    if source == "debian-licenses" and not data.LICENSES_DIR.is_dir():
        pytest.skip("no /usr/share/common-licenses on this system")
    docs = {"stdlib-docs": data._stdlib_docs, "debian-licenses": data._license_docs,
            "file": lambda: data._file_docs(txt_file)}[source]()
    split = {name: data._split_docs(docs, name) for name in ("train", "tune", "validation", "test")}
    assert split["tune"] and split["validation"] and split["test"] == split["validation"]
    assert sorted(split["train"] + split["tune"] + split["validation"]) == sorted(docs)
    assert not set(split["tune"]) & (set(split["train"]) | set(split["validation"]))
    assert not set(split["train"]) & set(split["validation"])
    tune = set(split["tune"])
    assert split["train"] == [d for d in docs if not is_validation(d) and d not in tune]
    assert split == {name: data._split_docs(docs, name) for name in split}
    if source == "file":
        assert load_text(str(txt_file), "tune") == "\n\n".join(split["tune"])


def test_jsonl_uses_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PARAGRAPHS)) + "\n\n")
    assert load_text(str(path), "train") == "\n\n".join(p for p in PARAGRAPHS if is_train(p))


@pytest.mark.parametrize("line, needle", [('{"txt": "a"}', "no string field 'text'"), ("{oops", "not valid JSON")])
def test_bad_jsonl_line_is_named(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2 .*{needle}"):
        load_text(str(path), "train")


def test_calibration_is_deterministic_per_seed(txt_file, tiny_tokenizer):
    def calib(seed):
        return calibration_ids(str(txt_file), tiny_tokenizer, nsamples=8, seqlen=16, seed=seed)

    assert torch.equal(calib(0), calib(0))
    assert not torch.equal(calib(0), calib(1))
    ids = ids_of(tiny_tokenizer, load_text(str(txt_file), "train"))
    assert all(contains_window(ids, row) for row in calib(0))


def test_eval_windows_are_consecutive_prefix(txt_file, tiny_tokenizer):
    ids = ids_of(tiny_tokenizer, load_text(str(txt_file), "validation"))
    windows = eval_ids(str(txt_file), tiny_tokenizer, seqlen=16)
    n = len(ids) // 16
    assert windows.shape == (n, 16) and torch.equal(windows.flatten(), ids[: n * 16])
    capped = eval_ids(str(txt_file), tiny_tokenizer, seqlen=16, max_windows=3)
    assert torch.equal(capped, windows[:3])


def test_train_ids_pack_whole_train_split(txt_file, tiny_tokenizer):
    ids = ids_of(tiny_tokenizer, load_text(str(txt_file), "train"))
    packed = train_ids(str(txt_file), tiny_tokenizer, seqlen=64)
    assert packed.shape == (len(ids) // 64, 64) and torch.equal(packed.flatten(), ids[: packed.numel()])


def test_default_seqlen(make_tiny_model):
    from transformers import BloomConfig, GPT2Config

    assert default_seqlen(make_tiny_model("llama")) == 256
    assert default_seqlen(make_tiny_model("opt").config, cap=100) == 100
    assert default_seqlen(GPT2Config(n_positions=1024)) == 1024
    assert default_seqlen(BloomConfig(), cap=512) == 512


def test_errors_name_the_problem(txt_file, tiny_tokenizer, tmp_path):
    for check in (check_source, lambda source: load_text(source, "train")):
        with pytest.raises(UserError, match="unknown text source 'wiki'.*stdlib-docs.*.txt/.jsonl"):
            check("wiki")
        with pytest.raises(UserError, match="missing.txt not found"):
            check(str(tmp_path / "missing.txt"))
    for source in ("wikitext2", "stdlib-docs", str(txt_file)):
        check_source(source)
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_text("stdlib-docs", "dev")
    n = len(ids_of(tiny_tokenizer, load_text(str(txt_file), "train")))
    with pytest.raises(UserError, match=f"corpus.txt train has {n} tokens; 1000 × 64 = 64000 needed"):
        calibration_ids(str(txt_file), tiny_tokenizer, nsamples=1000, seqlen=64, seed=0)
    with pytest.raises(UserError, match="seqlen=100000 needed for one window"):
        eval_ids(str(txt_file), tiny_tokenizer, seqlen=100_000)
    for kwargs in ({"nsamples": 0, "seqlen": 8}, {"nsamples": 2, "seqlen": -1}):
        with pytest.raises(UserError, match="must be a positive integer"):
            calibration_ids(str(txt_file), tiny_tokenizer, seed=0, **kwargs)
    with pytest.raises(UserError, match="max_windows must be a positive integer"):
        eval_ids(str(txt_file), tiny_tokenizer, seqlen=8, max_windows=0)


@pytest.mark.parametrize("source", ["wikitext2", "ptb", "c4"])
def test_hub_sources_fail_offline_with_alternatives(source):
    with pytest.raises(UserError, match=f"'{source}' needs the Hugging Face hub.*'stdlib-docs' or a path"):
        load_text(source, "test")


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset (the network) with small local rows; records the calls."""
    import datasets

    calls = []
    c4_docs = [" ".join(f"doc{i} word{j}" for j in range(3 + i % 40)) for i in range(1500)]

    def load_dataset(path, name=None, *, split, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "allenai/c4":
            return datasets.Dataset.from_dict({"text": c4_docs})
        column = "text" if path == "Salesforce/wikitext" else "sentence"
        return datasets.Dataset.from_dict({column: [f"{split} line {i}" for i in range(3)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, c4_docs


def test_wikitext2_and_ptb_follow_reference_joins(fake_hub):
    calls, _ = fake_hub
    assert load_text("wikitext2", "test") == "test line 0\n\ntest line 1\n\ntest line 2"
    assert load_text("wikitext2", "train") == "train line 0 train line 1 train line 2"
    assert load_text("ptb", "validation") == "validation line 0 validation line 1 validation line 2"
    assert calls[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None)
    assert calls[2] == ("ptb-text-only/ptb_text_only", "penn_treebank", "validation", None)
    # tune = validation (evaluation reads test), joined as evaluation text is
    assert load_text("wikitext2", "tune") == "validation line 0\n\nvalidation line 1\n\nvalidation line 2"
    assert load_text("ptb", "tune") == "validation line 0 validation line 1 validation line 2"
    assert [c[2] for c in calls[3:]] == ["validation", "validation"]


def test_c4_protocol(fake_hub, tiny_tokenizer):
    calls, docs = fake_hub
    calib = calibration_ids("c4", tiny_tokenizer, nsamples=6, seqlen=48, seed=0)
    long_docs = [ids_of(tiny_tokenizer, d) for d in docs if len(ids_of(tiny_tokenizer, d)) > 48]
    assert calib.shape == (6, 48)
    assert all(any(contains_window(ids, row) for ids in long_docs) for row in calib)
    assert calls[0][3] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert load_text("c4", "test") == " ".join(docs[:1100])
    assert load_text("c4", "tune") == " ".join(docs[1100:])  # validation documents evaluation never reads
    assert calls[-1][3] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert calls[-1][3] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    windows = eval_ids("c4", tiny_tokenizer, seqlen=8)
    assert windows.shape == (256, 8)
    assert torch.equal(windows.flatten(), ids_of(tiny_tokenizer, " ".join(docs[:1100]))[: 256 * 8])
    with pytest.raises(UserError, match="c4 train: 1000 random documents in a row are not longer than seqlen=4096"):
        calibration_ids("c4", tiny_tokenizer, nsamples=1, seqlen=4096, seed=0)


def test_c4_train_packs_documents_with_blank_lines(fake_hub, tiny_tokenizer):
    _, docs = fake_hub
    packed = train_ids("c4", tiny_tokenizer, seqlen=32)
    sep = tiny_tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    expected = torch.tensor([t for i, d in enumerate(docs)
                             for t in (sep if i else []) + tiny_tokenizer(d, add_special_tokens=False)["input_ids"]])
    assert torch.equal(packed.flatten(), expected[: packed.numel()])


@pytest.mark.slow
def test_stdlib_docs_tokenize_fast_with_demo_tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    start = time.perf_counter()
    windows = eval_ids("stdlib-docs", tokenizer, seqlen=2048, split="train")
    assert time.perf_counter() - start < 60  # seconds, not minutes (about 2 s on 2 cores)
    assert windows.shape[0] >= 150


def _fake_licenses(tmp_path, monkeypatch):
    folder = tmp_path / "common-licenses"
    folder.mkdir()
    shared = "Everyone is permitted to copy and distribute verbatim copies."
    paragraphs = [f"Clause {i}: the licensee may {'share' if i % 2 else 'modify'} the work." for i in range(60)]
    (folder / "A-1").write_text("\n\n".join([shared] + paragraphs[:30]) + "\n")
    (folder / "B-2").write_text("\n\n".join(paragraphs[30:] + [shared]) + "\n")
    (folder / "A").symlink_to("A-1")  # Debian's GPL -> GPL-3 style alias: must not be read twice
    data._license_docs.cache_clear()
    monkeypatch.setattr(data, "LICENSES_DIR", folder)
    return [shared] + paragraphs


def test_debian_licenses_are_distinct_paragraphs_split_by_stable_hash(tmp_path, monkeypatch):
    docs = _fake_licenses(tmp_path, monkeypatch)
    try:
        assert list(data._license_docs()) == docs  # each paragraph once, symlink skipped, file order
        train, validation = data._split_docs(docs, "train"), data._split_docs(docs, "validation")
        tune = data._split_docs(docs, "tune")
        assert sorted(train + tune + validation) == sorted(docs) and not set(train) & set(validation)
        assert load_text("debian-licenses", "tune") == "\n\n".join(tune)
        assert load_text("debian-licenses", "validation") == "\n\n".join(validation)
        assert load_text("debian-licenses", "test") == load_text("debian-licenses", "validation")
        check_source("debian-licenses")
    finally:
        data._license_docs.cache_clear()


def test_debian_licenses_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "absent")
    data._license_docs.cache_clear()
    with pytest.raises(UserError, match="no license texts in .*absent.*txt/.jsonl"):
        check_source("debian-licenses")


@pytest.mark.skipif(not data.LICENSES_DIR.is_dir(), reason="no /usr/share/common-licenses on this system")
def test_debian_licenses_hold_enough_validation_text_for_the_study(demo_model_dir):
    from sparsegpt.storage.models import load_tokenizer
    windows = eval_ids("debian-licenses", load_tokenizer(demo_model_dir), seqlen=128)
    assert windows.shape[0] >= 32  # the regime study evaluates 32 x 128 held-out windows


def test_tokenized_splits_are_remembered_exactly_and_handed_out_as_copies(txt_file, tiny_tokenizer):
    fresh = ids_of(tiny_tokenizer, load_text(str(txt_file), "train"))
    first = train_ids(str(txt_file), tiny_tokenizer, seqlen=8)
    first.fill_(-1)  # a caller writing into its windows must not change what the next caller gets
    again = train_ids(str(txt_file), tiny_tokenizer, seqlen=8)
    assert torch.equal(again.flatten(), fresh[: again.numel()])
    # another text (the file edited) and another tokenizer (one more token) are tokenized afresh, not served stale
    txt_file.write_text("\n\n".join(PARAGRAPHS[:50]), encoding="utf-8")
    edited = train_ids(str(txt_file), tiny_tokenizer, seqlen=8)
    assert torch.equal(edited.flatten(), ids_of(tiny_tokenizer, load_text(str(txt_file), "train"))[: edited.numel()])
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["quick brown fox"])
    changed = train_ids(str(txt_file), other, seqlen=8)
    assert torch.equal(changed.flatten(), ids_of(other, load_text(str(txt_file), "train"))[: changed.numel()])
    assert not torch.equal(changed[:4], edited[:4])


def test_stdlib_corpus_is_cached_on_disk_keyed_by_its_inputs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path))
    data._stdlib_docs.cache_clear()
    try:
        built = data._stdlib_docs()  # an empty cache: this is the build
        [cached] = (tmp_path / "corpora").iterdir()
        builds = []
        monkeypatch.setattr(data, "_build_stdlib_docs", lambda sources: builds.append(len(sources)) or built)
        data._stdlib_docs.cache_clear()
        assert data._stdlib_docs() == built and builds == []  # read back exactly (every character, every document)
        cached.write_text('{"not": "a list"', encoding="utf-8")  # torn by hand: rebuilt, with a warning
        data._stdlib_docs.cache_clear()
        with caplog.at_level("WARNING", logger="sparsegpt.core.data"):
            assert data._stdlib_docs() == built
        assert "rebuilding" in caplog.text and len(builds) == 1 and json.loads(cached.read_text()) == list(built)
        monkeypatch.setattr(data, "CORPUS_FORMAT", data.CORPUS_FORMAT + 1)  # another build: another entry
        data._stdlib_docs.cache_clear()
        assert data._stdlib_docs() == built and len(builds) == 2 and len(list((tmp_path / "corpora").iterdir())) == 2
    finally:
        data._stdlib_docs.cache_clear()


def test_c4_tune_needs_validation_documents_beyond_the_evaluated_ones(fake_hub, monkeypatch):
    monkeypatch.setattr(data, "C4_EVAL_DOCS", 1500)  # the fake shard holds 1500: none left to tune on
    with pytest.raises(UserError, match="c4 validation has 1500 documents; its tune split needs more than 1500"):
        load_text("c4", "tune")
