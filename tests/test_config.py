"""Every config composes against the structured schema; typos and wrong types fail at start."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from nnsvd.config import Mode
from nnsvd.run.overrides import (
    NAME_LIMIT,
    checkpoint_overrides,
    job_dirname,
    override_name,
    register_configs,
    sweep_record,
)

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
    assert cfg.model.name == {"gpt2_tiny": "gpt2", "gpt2_bytes": "gpt2", "smollm2": "causal_lm"}.get(model, model) and cfg.regularizer.name == regularizer
    assert cfg.rank == 4


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_config_composes(data):
    cfg = _compose(f"data={data}")
    assert cfg.data.name == data


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert cfg.model.name in ("mlp", "gpt2", "causal_lm")


def test_gpt2_selects_its_own_data_and_schedule():
    cfg = _compose("model=gpt2")
    assert cfg.data.name == "wikitext2" and cfg.train.epochs == 0
    assert cfg.train.seq_len is None and cfg.finetune.seq_len is None  # the model's n_positions
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


@pytest.mark.parametrize("size", _options("size"))
def test_every_mlp_methods_cell_composes(size):
    cfg = _compose("experiment=mlp_methods", f"+size={size}", "compress.method=whiten")
    assert cfg.model.name == "mlp" and cfg.compress.method.value == "whiten"
    if size.startswith("ratio"):
        assert cfg.rank is None and cfg.compress.ratio == int(size[5:7]) / 100
        assert cfg.compress.allocation.value == size.split("_")[1]
    else:
        assert cfg.rank == int(size[1:]) and cfg.compress.ratio is None


def _swept(experiment: str, key: str) -> list[str]:
    params = yaml.safe_load((REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return str(params[key]).split(",")


@pytest.mark.parametrize("recipe", _swept("gpt2_methods", "+recipe"))
def test_every_gpt2_methods_recipe_composes(recipe):
    cfg = _compose("experiment=gpt2_methods", f"+recipe={recipe}", "compress.ratio=0.4")
    method, allocation = recipe.split("_")
    assert (cfg.compress.method.value, cfg.compress.allocation.value) == (method, allocation)
    assert cfg.model.tokenizer == "builtin:bytes" and cfg.model.config.vocab_size == 257
    assert cfg.train.weight_decay == 0.0 and cfg.train.steps == 4000
    assert (cfg.model.config.resid_pdrop, cfg.model.config.embd_pdrop, cfg.model.config.attn_pdrop) == (0.0,) * 3
    cfg = _compose("experiment=gpt2_methods", f"+recipe={recipe}", "compress.ratio=0.4", "model=gpt2")
    assert cfg.model.pretrained is True and cfg.data.name == "wikitext2"


@pytest.mark.parametrize("recipe", _swept("smollm2_methods", "+recipe"))
def test_every_smollm2_methods_recipe_composes_offline(recipe):
    cfg = _compose("experiment=smollm2_methods", f"+recipe={recipe}", "compress.ratio=0.4", "data.root=/data")
    method, *variants = recipe.split("_")  # whiten_loss_sequential: allocation loss, calibrated sequentially
    assert cfg.compress.method.value == method and cfg.model.name == "causal_lm" and cfg.data.name == "text_files"
    assert cfg.calibration.sequential is bool({"sequential", "block"} & set(variants))
    allocations = [v for v in variants if v not in ("sequential", "block")]
    assert cfg.compress.allocation.value == (allocations[0] if allocations else "uniform")
    update = cfg.compress["update"]  # (not .update: that is the DictConfig method)
    assert (update.value if update else None) == ("block" if "block" in variants else None)
    assert (cfg.model.name_or_path, cfg.model.gguf_file) == ("/data/smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.model.fallback == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (cfg.eval.max_length, cfg.eval.validation) == (2048, False)
    assert _swept("smollm2_methods", "compress.ratio") == ["0.2", "0.4", "0.6"]


def test_method_and_budget_keys_are_validated_by_the_schema():
    for bad in ("compress.method=qr", "compress.allocation=greedy", "compress.spectrum_loss=mean",
                "compress.ratio=abc"):
        with pytest.raises(ConfigCompositionException):
            _compose(bad)
    cfg = _compose("compress.ratio=0.4")
    assert cfg.compress.allocation.value == "uniform" and cfg.compress.spectrum_loss.value == "normalized"
    assert list(cfg.compress.sensitivity_ratios) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert cfg.calibration.seed == cfg.seed == 42 and cfg.calibration.split == "train"


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


@pytest.mark.parametrize(("override", "nearest"), [
    ("+rnak=8", "'rnak' (nearest known keys: rank)"),
    ("++rnak=8", "'rnak' (nearest known keys: rank)"),
    ("+model.hiden=32", "'model.hiden' (nearest known keys: model.hidden"),
    ("+compress.ration=0.2", "'compress.ration' (nearest known keys: compress.ratio"),
    ("+hiden=32", "'hiden' (nearest known keys: model.hidden"),
    ("+foo.bar=1", "'foo' (no known key is close)"),
])
def test_keys_added_past_the_schema_are_refused_with_the_nearest_known(override, nearest):
    """Hydra refuses rnak=8 and suggests +rnak=8, which it then accepts: check_known_keys refuses it."""
    from nnsvd.config import check_known_keys
    from nnsvd.errors import ConfigError

    cfg = _compose(override)
    with pytest.raises(ConfigError, match="unknown config key") as err:
        check_known_keys(cfg)
    assert nearest in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [(), ("model=gpt2",), ("model=smollm2", "+recipe=whiten_sequential"),
                                       ("experiment=smollm2_methods",), ("model=causal_lm", "data=text_files")])
def test_every_preset_uses_only_declared_keys(overrides):
    from nnsvd.config import check_known_keys

    check_known_keys(_compose(*overrides))


@pytest.mark.parametrize("override", ["rank=abc", "rank=8.5", "train.lr=fast", "model.hidden=wide", "seed=x"])
def test_wrong_types_fail(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(override)


@pytest.mark.parametrize("override", ["model=foo", "regularizer=foo", "data=foo"])
def test_unknown_options_fail(override):
    with pytest.raises(ConfigCompositionException, match="Could not find"):
        _compose(override)


@pytest.mark.parametrize("override", ["model=mlp_schema", "model=gpt2_schema", "data=mnist_schema",
                                      "regularizer=regularizer_schema"])
def test_schemas_are_not_options(override):
    """The structured-config schemas live in schema/*, not among the options a user picks."""
    with pytest.raises(ConfigCompositionException, match="Could not find") as err:
        _compose(override)
    listed = str(err.value).split("Available options", 1)[1].split("Config search path")[0]
    group = override.split("=")[0]
    assert sorted(line.strip() for line in listed.splitlines()[1:] if line.strip()) == _options(group)


# ------------------------------------------------------------------ directory names

EXCLUDE = ["wandb.mode", "cache.dir", "data.root"]


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["rank=8", "regularizer=symmetric"], "rank-8_regularizer-symmetric"),
        (["regularizer=symmetric", "rank=8"], "rank-8_regularizer-symmetric"),  # sorted, as Hydra's
        (["rank=8", "wandb.mode=disabled", "cache.dir=/tmp/c"], "rank-8"),  # excluded keys
        (["regularizer.alpha=1e-3", "model.targets=[l1,l2]"], "model.targets-l1+l2_regularizer.alpha-1e-3"),
        (["+cell=scratch_r08"], "cell-scratch_r08"),
        (["checkpoint=outputs/runs/2026-11-27/12-00-00_rank-8/"], "checkpoint-12-00-00_rank-8"),
        (["checkpoint=/x/12-00-00_rank-8/model.safetensors", "rank=4"], "checkpoint-12-00-00_rank-8_rank-4"),
        (["model.sample_prompt='a b: c=d'"], "model.sample_prompt-a-b-c-d"),
        (["rank=-3"], "rank--3"),  # not rank-3, the name of rank=3
        (["rank=3"], "rank-3"),
        (["compress.ratio=-0.5", "seed=-1"], "compress.ratio--0.5_seed--1"),
        (["compress.ratio=-.5", "x=-inf", "y=inf"], "compress.ratio--.5_x--inf_y-inf"),
        ([], ""),
    ],
)
def test_override_name_is_readable_and_safe(overrides, name):
    assert override_name(overrides, EXCLUDE) == name


def test_override_names_parse_back_as_unquoted_override_values():
    """Every name works as checkpoint=DIR on the command line, without quoting."""
    parser = OverridesParser.create()
    sets = [["rank=8", "regularizer=symmetric", "regularizer.alpha=1e-3"], ["model.targets=[l1,l2]", "rank=2"],
            ["train.seq_len=null", "eval.max_tokens=1_000"], ["mode=scratch", "rank=1", "seed=0"],
            ["+cell=scratch_symmetric_orthonormal_1e-2_r08"], ["model.sample_prompt='x,y=[z]'"], ["rank=-3"]]
    for overrides in sets:
        for prefix in ("12-04-13", "0", "10"):
            path = f"outputs/runs/2026-11-27/{prefix}_{override_name(overrides)}"
            parsed = parser.parse_override(f"checkpoint={path}")
            assert not parsed.is_sweep_override() and parsed.value() == path


def test_long_override_sets_are_cut_at_an_item_and_stay_unique():
    overrides = [f"model.config.key_number_{i}=value_{i}" for i in range(21)]
    a, b = override_name(overrides[:20]), override_name(overrides)
    assert len(a) <= NAME_LIMIT and len(b) <= NAME_LIMIT and a != b
    items = sorted(override_name([o]) for o in overrides[:20])
    kept, digest = a.rsplit("_", 1)
    assert len(digest) == 8 and any(kept == "_".join(items[:k]) for k in range(1, 20))  # whole items, then a hash


def test_job_dirname_has_no_dangling_separator():
    def root(task):
        return OmegaConf.create({"hydra": {"overrides": {"task": task},
                                           "job": {"config": {"override_dirname": {"exclude_keys": EXCLUDE}}}}})

    assert job_dirname("12-04-13", _root_=root([])) == "12-04-13"
    assert job_dirname("12-04-13", _root_=root(["wandb.mode=offline"])) == "12-04-13"
    assert job_dirname(3, _root_=root(["rank=8", "regularizer=symmetric"])) == "3_rank-8_regularizer-symmetric"


def test_a_multirun_job_is_named_by_its_swept_keys_alone():
    """The preset's sweeper params and the command line's sweeps name a job; the fixed overrides do not."""
    args = ["-m", "experiment=smollm2_methods", "calibration.samples=32", "calibration.seq_len=1024",
            "compress.method=svd,whiten", "eval.max_length=1024"]
    (record,) = sweep_record(args)
    assert record == "+hydra.job.env_set.NNSVD_SWEPT='compress.method'"
    assert sweep_record(args[1:]) == [] and sweep_record(["-m", "rank=8"]) == []
    root = OmegaConf.create({"hydra": {
        "mode": "RunMode.MULTIRUN",
        "overrides": {"task": ["+recipe=whiten_uniform", "compress.ratio=0.2", "calibration.samples=32",
                               "calibration.seq_len=1024", "compress.method=svd", "eval.max_length=1024"]},
        "sweeper": {"params": {"+recipe": "svd_uniform,whiten_uniform", "compress.ratio": "0.2,0.4"}},
        "job": {"env_set": {"NNSVD_SWEPT": "compress.method"},
                "config": {"override_dirname": {"exclude_keys": EXCLUDE}}}}})
    name = job_dirname(5, _root_=root)
    assert name == "5_compress.method-svd_compress.ratio-0.2_recipe-whiten_uniform"
    assert override_name([f"checkpoint=outputs/multirun/x/{name}"]) == f"checkpoint-{name}"  # unquoted as checkpoint=


# ------------------------------------------------------------- checkpoint=DIR alone

DEFAULTS = {"model": "mlp", "data": "mnist", "regularizer": "none"}


def _checkpoint(where, kind: str, choices: dict | None = None, model_type: str = "gpt2"):
    where.mkdir(parents=True)
    (where / "model.safetensors").write_bytes(b"")  # only the file names (and config.json's model_type) matter here
    if kind == "mlp":
        (where / "model.json").write_text('{"model": {"name": "mlp"}, "layers": [], "meta": {}}')
    else:
        (where / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        (where / "nnsvd_layers.json").write_text("[]")
    if choices is not None:
        (where / ".hydra").mkdir()
        (where / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return where


def test_checkpoint_implies_its_model_and_data_options(tmp_path):
    tiny = _checkpoint(tmp_path / "tiny", "gpt2", {"model": "gpt2_tiny", "data": "text_files", "experiment": "x"})
    bare = _checkpoint(tmp_path / "bare", "gpt2")
    mlp = _checkpoint(tmp_path / "mlp", "mlp", {"model": "mlp", "data": "mnist"})
    assert checkpoint_overrides([f"checkpoint={tiny}"], DEFAULTS) == ["model=gpt2_tiny", "data=text_files"]
    assert checkpoint_overrides(["-m", f"checkpoint={tiny}/model.safetensors", "rank=4,8"], DEFAULTS) == [
        "model=gpt2_tiny", "data=text_files"]
    assert checkpoint_overrides([f"checkpoint={bare}"], DEFAULTS) == ["model=gpt2"]
    assert checkpoint_overrides([f"checkpoint={mlp}"], DEFAULTS) == []  # the defaults already fit
    # the user's own choices stay; a model= of the other kind is left for the run to refuse
    assert checkpoint_overrides([f"checkpoint={tiny}", "model=gpt2"], DEFAULTS) == ["data=text_files"]
    assert checkpoint_overrides([f"checkpoint={tiny}", "data=wikitext2"], DEFAULTS) == ["model=gpt2_tiny"]
    assert checkpoint_overrides([f"checkpoint={tiny}", "model=mlp"], DEFAULTS) == []
    # a sweep over directories: the choices they share; of two kinds: nothing
    assert checkpoint_overrides(["-m", f"checkpoint={tiny},{bare}"], DEFAULTS) == ["model=gpt2"]
    assert checkpoint_overrides(["-m", f"checkpoint={tiny},{mlp}"], DEFAULTS) == []
    assert checkpoint_overrides([f"checkpoint={tmp_path / 'missing'}"], DEFAULTS) == []
    assert checkpoint_overrides(["rank=8"], DEFAULTS) == []


def test_checkpoint_of_a_causal_lm_implies_model_causal_lm(tmp_path):
    """Any other model type is a causal-LM checkpoint; a GPT-2 made by model=causal_lm stays causal_lm."""
    llama = _checkpoint(tmp_path / "llama", "lm", {"model": "causal_lm", "data": "text_files"}, model_type="llama")
    bare = _checkpoint(tmp_path / "bare", "lm", model_type="opt")
    gpt2 = _checkpoint(tmp_path / "gpt2", "lm", {"model": "causal_lm", "data": "wikitext2"})
    assert checkpoint_overrides([f"checkpoint={llama}"], DEFAULTS) == ["model=causal_lm", "data=text_files"]
    assert checkpoint_overrides([f"checkpoint={bare}"], DEFAULTS) == ["model=causal_lm"]
    assert checkpoint_overrides([f"checkpoint={gpt2}"], DEFAULTS) == ["model=causal_lm", "data=wikitext2"]
    assert checkpoint_overrides([f"checkpoint={gpt2}", "model=gpt2"], DEFAULTS) == ["data=wikitext2"]
    assert checkpoint_overrides([f"checkpoint={llama}", "model=gpt2"], DEFAULTS) == []  # the run refuses it
