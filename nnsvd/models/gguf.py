"""GGUF files (llama.cpp's format): checked before anything loads, then read by transformers' own
GGUF support (``from_pretrained(folder, gguf_file=NAME)``), which dequantizes every tensor to the
dtype asked for.

Reading a GGUF file is slow (transformers parses it once for the config, once for the weights and
once for the tokenizer: about 45 s for a 100 MB file on two cores), so ``dequantized_copy`` keeps the
dequantized model and its tokenizer as a safetensors directory (``save_compressed``'s layout), keyed
by the file's content and the dtype; later runs load that in about a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from nnsvd.errors import ModelLoadError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
# GGUF value types (gguf-py's GGUFValueType) whose size is fixed: the ones a header walk must skip.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file: the folder (or Hub repository) and the file name inside it, as from_pretrained takes them."""

    folder: str
    file: str

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.file


def split_source(name_or_path: str, gguf_file: str | None) -> GGUFSource | None:
    """The GGUF file meant by ``model.name_or_path`` and ``model.gguf_file``, or None for an ordinary model.

    ``gguf_file`` names a file inside ``name_or_path`` (a local folder or a Hub repository); a
    ``name_or_path`` ending in ``.gguf`` is the file itself.
    """
    if gguf_file:
        return GGUFSource(name_or_path, gguf_file)
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        return GGUFSource(str(path.parent), path.name)
    return None


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)


def _string(f) -> str:
    (length,) = _read(f, "<Q")
    if length > 1 << 20:
        raise ValueError(f"a header string claims {length} bytes")
    return f.read(length).decode("utf-8", errors="replace")


def _skip(f, kind: int) -> None:
    if kind in _FIXED:
        f.seek(_FIXED[kind], os.SEEK_CUR)
    elif kind == _STRING:
        (length,) = _read(f, "<Q")
        f.seek(length, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = _read(f, "<IQ")
        if item in _FIXED:
            f.seek(_FIXED[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise ValueError(f"unknown header value type {kind}")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's header, read without parsing its tensors.

    The header is the magic ``GGUF``, the version, the tensor and key counts, then key/value
    pairs; the walk stops at the architecture key (usually the first). ValueError when the file
    is not GGUF or its header is cut or corrupt.
    """
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError("it does not start with the GGUF magic bytes")
        version, _tensors, keys = _read(f, "<IQQ")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (transformers reads version 2 and later)")
        for _ in range(min(keys, 1 << 16)):
            key = _string(f)
            (kind,) = _read(f, "<I")
            if key == "general.architecture" and kind == _STRING:
                return _string(f)
            _skip(f, kind)
    raise ValueError("its header has no general.architecture")


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def check_gguf(source: GGUFSource) -> None:
    """One line for a GGUF file that cannot load: missing, not GGUF, an architecture transformers
    cannot read, or the ``gguf`` package absent. A file in a Hub repository is checked when fetched."""
    path = source.path.expanduser()
    if not path.exists():
        if Path(source.folder).expanduser().is_dir() or source.folder.startswith((".", "/", "~")):
            raise ModelLoadError(
                f"model.gguf_file={source.file}: no such file in '{source.folder}'; set model.gguf_file to a "
                "GGUF file there, or model.name_or_path to the file's path (ending in .gguf)"
            )
        return  # a Hub repository: transformers fetches the file
    if not path.is_file():
        raise ModelLoadError(f"model.gguf_file={source.file}: '{path}' is not a file")
    try:
        architecture = gguf_architecture(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"'{path}' is not a readable GGUF file ({e}); point model.gguf_file at a .gguf file") from e
    allowed = supported_architectures()
    if architecture not in allowed:
        raise ModelLoadError(
            f"'{path}' holds a GGUF model of architecture '{architecture}', which transformers cannot read from "
            f"GGUF (it reads {', '.join(allowed)}); use a model of one of those, or its Hugging Face directory"
        )
    try:
        import gguf  # noqa: F401  transformers needs it to read the file
    except ImportError as e:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf") from e


def fingerprint(path: Path, dtype: str) -> str:
    """A short hash of the file's bytes and the dtype: the key of its dequantized copy."""
    h = hashlib.sha256(dtype.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
