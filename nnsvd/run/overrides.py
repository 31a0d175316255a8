"""The command line's overrides: the run directory names made from them, the keys a multirun
sweeps, the ``model=`` that ``checkpoint=DIR`` implies, and the registration of the schema and the
``nnsvd.dirname`` resolver with Hydra."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from nnsvd.config import (
    CausalLMConfig,
    Config,
    GPT2ModelConfig,
    MLPConfig,
    MNISTDataConfig,
    RegularizerConfig,
    TextDataConfig,
)

# ----------------------------------------------------------------- directory names

NAME_LIMIT = 150  # characters of overrides in a directory name; longer sets are cut and hashed
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # what Hydra's override grammar and shells take unquoted


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _override_item(line: str) -> str:
    """``key=value`` → ``key-value``: brackets and quotes dropped, list commas as ``+``, a path
    value as its last component (``checkpoint=runs/…/12-00-00_rank-8`` → ``checkpoint-12-00-00_rank-8``)."""
    key, sep, value = line.lstrip("+~").partition("=")
    if not sep:
        return _safe(key)
    value = value.strip("'\"")
    if "/" in value:
        parts = [p for p in value.split("/") if p]
        if len(parts) > 1 and parts[-1] == "model.safetensors":
            parts.pop()
        value = parts[-1] if parts else value
    value = re.sub(r"[\[\]{}()'\"]", "", value).replace(",", "+")
    sign = "-" if value.startswith("-") and _is_number(value) else ""  # rank=-3 → rank--3, not rank-3
    return f"{_safe(key)}-{sign}{_safe(value)}"


def override_items(overrides: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The overrides as safe ``key-value`` items, sorted (like Hydra's override_dirname); keys in
    ``exclude`` and Hydra's own overrides are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    items = []
    for line in overrides:
        key = parser.parse_override(line).key_or_group
        if key in exclude or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        items.append(_override_item(line))
    return sorted(items)


def override_name(overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """A readable name for a set of command-line overrides that is safe as a directory name and
    as an unquoted Hydra override value: ``rank=8 regularizer=symmetric`` → ``rank-8_regularizer-symmetric``.

    The items of ``override_items`` joined by ``_``. A name longer than NAME_LIMIT is cut at an
    item boundary and ends in a hash of the whole set, so it stays unique.
    """
    items = override_items(overrides, exclude)
    name = "_".join(items)
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    kept = ""
    for item in items:
        if len(kept) + len(item) + 1 > NAME_LIMIT - len(digest) - 1:
            break
        kept = f"{kept}_{item}" if kept else item
    return f"{kept}_{digest}" if kept else digest


SWEPT_ENV = "NNSVD_SWEPT"  # run.py's record of the keys a multirun command line sweeps (hydra.job.env_set)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def parsed_overrides(args: Sequence[str]) -> list:
    """The command line's ``key=value`` arguments as Hydra Overrides; flags, and arguments Hydra
    cannot parse (it reports those itself), are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except HydraException:
            continue
    return parsed


def swept_keys(args: Sequence[str]) -> list[str]:
    """The keys that command-line arguments sweep (``rank=1,2,4``, ``range(…)``, ``glob(…)``), in order."""
    keys = []
    for override in parsed_overrides(args):
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def sweep_record(args: Sequence[str]) -> list[str]:
    """The override that tells every job of a multirun which keys its command line sweeps, so that
    job directories are named by those alone (``hydra.job.env_set``, which reaches every launcher's job)."""
    if not any(a in ("-m", "--multirun") for a in args):
        return []
    keys = swept_keys(args)
    return [f"+hydra.job.env_set.{SWEPT_ENV}='{' '.join(keys)}'"] if keys else []


def job_dirname(prefix: Any, *, _root_: Any) -> str:
    """``${nnsvd.dirname:PREFIX}``: PREFIX, then the job's overrides as ``override_name`` writes them.

    It reads ``hydra.overrides.task`` and ``hydra.job.config.override_dirname.exclude_keys``,
    as Hydra's ``${hydra.job.override_dirname}`` does. In a multirun only the swept keys are named
    (``hydra.sweeper.params`` and the command line's sweeps), the job number keeping the names
    unique: ``3_compress.ratio-0.6_recipe-whiten_uniform``. With no overrides the name is PREFIX alone.
    """
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=None) or [])
    exclude = OmegaConf.select(_root_, "hydra.job.config.override_dirname.exclude_keys", default=None) or []
    if str(OmegaConf.select(_root_, "hydra.mode", default="")).endswith("MULTIRUN"):
        params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None) or {}
        recorded = OmegaConf.select(_root_, f"hydra.job.env_set.{SWEPT_ENV}", default=None) or ""
        swept = {_key(k) for k in params} | set(str(recorded).split())
        overrides = [o for o in overrides if _key(o) in swept]
    name = override_name(overrides, list(exclude))
    return f"{prefix}_{name}" if name else str(prefix)


