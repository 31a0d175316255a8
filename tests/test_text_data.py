"""Text splits from local WikiText files, cached tokenization, block packing."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import require_data

from nnsvd.data.text import load_text_splits, pack_blocks, tokenize_splits
from nnsvd.errors import DataError
from nnsvd.models.gpt2 import load_tokenizer

LINES = 2000


@pytest.fixture
def offline(monkeypatch):
    """No Hub requests (datasets and huggingface_hub read the flag once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def wiki_files(tmp_path_factory) -> dict[str, str]:
    """The first LINES lines of each WikiText-2 raw file, as data.*_file paths."""
    folder = tmp_path_factory.mktemp("wikitext")
    files = {}
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
        source = require_data("wikitext-2-raw", f"wiki.{name}.raw")
        with open(source, encoding="utf-8", newline="") as f:
            head = "".join(f.readline() for _ in range(LINES))
        path = folder / f"wiki.{name}.raw"
        path.write_text(head, encoding="utf-8", newline="")
        files[f"{split}_file"] = str(path)
    return files


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(require_data("gpt2-tokenizer")))


def test_text_files_give_three_splits_with_newlines(wiki_files, tmp_path, offline):
    dsd = load_text_splits("text_files", **wiki_files, cache_dir=tmp_path)
    assert set(dsd) == {"train", "validation", "test"}
    for split, ds in dsd.items():
        assert ds.column_names == ["text"] and ds.num_rows == LINES
        with open(wiki_files[f"{split}_file"], encoding="utf-8", newline="") as f:
            assert "".join(ds["text"]) == f.read()
    assert dsd["train"][:2]["text"] == [" \n", " = Valkyria Chronicles III = \n"]


def test_tokenization_is_the_concatenated_lines_and_cached(wiki_files, tokenizer, tmp_path, offline):
    dsd = load_text_splits("text_files", **wiki_files, cache_dir=tmp_path)
    first = tokenize_splits(dsd, tokenizer)
    assert set(first) == {"train", "validation", "test"}
    for split, ids in first.items():
        assert ids.dtype == torch.long and ids.dim() == 1
        expected = [t for line in dsd[split]["text"] for t in tokenizer.encode(line)]
        assert ids.tolist() == expected
    assert first["train"][:4].tolist() == [220, 198, 796, 569]  # " ", "\n", " =", " V"

    cache_files = sorted(p.name for p in tmp_path.rglob("cache-*.arrow"))
    assert len(cache_files) == 3  # one tokenized table per split

    # A fresh load of the same files and a second tokenization reuse the cached tables.
    again = load_text_splits("text_files", **wiki_files, cache_dir=tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("cache-*.arrow")}
    second = tokenize_splits(again, tokenizer)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("cache-*.arrow")} == mtimes
    assert sorted(p.name for p in tmp_path.rglob("cache-*.arrow")) == cache_files
    assert all(torch.equal(first[s], second[s]) for s in first)


def test_pack_blocks_drops_the_remainder():
    ids = torch.arange(23)
    blocks = pack_blocks(ids, 5)
    assert blocks.shape == (4, 5) and blocks.dtype == ids.dtype
    assert torch.equal(blocks.flatten(), ids[:20])
    assert torch.equal(blocks[1], torch.tensor([5, 6, 7, 8, 9]))
    assert pack_blocks(torch.arange(10), 5).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks(torch.arange(4), 5)
    with pytest.raises(ValueError, match="1-D"):
        pack_blocks(torch.zeros(2, 8, dtype=torch.long), 4)


@pytest.mark.parametrize("key", ["train_file", "validation_file", "test_file"])
def test_missing_file_names_the_key(wiki_files, key, tmp_path):
    missing = tmp_path / "nope.raw"
    with pytest.raises(DataError, match=f"^data.{key}: no such file: {missing}$"):
        load_text_splits("text_files", **{**wiki_files, key: str(missing)}, cache_dir=tmp_path)
    with pytest.raises(DataError, match=f"^data.{key} is not set"):
        load_text_splits("text_files", **{**wiki_files, key: None}, cache_dir=tmp_path)


def test_wikitext_from_an_unreachable_hub_says_what_to_do(tmp_path, offline):
    with pytest.raises(DataError, match="Hub .*data=text_files") as err:
        load_text_splits("wikitext2", cache_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="allowed: wikitext2, text_files"):
        load_text_splits("ptb")
