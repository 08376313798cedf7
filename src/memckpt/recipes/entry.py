"""Worker entry point: ``python -m memckpt.recipes.entry --config config.yaml``.

What ``memckpt run`` (and the generated sbatch script) starts under torchrun on every
rank: read the merged config, train, and write this rank's ``TrainResult`` as JSON to
``$MEMCKPT_RESULT_DIR/rank<r>.json`` when that variable is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memckpt.recipes.entry")
    ap.add_argument("--config", required=True, help="a full config as written by memckpt run")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s",
    )
    from memckpt.recipes.config import ConfigContainer
    from memckpt.recipes.overrides import from_yaml
    from memckpt.recipes.train import train
    from memckpt.settings import RESULT_DIR_ENV

    cfg = from_yaml(ConfigContainer, args.config)
    result = train(cfg)
    out_dir = os.environ.get(RESULT_DIR_ENV)
    if out_dir:
        path = Path(out_dir) / f"rank{result.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
