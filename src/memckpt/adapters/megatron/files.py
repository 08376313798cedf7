"""Megatron's ``common.pt`` and ``metadata.json``: manifest blobs, and their files on each node.

``dist_checkpointing.save`` writes both files on global rank 0 only, and
``dist_checkpointing.load`` reads both from the checkpoint directory before it calls
a load strategy. memckpt carries them in the step manifest, which every node holds,
and writes them into each node's step directory (``<base>/<job>/step-<N>``) when the
step commits and again when ``latest_checkpoint`` picks it, so every node can load
on its own, a replaced one included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from megatron.core.dist_checkpointing.core import CONFIG_FNAME, CheckpointingConfig
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

from memckpt.storage.manifest import StepManifest

__all__ = [
    "BACKEND",
    "BACKEND_VERSION",
    "COMMON_BLOB",
    "CONFIG_BLOB",
    "config_bytes",
    "read_common_file",
    "write_step_files",
]

log = logging.getLogger(__name__)

BACKEND = "memckpt"
"""The ``sharded_backend`` our ``metadata.json`` names (Megatron's default load strategy
for it is memckpt's, registered when ``memckpt.adapters.megatron`` is imported)."""
BACKEND_VERSION = 1
COMMON_BLOB = "megatron.common.pt"
CONFIG_BLOB = "megatron.metadata.json"
_FILES = ((COMMON_BLOB, COMMON_STATE_FNAME), (CONFIG_BLOB, CONFIG_FNAME))


def config_bytes(backend: str = BACKEND, version: int = BACKEND_VERSION) -> bytes:
    """The ``metadata.json`` Megatron writes for a checkpoint of ``backend``."""
    return json.dumps(dataclasses.asdict(CheckpointingConfig(backend, version))).encode()


def read_common_file(checkpoint_dir: str | os.PathLike[str]) -> bytes | None:
    """The ``common.pt`` that ``dist_checkpointing.save`` wrote here (rank 0), if any."""
    try:
        return (Path(checkpoint_dir) / COMMON_STATE_FNAME).read_bytes()
    except FileNotFoundError:
        return None


def write_step_files(step_dir: Path, manifest: StepManifest, tag: str) -> list[str]:
    """Write the manifest's ``common.pt`` and ``metadata.json`` into ``step_dir``.

    Each file is replaced atomically and only when its bytes differ, so ranks of one
    node may call this together (``tag`` keeps their temporary names apart). Returns
    the names written.
    """
    written = []
    for blob, name in _FILES:
        data = manifest.blobs.get(blob)
        if data is None:
            continue
        path = step_dir / name
        try:
            if path.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        tmp = step_dir / f".{name}.tmp.{tag}"
        step_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written.append(name)
    if written:
        log.debug("wrote %s into %s", written, step_dir)
    return written
