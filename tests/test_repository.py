"""The repository itself: what git tracks and ignores."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO


def test_gitignore_lists_no_tracked_file():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked_but_ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    assert tracked_but_ignored == []
