"""Worker entry point: ``python -m memckpt.recipes.entry --config config.yaml``.

What ``memckpt run`` (and the generated sbatch script) starts under torchrun on every
rank: read the merged config, train, and write this rank's ``TrainResult`` as JSON to
``$MEMCKPT_RESULT_DIR/rank<r>.json`` when that variable is set. With
``$MEMCKPT_LOG_DIR`` set, the rank's log also goes to ``rank<r>.log`` there; when
training raises, the rank logs ``rank <r> failed: <ErrorType>: <message>`` and the
traceback (``memckpt.recipes.rank_log``) and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memckpt.recipes.train import TrainResult

__all__ = ["main"]

log = logging.getLogger("memckpt.recipes.entry")  # also when run as __main__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memckpt.recipes.entry")
    ap.add_argument("--config", required=True, help="a full config as written by memckpt run")
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from memckpt import settings
    from memckpt.recipes import rank_log

    log_dir = settings.get(settings.LOG_DIR_ENV)
    if log_dir:
        rank_log.attach(log_dir, rank)
    try:
        result = _train(args.config)
    except Exception as e:
        # one error line (what memckpt run's summary quotes), then the traceback
        log.error("%s", rank_log.failure_message(rank, e), exc_info=True)
        return 1
    out_dir = settings.get(settings.RESULT_DIR_ENV)
    if out_dir:
        path = Path(out_dir) / f"rank{result.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
        os.replace(tmp, path)
    return 0


def _train(config: str) -> TrainResult:
    from memckpt.recipes.config import ConfigContainer
    from memckpt.recipes.overrides import from_yaml
    from memckpt.recipes.train import train

    return train(from_yaml(ConfigContainer, config))


if __name__ == "__main__":
    sys.exit(main())
