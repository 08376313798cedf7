"""Lightning checkpoint dicts in memckpt's stored form: plain data, tensors and RNG states.

A Lightning checkpoint dict mixes tensors with loop counters, callback states,
hyper-parameters (an ``AttributeDict`` or an OmegaConf container) and whatever
``on_save_checkpoint`` hooks add. memckpt stores only what its restricted loader can
rebuild without running foreign code, so :func:`to_storable` maps the checkpoint
onto that: dict subclasses become dicts, OmegaConf containers plain containers, a
``type`` (Lightning's ``hparams_type``) its qualified name. Anything else is refused
at save time with the key that holds it, not at load time.
"""

from __future__ import annotations

import collections
import datetime
import fractions
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import torch

from memckpt.engine.rng import capture_rng_state as capture_rng
from memckpt.engine.rng import restore_rng_state as restore_rng
from memckpt.errors import UnsupportedValueError

__all__ = [
    "EPOCH_END_KEY",
    "RNG_KEY",
    "capture_rng",
    "persistent_step",
    "restore_rng",
    "to_storable",
]

RNG_KEY: Final = "memckpt_rng_states"
"""Top-level key of a memory checkpoint that holds the saving rank's RNG states
(``capture_rng``, memckpt.engine.rng's one layout)."""
EPOCH_END_KEY: Final = "memckpt_saved_at_epoch_end"

_LEAVES: Final = (
    type(None), bool, int, float, complex, str, bytes, bytearray, torch.Tensor, torch.dtype,
    torch.device, torch.Size, fractions.Fraction, datetime.datetime, datetime.date,
    datetime.time, datetime.timedelta, pathlib.PurePosixPath,
)  # fmt: skip
_STEP_IN_NAME: Final = re.compile(r"(?:^|[^A-Za-z0-9])step=(\d+)")


def _is_plain_numpy(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    if np is None or not isinstance(obj, (np.ndarray, np.generic)):
        return False
    dtype = obj.dtype
    return not (dtype.hasobject or dtype.names is not None or dtype.subdtype is not None)


def _omegaconf_container(obj: Any) -> Any:
    oc = sys.modules.get("omegaconf")
    if oc is not None and isinstance(obj, oc.Container):
        return oc.OmegaConf.to_container(obj, resolve=False)
    return None


def to_storable(obj: Any, where: str = "checkpoint", allowed: Iterable[type] = ()) -> Any:
    """``obj`` rebuilt from the values memckpt stores; raises UnsupportedValueError naming the key.

    Tensors are not copied. ``allowed`` lists further classes kept as they are (pass
    the same classes as ``safe_globals`` when loading).
    """
    return _convert(obj, where, tuple(allowed))


def _convert(obj: Any, where: str, allowed: tuple[type, ...]) -> Any:
    kind = type(obj)
    if kind in _LEAVES or isinstance(obj, torch.Tensor) or kind in allowed or _is_plain_numpy(obj):
        return obj
    plain = _omegaconf_container(obj)
    if plain is not None:
        return _convert(plain, where, allowed)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = collections.OrderedDict() if kind is collections.OrderedDict else {}
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)) and kind not in allowed:
                raise UnsupportedValueError(
                    f"{where} has a key of type {type(k).__name__} ({k!r:.60}); memory "
                    "checkpoints keep string and number keys"
                )
            out[k] = _convert(v, f"{where}.{k}", allowed)
        return out
    if kind in (list, tuple, set, frozenset, collections.deque):
        return kind(_convert(v, f"{where}.{i}", allowed) for i, v in enumerate(obj))
    if isinstance(obj, tuple):  # named tuples keep their values, as a tuple
        return tuple(_convert(v, f"{where}.{i}", allowed) for i, v in enumerate(obj))
    raise UnsupportedValueError(
        f"{where} holds a {kind.__module__}.{kind.__qualname__}, which a memory checkpoint "
        "does not store (it keeps tensors, numbers, strings, numpy arrays and containers of "
        "them). Store plain data in on_save_checkpoint / state_dict, or, if the class is "
        f"safe to rebuild, pass safe_globals=[{kind.__qualname__}] to wrap_trainer"
    )


def persistent_step(path: str | os.PathLike[str], weights_only: bool | None = None) -> int | None:
    """The ``global_step`` a persistent Lightning checkpoint was saved at, or None if unknown.

    Read from the name first (``ModelCheckpoint`` names files ``...step=N...``, NeMo
    resumes from ``.../<...step=N...>/weights``); a local file without one (``last.ckpt``)
    is opened with ``torch.load(mmap=True, weights_only=True)``, which rebuilds only plain
    data and maps the tensors without reading them. Only ``weights_only=False``, the
    user's own choice for the load (``fit(weights_only=False)``), lets it unpickle
    arbitrary classes. Raises what ``torch.load`` raises for a file it refuses (the
    caller treats the step as unknown, and Lightning applies its own rule to the file).
    """
    parts = Path(os.fspath(path)).parts
    for name in reversed(parts[-2:]):  # NeMo resumes from <name with step=N>/weights
        m = _STEP_IN_NAME.search(name)
        if m:
            return int(m.group(1))
    if not os.path.isfile(path):
        return None
    # the file is the user's, maybe from elsewhere: resolving "last" must not run code
    # from it that the load the user asked for would refuse
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only is not False)
    step = ckpt.get("global_step") if isinstance(ckpt, Mapping) else None
    return step if type(step) is int else None
