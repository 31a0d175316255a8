"""The dense-model cache's keys and locks: parallel sweep jobs share one trained dense model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def cache_key(parts: Mapping) -> str:
    """Stable short hash of the settings that determine a trained dense model."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def locked(path: Path, timeout: float = -1):
    """Hold an inter-process file lock on ``path`` (parallel sweep jobs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=timeout):
        yield
