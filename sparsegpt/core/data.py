"""Text sources for calibration, evaluation and fine-tuning, as token-id windows.

Sources: the SparseGPT paper's hub datasets (`wikitext2`, `ptb`, `c4`, via `datasets`), two offline corpora
built at run time — `stdlib-docs` (pydoc topics + stdlib docstrings: the demo's calibration and fine-tuning text)
and `debian-licenses` (the distinct paragraphs of the license texts Debian ships in /usr/share/common-licenses:
English legal prose, a held-out domain for evaluating what healing on stdlib-docs generalizes to) — and local
files: `*.txt` (documents = paragraphs separated by blank lines) or `*.jsonl` (the `text` field of each line).
Offline sources split documents deterministically by the sha256 of their text: `validation` (= `test`) when it is
0 mod 10, `tune` when it is 1 mod 10 (held out for choosing settings such as the healing lr, never evaluated on),
`train` otherwise (until `tune` existed, train also held the 1 mod 10 documents: runs since see ~11 % less train
text, the same evaluation text). Hub sources: `tune` is wikitext2's / ptb's validation split (evaluation uses test)
and c4's validation documents after the ones evaluation reads. Text is tokenized without special tokens.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import logging
import pydoc_data.topics
import sys
import sysconfig
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsegpt.core.atomic import atomic_write_text
from sparsegpt.core.cache import cache_root
from sparsegpt.core.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HUB_SOURCES = ("wikitext2", "ptb", "c4")
OFFLINE_SOURCE = "stdlib-docs"
LICENSES_SOURCE = "debian-licenses"
OFFLINE_SOURCES = (OFFLINE_SOURCE, LICENSES_SOURCE)
LICENSES_DIR = Path("/usr/share/common-licenses")
SPLITS = ("train", "tune", "validation", "test")
EVAL_BUCKET, TUNE_BUCKET = 0, 1  # sha256(document) % 10 of an offline document: validation (= test), tune
FILE_SUFFIXES = (".txt", ".jsonl")
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_EVAL_DOCS = 1100
C4_TUNE_DOCS = 1100  # c4's tune split: validation documents [C4_EVAL_DOCS, C4_EVAL_DOCS + C4_TUNE_DOCS)
C4_EVAL_WINDOWS = 256
C4_MAX_MISSES = 1000  # consecutive random c4 documents too short for one window before giving up
DOCS_PER_BATCH = 4096  # documents per tokenizer call when a source is a list of documents
DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "__pycache__"})
CORPUS_FORMAT = 1  # bump when _build_stdlib_docs changes what it extracts: older cached corpora are then unused
MEMO_SPLITS = 8  # tokenized splits remembered per process (every stage reads the same calibration/train/eval text)
MEMO_MAX_TOKENS = 1 << 23  # larger ones (c4's train documents: ~10^8 tokens) are tokenized each time, not kept
_memo: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

# Top-level stdlib modules and packages present in Python 3.10-3.13, minus tests, GUI/IDE code and codec
# tables (sorted, fixed). Their sources are parsed, never imported: imports have side effects, and other
# packages patch stdlib objects at run time (pytest replaces threading.excepthook), which would make the
# corpus depend on what else the process imported.
STDLIB_MODULES = (
    "_collections_abc", "_pydecimal", "_pyio", "_strptime", "_threading_local", "abc", "argparse", "ast",
    "asyncio", "base64", "bdb", "bisect", "bz2", "cProfile", "calendar", "cmd", "code", "codecs", "codeop",
    "collections", "colorsys", "compileall", "concurrent", "configparser", "contextlib", "contextvars", "copy",
    "copyreg", "csv", "ctypes", "curses", "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis",
    "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html", "http", "imaplib", "importlib", "inspect", "io", "ipaddress", "json", "keyword", "linecache",
    "locale", "logging", "lzma", "mailbox", "mimetypes", "modulefinder", "multiprocessing", "netrc", "ntpath",
    "nturl2path", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pty",
    "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess",
    "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "trace", "traceback", "tracemalloc", "tty", "types", "typing", "unittest", "urllib", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport",
    "zoneinfo",
)


def load_text(source: str, split: str) -> str | list[str]:
    """The text of one split of a source; a list of documents only for c4's train split (paper protocol).
    `tune` is disjoint from `train` and from the evaluation splits (module docstring)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    if source == OFFLINE_SOURCE:
        return "\n\n".join(_split_docs(_stdlib_docs(), split))
    if source == LICENSES_SOURCE:
        return "\n\n".join(_split_docs(_license_docs(), split))
    return "\n\n".join(_split_docs(_file_docs(_local_file(source)), split))