# ------------------------------------------------------------- checkpoint=DIR alone


def explicit_model_keys(overrides: Sequence[str]) -> set[str]:
    """The model.* keys set on the command line (``model.hidden=32`` → ``hidden``;
    ``model.config.n_layer=2`` → ``config.n_layer``): a checkpoint must agree with them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = (parser.parse_override(line).key_or_group for line in overrides)
    return {key[len("model."):] for key in keys if key.startswith("model.")}


# The model options that open each kind of checkpoint (the first: the one checkpoint=DIR alone implies),
# and the model.name values among them: a GPT-2 checkpoint is also a causal LM.
KIND_OPTIONS = {"mlp": ("mlp",), "gpt2": ("gpt2", "gpt2_tiny", "causal_lm"), "causal_lm": ("causal_lm", "smollm2")}
KIND_MODELS = {"mlp": ("mlp",), "gpt2": ("gpt2", "causal_lm"), "causal_lm": ("causal_lm",)}


def checkpoint_overrides(args: Sequence[str], defaults: Mapping[str, str]) -> list[str]:
    """The ``model=`` (and ``data=``) overrides that ``checkpoint=DIR`` on the command line implies.

    run.py adds them before Hydra composes, so ``checkpoint=DIR`` needs nothing else. The kind
    comes from DIR's files (model.json: MLP; config.json + nnsvd_layers.json: GPT-2, or any other
    causal LM by config.json's model_type). Where DIR
    is a run directory, the choices of the run that made it (``.hydra/hydra.yaml``, e.g.
    model=gpt2_tiny with data=text_files) are taken; its data choice also beside a user's own
    model=. Nothing is added for a group the command line sets, for a choice equal to the
    primary config's default (``defaults``), or when DIR is not a readable checkpoint (the run
    then fails with its own message). A sweep over several directories gets the choices they
    share. A ``model=`` that does not fit DIR is refused by the run itself, in one line naming both.
    """
    from nnsvd.errors import CheckpointError
    from nnsvd.models.checkpoint import checkpoint_info

    given: dict[str, Any] = {override.key_or_group: override for override in parsed_overrides(args)}
    if "checkpoint" not in given:
        return []
    ckpt = given["checkpoint"]
    paths = list(ckpt.sweep_string_iterator()) if ckpt.is_sweep_override() else [ckpt.value()]
    try:
        infos = [checkpoint_info(str(p)) for p in paths if p is not None]
    except CheckpointError:
        return []
    kinds = {info.kind for info in infos}
    if len(kinds) != 1:
        return []
    kind = kinds.pop()
    chosen = {}
    for group in ("model", "data"):
        options = {info.choices.get(group) for info in infos}
        if len(options) == 1 and None not in options:
            chosen[group] = options.pop()
    if chosen.get("model") not in KIND_OPTIONS[kind]:
        chosen = {"model": KIND_OPTIONS[kind][0]}  # a bare directory, or made by another model option
    if "model" in given:
        chosen = {k: v for k, v in chosen.items() if k != "model"}
        user_model = given["model"].value()
        if user_model not in KIND_OPTIONS[kind]:
            return []  # the run refuses it, naming both
    return [f"{group}={option}" for group, option in chosen.items()
            if group not in given and option != defaults.get(group)]


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register the ``nnsvd.dirname`` resolver."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="gpt2", node=GPT2ModelConfig)
    cs.store(group="schema/model", name="causal_lm", node=CausalLMConfig)
    cs.store(group="schema/data", name="mnist", node=MNISTDataConfig)
    cs.store(group="schema/data", name="text", node=TextDataConfig)
    cs.store(group="schema/regularizer", name="regularizer", node=RegularizerConfig)
    OmegaConf.register_new_resolver("nnsvd.dirname", job_dirname, replace=True)
