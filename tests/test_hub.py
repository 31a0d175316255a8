"""The Hub probe (nnsvd.hub): an unreachable Hub switches the libraries to offline mode, once."""

from __future__ import annotations

import datasets.config
import huggingface_hub.constants
import pytest

from nnsvd import hub
from nnsvd.errors import ModelLoadError
from nnsvd.models.gpt2 import load_tokenizer


@pytest.fixture
def online(monkeypatch):
    """A process that has not probed yet and is not offline; everything is restored afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_probed", False)
    monkeypatch.setattr(hub, "_unreachable", None)


def test_probe_reports_a_closed_port_at_once(online, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard: nobody listens
    reason = hub.probe(timeout=2)
    assert reason is not None and "Error" in reason and "\n" not in reason


def test_unreachable_hub_goes_offline_once_and_says_why(online, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "probe", lambda timeout=hub.PROBE_TIMEOUT_S: calls.append(timeout) or "ConnectError: x")
    assert hub.check_hub("tokenizer 'gpt2'") == "ConnectError: x"
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert hub.check_hub("model 'gpt2'") == "ConnectError: x" and len(calls) == 1  # probed once
    with pytest.raises(ModelLoadError, match=r"Hub \(https://huggingface\.co\) is unreachable \(ConnectError: x\) "
                                             r"and it is not in the local Hugging Face cache"):
        load_tokenizer("nnsvd-no-such-model-xyz")


def test_hf_hub_offline_means_no_probe(online, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "probe", lambda timeout=0: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.check_hub("model 'gpt2'") is None