def check_source(source: str) -> None:
    """Raise UserError unless `source` is a known source name or an existing .txt/.jsonl file (loads nothing)."""
    if source == LICENSES_SOURCE:
        _license_files()
    elif source not in HUB_SOURCES and source not in OFFLINE_SOURCES:
        _local_file(source)


def calibration_ids(source: str, tokenizer: PreTrainedTokenizerBase, *, nsamples: int, seqlen: int,
                    seed: int) -> torch.Tensor:
    """(nsamples, seqlen) random windows of the train split, drawn with a torch.Generator seeded by `seed`."""
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    text = load_text(source, "train")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(text, list):
        return _document_windows(source, text, tokenizer, nsamples, seqlen, generator)
    ids = _split_ids(tokenizer, text)
    if len(ids) < nsamples * seqlen:
        raise UserError(f"{source} train has {len(ids)} tokens; {nsamples} × {seqlen} = {nsamples * seqlen} needed")
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def train_tokens(source: str, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, bool]:
    """The train split's token ids as `train_ids` packs them, and whether `calibration_ids` draws from its documents
    instead (c4's protocol, which takes documents until it has enough): what pre-flight size checks compare with,
    tokenized once for every stage."""
    text = load_text(source, "train")
    return _split_ids(tokenizer, text), isinstance(text, list)


def eval_ids(source: str, tokenizer: PreTrainedTokenizerBase, *, seqlen: int, split: str = "test",
             max_windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) consecutive non-overlapping windows from the start of a split (c4: at most 256, as the paper)."""
    _check_positive(seqlen=seqlen)
    if max_windows is None and source == "c4":
        max_windows = C4_EVAL_WINDOWS
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    return _windows(source, split, _split_ids(tokenizer, load_text(source, split)), seqlen, max_windows)


def train_ids(source: str, tokenizer: PreTrainedTokenizerBase, *, seqlen: int, split: str = "train") -> torch.Tensor:
    """(n, seqlen) the whole split packed into consecutive non-overlapping windows, for fine-tuning."""
    _check_positive(seqlen=seqlen)
    return _windows(source, split, _split_ids(tokenizer, load_text(source, split)), seqlen, None)


def default_seqlen(model_or_config, cap: int = 2048) -> int:
    """The model's context length (max_position_embeddings, n_positions, ...) capped at `cap`."""
    _check_positive(cap=cap)
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    logger.info("%s sets no context length (e.g. ALiBi positions); using seqlen=%d", type(config).__name__, cap)
    return cap


def _local_file(source: str) -> Path:
    path = Path(source).expanduser()
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(f"unknown text source {source!r}; use one of {', '.join(HUB_SOURCES + OFFLINE_SOURCES)} "
                        f"or a path to a .txt/.jsonl file")
    if not path.is_file():
        raise UserError(f"text file {source} not found; give an existing .txt or .jsonl file")
    return path


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


