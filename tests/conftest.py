"""Shared fixtures: the offline data folder (NNSVD_TEST_DATA) and subprocess helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("NNSVD_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def require_data(*parts: str) -> Path:
    """Path under NNSVD_TEST_DATA, or skip the test with the reason."""
    path = TEST_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set NNSVD_TEST_DATA to the offline data folder")
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data.root holding a private copy of MNIST (torchvision writes beside the .gz files)
    and links to the read-only WikiText-2 and tokenizer folders."""
    require_data("mnist", "MNIST", "raw")
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(TEST_DATA / "mnist", root / "mnist")
    for name in ("wikitext-2-raw", "gpt2-tokenizer"):
        if (TEST_DATA / name).exists():
            (root / name).symlink_to(TEST_DATA / name)
    return root
