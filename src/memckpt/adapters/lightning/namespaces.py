"""Which Lightning namespaces are installed, and the base classes the adapter needs from each.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same code as different class
objects: a callback built on one is not a ``Callback`` of the other. The adapter's
classes derive from the classes of every installed namespace, so one object works
with either Trainer.
"""

from __future__ import annotations

import importlib
from typing import Final

__all__ = ["INSTALL_HINT", "callback_bases", "checkpoint_io_bases", "namespaces"]

INSTALL_HINT: Final = (
    "memckpt.adapters.lightning needs PyTorch Lightning: pip install 'memckpt[lightning]' "
    "(lightning>=2.4,<2.7; the pytorch_lightning package works too)"
)

_NAMESPACES: Final = (
    ("lightning.pytorch", "lightning.fabric.plugins.io"),
    ("pytorch_lightning", "lightning_fabric.plugins.io"),
)


def namespaces() -> list[tuple[object, object]]:
    """(trainer package, fabric io package) of every installed namespace; raises if none."""
    found = []
    for trainer_mod, io_mod in _NAMESPACES:
        try:
            found.append((importlib.import_module(trainer_mod), importlib.import_module(io_mod)))
        except ImportError:
            continue
    if not found:
        raise ImportError(INSTALL_HINT)
    return found


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of every installed namespace."""
    return tuple(pl.Callback for pl, _ in namespaces())  # type: ignore[attr-defined]


def checkpoint_io_bases() -> tuple[type, ...]:
    """The ``CheckpointIO`` class of every installed namespace."""
    return tuple(io.CheckpointIO for _, io in namespaces())  # type: ignore[attr-defined]
