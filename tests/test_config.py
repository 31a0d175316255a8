"""Every config composes against the structured schema; typos and wrong types fail at start."""

from __future__ import annotations

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from nnsvd.config import Mode, register_configs

register_configs()
CONF = str(REPO / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def test_defaults_are_the_original_recipe():
    cfg = _compose()
    assert cfg.model.name == "mlp" and cfg.model.hidden == 64 and list(cfg.model.targets) == ["l1", "l2"]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (10, 512, 1e-3)
    assert cfg.data.val_size == 5000 and cfg.seed == 42
    assert cfg.rank is None and cfg.mode is None and cfg.regularizer.name == "none"
    assert cfg.wandb.mode.value == "offline" and cfg.device == "auto"


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("regularizer", _options("regularizer"))
def test_every_model_and_regularizer_composes(model, regularizer):
    cfg = _compose(f"model={model}", f"regularizer={regularizer}", "rank=4")
    assert cfg.model.name == model.split("_")[0] and cfg.regularizer.name == regularizer
    assert cfg.rank == 4


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_config_composes(data):
    cfg = _compose(f"data={data}")
    assert cfg.data.name == data


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert cfg.model.name in ("mlp", "gpt2")


def test_gpt2_selects_its_own_data_and_schedule():
    cfg = _compose("model=gpt2")
    assert cfg.data.name == "wikitext2" and cfg.train.seq_len == 512 and cfg.train.epochs == 0
    assert len(cfg.model.targets) == 4
    cfg = _compose("model=gpt2", "data=text_files")  # the command line wins over the model's choice
    assert cfg.data.name == "text_files" and cfg.data.train_file.endswith("wikitext-2-raw/wiki.train.raw")


def test_tiny_gpt2_is_offline_and_one_override_from_pretrained():
    cfg = _compose("experiment=gpt2_rank_sweep")
    assert cfg.model.pretrained is False and cfg.data.name == "text_files" and cfg.train.steps > 0
    assert cfg.model.tokenizer.endswith("/gpt2-tokenizer")
    cfg = _compose("experiment=gpt2_rank_sweep", "model=gpt2")
    assert cfg.model.pretrained is True and cfg.model.name_or_path == "gpt2" and cfg.data.name == "wikitext2"


@pytest.mark.parametrize("cell", _options("cell"))
def test_every_seed_table_cell_composes(cell):
    cfg = _compose("experiment=seed_mlp_table", f"+cell={cell}")
    assert cfg.model.name == "mlp" and cfg.mode.value in cell
    assert (cfg.rank is None) == (cell == "dense")
    assert cfg.regularizer.symmetric == ("symmetric" in cell) and (cfg.regularizer.alpha > 0) == ("orthonormal" in cell)


def test_regularizers_compose_symmetric_plus_orthonormal():
    cfg = _compose("regularizer=symmetric", "regularizer.alpha=1e-3")
    assert cfg.regularizer.symmetric is True and cfg.regularizer.alpha == 1e-3
    cfg = _compose("regularizer=orthonormal")
    assert cfg.regularizer.symmetric is False and cfg.regularizer.alpha == 1e-4


def test_mode_is_an_enum():
    assert _compose("mode=scratch", "rank=8").mode == Mode.scratch
    with pytest.raises(ConfigCompositionException):
        _compose("mode=sideways")


@pytest.mark.parametrize(
    "override", ["rnak=8", "model.hiden=32", "train.lrr=0.1", "regularizer.alpah=1", "wandb.mdoe=offline"]
)
def test_misspelled_keys_fail(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(override)


@pytest.mark.parametrize("override", ["rank=abc", "rank=8.5", "train.lr=fast", "model.hidden=wide", "seed=x"])
def test_wrong_types_fail(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(override)


@pytest.mark.parametrize("override", ["model=foo", "regularizer=foo", "data=foo"])
def test_unknown_options_fail(override):
    with pytest.raises(ConfigCompositionException, match="Could not find"):
        _compose(override)
