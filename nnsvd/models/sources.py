"""Where a model or tokenizer comes from (a local directory or a Hugging Face Hub name), and the
one-line errors when it cannot be had."""

from __future__ import annotations

import re
from pathlib import Path

from nnsvd import hub
from nnsvd.errors import ModelLoadError

# A Hub repository id: "name" or "owner/name" (huggingface_hub's rule, without the length limit).
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_name(name_or_path: str) -> bool:
    """Whether ``name_or_path`` means a Hub repository: no such local path, and shaped like a Hub id."""
    return (
        not Path(name_or_path).expanduser().exists()
        and not name_or_path.startswith((".", "~", "/"))
        and bool(_HUB_ID.match(name_or_path))
    )


def local_source(name_or_path: str, what: str, hint: str) -> Path | None:
    """The local directory meant by name_or_path, or None when it is a Hub id.

    An existing path is local. Anything that cannot be a Hub id ("/abs", "./rel", "~/x",
    "a/b/c") is a local path that does not exist, reported as such with the hint.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"could not load {what} '{name_or_path}': it is a file, not a directory; {hint}"
            )
        return path
    if name_or_path.startswith((".", "~", "/")) or not _HUB_ID.match(name_or_path):
        raise ModelLoadError(f"could not load {what} '{name_or_path}': no such local directory; {hint}")
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def hub_error(what: str, name: str, hint: str, error: BaseException) -> ModelLoadError:
    """The one-line error for a Hub name that could not be loaded, with the reason the Hub gave none."""
    unreachable = hub.unreachable()
    if unreachable is not None:
        cause = (
            f"the Hugging Face Hub ({hub.endpoint()}) is unreachable ({unreachable}) and it is not in the "
            "local Hugging Face cache"
        )
    elif hub.offline():
        cause = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache (or the name is wrong)"
    else:
        cause = (
            "the Hugging Face Hub is unreachable (offline?) or the name is wrong, and no local directory of "
            f"that name exists ({first_line(error)})"
        )
    return ModelLoadError(f"could not load {what} '{name}': {cause}; {hint}")
