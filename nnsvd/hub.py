"""The Hugging Face Hub: one quick reachability probe before the first Hub call of a run.

huggingface_hub retries a request that cannot connect five times, pausing 1, 2, 4, 8 and 8 s,
and transformers asks for several files in turn, so an unreachable Hub took minutes to fail
and printed a warning for every retry. The probe (at most PROBE_TIMEOUT_S) finds out first.
When the Hub cannot be reached, huggingface_hub and datasets are switched to offline mode, as
``HF_HUB_OFFLINE=1`` does before they are imported: files already in the local Hugging Face
cache are used, and anything else fails at once, without retries.

Part of the base (docs/library.md, "The layers"): the models and the data both fetch from the Hub.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0

_unreachable: str | None = None  # why the Hub could not be reached, once probed
_probed = False


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """Whether Hub calls are off: HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), or a failed probe."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def probe(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub's endpoint answers an HTTP request within ``timeout`` seconds (any
    status), else the reason. It goes through huggingface_hub's own HTTP session, so proxy and
    certificate settings are those of the real calls."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint(), timeout=timeout, follow_redirects=False)
    except Exception as exc:  # connection refused, no DNS, no route, timeout, TLS: all mean unreachable
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return None


def go_offline() -> None:
    """Switch huggingface_hub (and so transformers) and datasets to offline mode for this process
    and its children, as HF_HUB_OFFLINE=1 would have done."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def unreachable() -> str | None:
    """Why the probe found the Hub unreachable in this process; None when it did not (or never ran)."""
    return _unreachable


def check_hub(what: str) -> str | None:
    """Before the first Hub call (``what`` says for what): probe once per process, and go offline
    when the Hub cannot be reached. Returns why it is unreachable (None when it is reachable or
    already offline by choice)."""
    global _probed, _unreachable
    if offline() and not _probed:
        return None  # HF_HUB_OFFLINE=1: the user chose the cache
    if not _probed:
        _probed = True
        _unreachable = probe()
        if _unreachable is not None:
            go_offline()
            log.info(
                "the Hugging Face Hub (%s) is unreachable (%s): working offline, as HF_HUB_OFFLINE=1 does; "
                "%s must be in the local Hugging Face cache", endpoint(), _unreachable, what,
            )
    return _unreachable
