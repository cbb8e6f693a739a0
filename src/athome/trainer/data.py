"""Training data: a byte corpus and deterministic batches.

Tokens are bytes (0..255). A batch is a pure function of ``(corpus, seed)``, and ``batch_seed(run, peer, step)`` is
public, so any peer can rebuild any other peer's batch (verification relies on it) — provided both loaded the same
corpus: compare ``Corpus.fingerprint``. The default ``stdlib`` corpus is the running Python's own standard library,
so it is identical only between peers on the same Python version.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import sysconfig
from pathlib import Path

import torch

from athome.config import DataConfig

logger = logging.getLogger(__name__)

# stdlib directories that are not "the standard library's source": installed packages, test suites, caches
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_GLOB_CHARS = frozenset("*?[")


class Corpus:
    """A byte corpus split into ``train`` and ``validation`` (the tail) uint8 tensors."""

    def __init__(self, train: torch.Tensor, validation: torch.Tensor):
        self.train, self.validation = train, validation

    @classmethod
    def from_bytes(cls, data: bytes, validation_fraction: float = 0.0) -> "Corpus":
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        num_validation = int(len(tokens) * validation_fraction)
        split = len(tokens) - num_validation
        return cls(tokens[:split], tokens[split:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hex digest of the whole corpus (both splits): equal fingerprints mean equal batches for equal seeds."""
        digest = hashlib.blake2b(digest_size=16)
        for part in (self.train, self.validation):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part.numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.train) + len(self.validation)

    def batch(self, seed: int, batch_size: int, seq_len: int, split: str = "train") -> torch.Tensor:
        """``LongTensor[batch_size, seq_len + 1]`` of random windows of ``split``; a pure function of the arguments."""
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        tokens = self.train if split == "train" else self.validation
        window = seq_len + 1
        if len(tokens) < window:
            raise ValueError(
                f"the {split} split has {len(tokens)} bytes, fewer than one window of {window}"
                + (" (set data.validation_fraction > 0)" if split == "validation" and not len(tokens) else "")
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - window + 1, (batch_size, 1), generator=generator)
        return tokens[starts + torch.arange(window)].long()


def batch_seed(run_name: str, peer_id: str, step: int) -> int:
    """A stable 63-bit seed for one peer's batch at one step (blake2b, identical on every host)."""
    key = "\x00".join((run_name, peer_id, str(step))).encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"athome-batch").digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def load_corpus(data: DataConfig, cache: bool = True) -> Corpus:
    """Load the corpus ``data`` describes, at most ``data.max_bytes`` bytes. Cached per process unless ``cache=False``."""
    if cache:
        return _load_corpus_cached(data.model_dump_json())
    return _load_corpus(data)


@functools.lru_cache(maxsize=4)
def _load_corpus_cached(data_json: str) -> Corpus:
    # DataConfig holds a list, so it is not hashable itself; its JSON is
    return _load_corpus(DataConfig.model_validate_json(data_json))


def _load_corpus(data: DataConfig) -> Corpus:
    if data.source == "stdlib":
        raw = _read_files(stdlib_files(), data.max_bytes)
    elif data.source == "files":
        raw = _read_files(_expand_paths(data.paths), data.max_bytes)
        if not raw:
            raise ValueError(f"data.paths {data.paths} matched only empty files; point data.paths at text files")
    elif data.source == "hf":
        raw = _read_hf(data)
    else:  # unreachable while DataConfig validates ``source``
        raise ValueError(f"unknown data.source {data.source!r}")
    corpus = Corpus.from_bytes(raw, data.validation_fraction)
    logger.info(
        "loaded %s corpus: %d train + %d validation bytes (fingerprint %s)",
        data.source, len(corpus.train), len(corpus.validation), corpus.fingerprint,
    )
    return corpus


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files in sorted order, without installed packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in _STDLIB_SKIP_DIRS]  # prune the walk
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def _expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (files, directories searched recursively, or globs), in a stable order."""
    files: dict[Path, None] = {}  # an ordered set
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(Path(match) for match in glob.glob(expanded, recursive=True))
        elif os.path.isdir(expanded):
            matches = sorted(path for path in Path(expanded).rglob("*"))
        else:
            matches = [Path(expanded)] if os.path.exists(expanded) else []
        matches = [path for path in matches if path.is_file()]
        if not matches:
            raise ValueError(
                f"data.paths entry {pattern!r} matches no files; fix the path (relative paths are resolved "
                f"from {os.getcwd()}) or use a glob such as 'corpus/**/*.txt'"
            )
        files.update(dict.fromkeys(matches))
    return list(files)


def _read_files(files: list[Path], max_bytes: int) -> bytes:
    """Concatenate files (newline-separated) until ``max_bytes``."""
    parts, total = [], 0
    for path in files:
        content = path.read_bytes()
        if not content:
            continue
        parts.append(content + b"\n")
        total += len(parts[-1])
        if total >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


def _read_hf(data: DataConfig) -> bytes:
    """Texts of a Hugging Face dataset (a hub name, or a local ``save_to_disk`` directory), joined with newlines."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "data.source='hf' needs the Hugging Face datasets package: pip install 'athome[hf]'"
        ) from None

    if os.path.isdir(data.hf_dataset):
        dataset = datasets.load_from_disk(data.hf_dataset)
        if isinstance(dataset, datasets.DatasetDict):
            if data.hf_split not in dataset:
                raise ValueError(
                    f"dataset {data.hf_dataset!r} has splits {sorted(dataset)}, not data.hf_split={data.hf_split!r}"
                )
            dataset = dataset[data.hf_split]
    else:
        # streaming: we only need max_bytes, not the whole (possibly huge) dataset on disk
        dataset = datasets.load_dataset(data.hf_dataset, split=data.hf_split, streaming=True)

    field = data.hf_text_field
    parts, total = [], 0
    for row in dataset:
        if field not in row:
            raise ValueError(
                f"dataset {data.hf_dataset!r} has no field data.hf_text_field={field!r}; its fields are {sorted(row)}"
            )
        text = (row[field] or "").encode() + b"\n"
        parts.append(text)
        total += len(text)
        if total >= data.max_bytes:
            break
    if not total:
        raise ValueError(f"dataset {data.hf_dataset!r} (split {data.hf_split!r}) has no text in field {field!r}")
    # the separator after the last text is dropped so that a short dataset is exactly its texts joined by "\n"
    return b"".join(parts)[: min(total - 1, data.max_bytes)]