def _windows(source: str, split: str, ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    if n == 0:
        raise UserError(f"{source} {split} has {len(ids)} tokens; seqlen={seqlen} needed for one window")
    return ids[: n * seqlen].view(n, seqlen)


def _split_ids(tokenizer, text: str | list[str]) -> torch.Tensor:
    """`_tokenize(tokenizer, text)`, remembered within the process: a run's stages tokenize the same splits with the
    same tokenizer again and again (seconds each for a corpus). Keyed by the sha256 of the text and of the
    tokenizer's class and full serialized definition, so another text or tokenizer is tokenized afresh; returns a
    copy, so a caller may write into it. A tokenizer without a Rust backend (no exact fingerprint) is not memoized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _tokenize(tokenizer, text)
    digest = hashlib.sha256()
    for doc in [text] if isinstance(text, str) else text:
        digest.update(len(doc).to_bytes(8, "big") + doc.encode())
    key = (hashlib.sha256(f"{type(tokenizer).__qualname__}\n{backend.to_str()}".encode()).hexdigest(),
           f"{isinstance(text, str)}:{digest.hexdigest()}")
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key].clone()
    ids = _tokenize(tokenizer, text)
    if len(ids) <= MEMO_MAX_TOKENS:
        _memo[key] = ids.clone()
        while len(_memo) > MEMO_SPLITS:
            _memo.popitem(last=False)
    return ids


def _tokenize(tokenizer, text: str | list[str]) -> torch.Tensor:
    """Token ids without special tokens: a text in one call; documents in batches, joined by a blank line."""
    if isinstance(text, str):
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    parts = [torch.zeros(0, dtype=torch.long)]
    for i in range(0, len(text), DOCS_PER_BATCH):
        batch = tokenizer(text[i:i + DOCS_PER_BATCH], add_special_tokens=False, verbose=False)["input_ids"]
        parts += [torch.tensor(sep + ids, dtype=torch.long) for ids in batch]
    return torch.cat(parts)[len(sep):]


def _document_windows(source: str, docs: list[str], tokenizer, nsamples: int, seqlen: int,
                      generator: torch.Generator) -> torch.Tensor:
    """The paper's c4 protocol: each sample is a random window of a random document longer than seqlen."""
    samples = []
    while len(samples) < nsamples:
        for _ in range(C4_MAX_MISSES):
            doc = docs[int(torch.randint(len(docs), (1,), generator=generator))]
            ids = _tokenize(tokenizer, doc)
            if len(ids) > seqlen:
                break
        else:
            raise UserError(f"{source} train: {C4_MAX_MISSES} random documents in a row are not longer than "
                            f"seqlen={seqlen} tokens; use a smaller seqlen")
        start = int(torch.randint(len(ids) - seqlen + 1, (1,), generator=generator))
        samples.append(ids[start:start + seqlen])
    return torch.stack(samples)


def _hub_text(source: str, split: str) -> str | list[str]:
    """wikitext2 / ptb / c4 from the Hugging Face hub, joined as in the SparseGPT reference code."""
    import datasets

    try:
        if source in ("wikitext2", "ptb") and split == "tune":
            split = "validation"  # evaluation reads test (eval_ids' default), so validation is theirs to tune on
        if source == "wikitext2":
            rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return (" " if split == "train" else "\n\n").join(rows)
        if source == "ptb":
            return " ".join(datasets.load_dataset("ptb-text-only/ptb_text_only", "penn_treebank",
                                                  split=split)["sentence"])
        part = "train" if split == "train" else "validation"  # c4 has no test split
        rows = datasets.load_dataset("allenai/c4", data_files={part: C4_FILES[part]}, split=part)
        if part == "train":
            return list(rows["text"])
        first, stop = (C4_EVAL_DOCS, C4_EVAL_DOCS + C4_TUNE_DOCS) if split == "tune" else (0, C4_EVAL_DOCS)
        if len(rows) <= first:
            raise UserError(f"c4 validation has {len(rows)} documents; its {split} split needs more than {first}")
        return " ".join(rows.select(range(first, min(stop, len(rows))))["text"])
    except OSError as e:  # ConnectionError, offline mode, dataset not found
        raise UserError(f"source {source!r} needs the Hugging Face hub, which is unreachable ({type(e).__name__}); "
                        f"offline, use {OFFLINE_SOURCE!r} or a path to a .txt/.jsonl file") from e


def _split_docs(docs: tuple[str, ...] | list[str], split: str) -> list[str]:
    """The documents of one split, in order, by b = sha256(text) % 10: validation (= test) b == 0, tune b == 1,
    train the rest."""
    want = {"train": None, "tune": TUNE_BUCKET}.get(split, EVAL_BUCKET)
    buckets = [int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") % 10 for d in docs]
    if want is None:
        return [d for d, b in zip(docs, buckets) if b not in (EVAL_BUCKET, TUNE_BUCKET)]
    return [d for d, b in zip(docs, buckets) if b == want]


def _file_docs(path: Path) -> list[str]:
    """Documents of a local file: blank-line-separated paragraphs (.txt) or the `text` of each line (.jsonl)."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        paragraphs = (p.strip() for p in raw.replace("\r\n", "\n").split("\n\n"))
        return [p for p in paragraphs if p]
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one object per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno} has no string field 'text'; expected {{\"text\": \"...\"}} per line")
        docs.append(record["text"])
    return docs


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[str, ...]:
    """The stdlib-docs corpus (`_build_stdlib_docs`), cached on disk under $SPARSEGPT_CACHE/corpora: building it
    parses ~440 source files (5-10 s), which every process of a run (and every test subprocess) would repeat. The
    cache key covers every input the build reads: CORPUS_FORMAT, the Python version, the module list, and the
    name, size and mtime of pydoc's topics and of each source file."""
    sources = _stdlib_sources()
    files = [("pydoc_data/topics.py", Path(pydoc_data.topics.__file__))] + sources
    inputs = [(name, st.st_size, st.st_mtime_ns) for name, st in ((name, path.stat()) for name, path in files)]
    key = hashlib.sha256(json.dumps([CORPUS_FORMAT, sys.version, STDLIB_MODULES, sorted(SKIPPED_FOLDERS), inputs])
                         .encode()).hexdigest()[:16]
    path = cache_root() / "corpora" / f"{OFFLINE_SOURCE}-{key}.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return tuple(docs)
        logger.warning("%s does not hold a list of documents; rebuilding it", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        logger.warning("cannot read the cached corpus %s (%s); rebuilding it", path, e)
    docs = _build_stdlib_docs(sources)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(list(docs)))
    except OSError as e:
        logger.warning("cannot cache the stdlib-docs corpus at %s (%s); each process will rebuild it", path, e)
    return docs


def _build_stdlib_docs(sources: list[tuple[str, Path]]) -> tuple[str, ...]:
    """The stdlib-docs corpus: pydoc topics + docstrings in STDLIB_MODULES' sources, deduplicated, in name order."""
    named = {}  # text -> first name it was found under
    for topic in sorted(pydoc_data.topics.topics):
        _add_doc(named, inspect.cleandoc(pydoc_data.topics.topics[topic]), f"pydoc-topic:{topic}")
    for name, path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        _add_doc(named, ast.get_docstring(tree), name)
        for node in tree.body:
            if isinstance(node, DEFINITIONS) and not node.name.startswith("_"):
                _add_doc(named, ast.get_docstring(node), f"{name}:{node.name}")
                for member in node.body if isinstance(node, ast.ClassDef) else ():
                    if isinstance(member, DEFINITIONS) and (not member.name.startswith("_")
                                                            or member.name.endswith("__")):
                        _add_doc(named, ast.get_docstring(member), f"{name}:{node.name}.{member.name}")
    return tuple(text for _, text in sorted((name, text) for text, name in named.items()))


def _license_files() -> list[Path]:
    """The regular files of LICENSES_DIR in name order (symlinks such as GPL -> GPL-3 skipped: no duplicates)."""
    files = sorted(p for p in LICENSES_DIR.glob("*") if p.is_file() and not p.is_symlink()) \
        if LICENSES_DIR.is_dir() else []
    if not files:
        raise UserError(f"{LICENSES_SOURCE}: no license texts in {LICENSES_DIR} (Debian's base-files ships them); "
                        f"on other systems use a .txt/.jsonl file of held-out text instead")
    return files


@functools.lru_cache(maxsize=1)
def _license_docs() -> tuple[str, ...]:
    """The debian-licenses corpus: blank-line-separated paragraphs of every license file, each distinct paragraph
    once (the GPL family repeats whole sections), in first-seen order; whitespace inside a paragraph is kept."""
    seen: dict[str, None] = {}
    for path in _license_files():
        for paragraph in path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").split("\n\n"):
            if paragraph.strip():
                seen.setdefault(paragraph.strip("\n"), None)
    return tuple(seen)


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(relative name, path) of the .py files of STDLIB_MODULES: packages walked recursively, tests skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for module in STDLIB_MODULES:
        if (root / module / "__init__.py").is_file():
            files += sorted(p for p in (root / module).rglob("*.py")
                            if not SKIPPED_FOLDERS.intersection(p.relative_to(root).parts[:-1]))
        elif (root / f"{module}.py").is_file():
            files.append(root / f"{module}.py")
        else:
            logger.warning("stdlib-docs: module %s is missing from %s; the corpus will be smaller", module, root)
    return [(p.relative_to(root).as_posix(), p) for p in files]


def _add_doc(named: dict[str, str], doc: str | None, name: str) -> None:
    """Record a (cleaned) docstring under the first name it was seen with; dedupe by text."""
    if doc and doc.strip():
        named.setdefault(doc, name)
