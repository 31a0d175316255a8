"""nn-svd entrypoint: python run.py model=mlp rank=8  (see README.md)."""

import hydra
from omegaconf import DictConfig

from nnsvd.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from nnsvd.pipeline import run_job

    return run_job(cfg)


if __name__ == "__main__":
    import sys

    from nnsvd.callbacks import sweep_failed

    main()
    # A sweep runs every job even when some fail; its exit status then says so.
    sys.exit(1 if sweep_failed() else 0)
