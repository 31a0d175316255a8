"""nn-svd entrypoint: python run.py model=mlp rank=8  (see README.md)."""

import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from nnsvd.run.overrides import checkpoint_overrides, register_configs, sweep_record

CONF = Path(__file__).resolve().parent / "conf"

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from nnsvd.run.pipeline import run_job

    return run_job(cfg)


def primary_choices() -> dict[str, str]:
    """The group options conf/config.yaml picks by default (e.g. model: mlp, data: mnist)."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items() if isinstance(v, str)}


if __name__ == "__main__":
    from nnsvd.cluster.callbacks import sweep_failed

    # checkpoint=DIR alone: the model (and data) options follow from DIR, as if given on the command line.
    sys.argv += checkpoint_overrides(sys.argv[1:], primary_choices())
    # A multirun names its job directories by the swept keys alone: each job learns them from this.
    sys.argv += sweep_record(sys.argv[1:])
    main()
    # A sweep runs every job even when some fail; its exit status then says so.
    sys.exit(1 if sweep_failed() else 0)
