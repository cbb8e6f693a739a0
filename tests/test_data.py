"""The data pipeline: corpora from stdlib / files / Hugging Face, deterministic batches, stable batch seeds."""
import sys

import pytest
import torch

from athome.config import DataConfig
from athome.trainer.data import Corpus, batch_seed, load_corpus


def test_batches_are_a_function_of_the_seed():
    corpus = Corpus.from_bytes(bytes(range(256)) * 40, validation_fraction=0.1)
    first, again, other = corpus.batch(7, 4, 16), corpus.batch(7, 4, 16), corpus.batch(8, 4, 16)
    assert first.shape == (4, 17) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)
    # windows are contiguous slices of the corpus
    assert ((first[:, 1:] - first[:, :-1]) % 256 == 1).all()
    assert len(corpus.validation) == 1024 and corpus.batch(7, 2, 16, split="validation").shape == (2, 17)
    with pytest.raises(ValueError, match="split"):
        corpus.batch(7, 2, 16, split="test")
    with pytest.raises(ValueError, match="validation_fraction"):
        Corpus.from_bytes(b"x" * 100).batch(0, 1, 8, split="validation")


def test_stdlib_corpus():
    corpus = load_corpus(DataConfig(max_bytes=2_000_000, validation_fraction=0.05), cache=False)
    assert len(corpus) == 2_000_000
    assert len(corpus.validation) == 100_000
    assert corpus.train.dtype == torch.uint8 and int(corpus.train.max()) < 256
    assert b"def " in corpus.train[:100_000].numpy().tobytes()
    assert load_corpus(DataConfig(max_bytes=2_000_000, validation_fraction=0.05)).fingerprint == corpus.fingerprint


def test_files_and_globs(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"alpha " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"beta " * 50)
    (tmp_path / "empty.txt").write_bytes(b"")

    by_glob = load_corpus(DataConfig(source="files", paths=[str(tmp_path / "**" / "*.txt")], max_bytes=4096), cache=False)
    text = by_glob.train.numpy().tobytes()
    assert b"alpha" in text and b"beta" in text
    by_dir = load_corpus(DataConfig(source="files", paths=[str(tmp_path)], max_bytes=4096), cache=False)
    assert by_dir.fingerprint == by_glob.fingerprint
    capped = load_corpus(DataConfig(source="files", paths=[str(tmp_path / "a.txt")], max_bytes=1024), cache=False)
    assert len(capped) == 301  # the file plus a separating newline, under the cap

    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match="matches no files") as error:
        load_corpus(DataConfig(source="files", paths=[missing]), cache=False)
    assert missing in str(error.value)
    with pytest.raises(ValueError, match="empty"):
        load_corpus(DataConfig(source="files", paths=[str(tmp_path / "empty.txt")]), cache=False)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["first document", "second one", "third"]
    datasets.Dataset.from_dict({"text": texts, "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "flat"))
    corpus = load_corpus(DataConfig(source="hf", hf_dataset=str(tmp_path / "flat"), max_bytes=1024), cache=False)
    assert corpus.train.numpy().tobytes() == "\n".join(texts).encode()

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x" * 500, "y" * 500]})}).save_to_disk(
        str(tmp_path / "dict")
    )
    config = DataConfig(source="hf", hf_dataset=str(tmp_path / "dict"), hf_text_field="body", max_bytes=1024)
    assert len(load_corpus(config, cache=False)) == 1001
    with pytest.raises(ValueError, match="hf_text_field"):
        load_corpus(config.model_copy(update={"hf_text_field": "text"}), cache=False)
    with pytest.raises(ValueError, match="splits"):
        load_corpus(config.model_copy(update={"hf_split": "test"}), cache=False)


def test_hf_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes ``import datasets`` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'athome\[hf\]'"):
        load_corpus(DataConfig(source="hf", hf_dataset=str(tmp_path)), cache=False)


def test_batch_seed_is_stable_and_distinct():
    seed = batch_seed("demo", "QmPeer", 3)
    assert seed == batch_seed("demo", "QmPeer", 3)
    assert 0 <= seed < 2**63
    others = {batch_seed("demo", "QmPeer", 4), batch_seed("demo", "QmOther", 3), batch_seed("other", "QmPeer", 3)}
    assert seed not in others and len(others) == 3
    # peers on different versions must agree: a changed derivation would silently break verification
    assert seed == 9195181376509423634
