"""nn-svd entrypoint: python run.py model=mlp rank=8  (see README.md)."""

import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from nnsvd.run.overrides import checkpoint_overrides, register_configs, sweep_record

CONF = Path(__file__).resolve().parent / "conf"

register_configs()


# an absolute config_path: the same function runs when run.py is imported (scripts/probe_training.py)
@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from nnsvd.run.pipeline import run_job

    return run_job(cfg)


def primary_choices() -> dict[str, str]:
    """The group options conf/config.yaml picks by default (e.g. model: mlp, data: mnist)."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items() if isinstance(v, str)}


def cli(argv: list[str]) -> int:
    """run.py's command line with ``argv`` as its overrides, in this process; its exit status."""
    from nnsvd.cluster.callbacks import sweep_failed

    # checkpoint=DIR alone: the model (and data) options follow from DIR, as if given on the command line.
    # A multirun names its job directories by the swept keys alone: each job learns them from sweep_record.
    sys.argv = [sys.argv[0], *argv, *checkpoint_overrides(argv, primary_choices()), *sweep_record(argv)]
    try:
        main()
    except SystemExit as stop:  # Hydra exits on a failed run or a bad override
        return stop.code if isinstance(stop.code, int) else 1 if stop.code else 0
    # A sweep runs every job even when some fail; its exit status then says so.
    return 1 if sweep_failed() else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
