"""Summarize a finished (or interrupted) sweep again: summary.csv/.md/.png, optionally a W&B run.

    python scripts/summarize.py outputs/multirun/2026-11-26/18-30-06 --reference --wandb offline

Prints the Markdown table. Exit status: 0 when every job finished ok, 1 when one did not,
2 when SWEEP_DIR does not exist or holds no job directories.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nnsvd.tracking.summary import REFERENCE_CSV, collect, not_ok, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Aggregate the jobs of a Hydra multirun of run.py.")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path, help="the multirun's hydra.sweep.dir")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="overlay the original work's published MLP numbers on the plot",
    )
    parser.add_argument(
        "--wandb",
        choices=["disabled", "offline", "online"],
        default="disabled",
        help="log a 'summary' run into the sweep's W&B group (default: disabled)",
    )
    parser.add_argument("--project", default="nn-svd", help="W&B project (default: nn-svd)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    parser.add_argument("--group", default=None, help="W&B group (default: the sweep's, as run.py names it)")
    args = parser.parse_args(argv)

    prog = Path(sys.argv[0]).name
    if not args.sweep_dir.is_dir():
        print(f"{prog}: error: {args.sweep_dir} does not exist or is not a directory", file=sys.stderr)
        return 2
    if not collect(args.sweep_dir):
        print(
            f"{prog}: error: {args.sweep_dir} holds no job directories (subdirectories with "
            ".hydra/overrides.yaml or results.json); pass the multirun's sweep directory",
            file=sys.stderr,
        )
        return 2

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    rows, paths = summarize(
        args.sweep_dir,
        reference=REFERENCE_CSV if args.reference else None,
        wandb_mode=args.wandb,
        project=args.project,
        entity=args.entity,
        group=args.group,
    )
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 1 if not_ok(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
