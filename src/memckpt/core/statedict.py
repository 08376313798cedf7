"""Split a state dict into its tensors and a pickled skeleton, and join them back.

Tensors are pulled out through pickle's ``persistent_id`` hook, so they can sit
anywhere in the structure (dicts, lists, tuples, small objects) and their bytes
never pass through pickle. Each tensor gets a path name (``model.layer.weight``,
``optim.state.0.exp_avg``) used to match keys when loading in place. The same
tensor object reached twice (tied weights) is stored once and comes back as one
object. The skeleton is read back by a restricted unpickler that only builds
plain data types and the globals a user explicitly allows.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from memckpt.errors import CorruptCheckpointError, UnsupportedValueError

__all__ = [
    "FlatStateDict",
    "flatten_state_dict",
    "iter_named_tensors",
    "restore_state_dict",
]

_PICKLE_PROTOCOL = 5


@dataclass
class FlatStateDict:
    """The tensors of a state dict, in storage order, and its skeleton."""

    names: list[str]
    tensors: list[torch.Tensor]
    skeleton: bytes

    def signature(self) -> tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]:
        """What the storage layout depends on; equal signatures reuse a layout."""
        return tuple((n, t.dtype, tuple(t.shape)) for n, t in zip(self.names, self.tensors))


def _key_str(key: Any) -> str:
    return key if isinstance(key, str) else repr(key) if not isinstance(key, int) else str(key)


def iter_named_tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (path, tensor) for tensors reachable through dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_named_tensors(v, f"{prefix}.{_key_str(k)}" if prefix else _key_str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _check_storable(name: str, t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise UnsupportedValueError(
            f"tensor {name!r} has layout {t.layout}; only dense (strided) tensors can be stored. "
            "Convert with .to_dense() first."
        )
    if t.is_quantized or t.is_nested or t.is_meta:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else "meta"
        raise UnsupportedValueError(f"tensor {name!r} is a {kind} tensor, which cannot be stored")
    if t.device.type not in ("cpu", "cuda"):
        raise UnsupportedValueError(
            f"tensor {name!r} is on {t.device}; memckpt stores CPU and CUDA tensors"
        )


class _TensorPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, index_of: dict[int, int], flat: FlatStateDict) -> None:
        super().__init__(file, protocol=_PICKLE_PROTOCOL)
        self._index_of = index_of
        self._flat = flat

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        i = self._index_of.get(id(obj))
        if i is None:  # a tensor inside an object the path walk did not enter
            name = f"__object_tensor__.{len(self._flat.tensors)}"
            _check_storable(name, obj)
            i = len(self._flat.tensors)
            self._index_of[id(obj)] = i
            self._flat.names.append(name)
            self._flat.tensors.append(obj)
        return i


def flatten_state_dict(state_dict: Any) -> FlatStateDict:
    """Split ``state_dict`` into tensors and a skeleton; runs on the caller's thread."""
    flat = FlatStateDict([], [], b"")
    index_of: dict[int, int] = {}
    seen_names: set[str] = set()
    for name, t in iter_named_tensors(state_dict):
        if id(t) in index_of:
            continue
        _check_storable(name, t)
        if name in seen_names:
            raise UnsupportedValueError(
                f"two tensors map to the path {name!r}; use distinct keys (e.g. not both 1 and '1')"
            )
        seen_names.add(name)
        index_of[id(t)] = len(flat.tensors)
        flat.names.append(name)
        flat.tensors.append(t)
    buf = io.BytesIO()
    try:
        _TensorPickler(buf, index_of, flat).dump(state_dict)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise UnsupportedValueError(f"state dict holds a value that cannot be stored: {e}") from e
    flat.skeleton = buf.getvalue()
    return flat


# Globals the skeleton may name. Everything here only builds data; none runs code.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", n): getattr(__import__("builtins"), n)
    for n in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "int",
        "float",
        "complex",
        "str",
        "bool",
        "slice",
        "range",
    )
}
_SAFE_GLOBALS.update(
    {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("collections", "deque"): collections.deque,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "dtype"): torch.dtype,
    }
)


def _optional_safe_globals() -> None:
    import argparse
    import datetime
    import fractions
    import pathlib

    for mod, names in (
        (argparse, ["Namespace"]),
        (datetime, ["datetime", "date", "time", "timedelta", "timezone"]),
        (fractions, ["Fraction"]),
        (pathlib, ["PosixPath", "PurePosixPath", "Path"]),
    ):
        for n in names:
            _SAFE_GLOBALS[(mod.__name__, n)] = getattr(mod, n)
    try:
        import numpy as np
    except ImportError:
        return
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        _SAFE_GLOBALS[(mod, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]
        _SAFE_GLOBALS[(mod, "scalar")] = np.float64(0).__reduce__()[0]
    _SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
    _SAFE_GLOBALS[("numpy", "dtype")] = np.dtype


_optional_safe_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self,
        data: bytes,
        load_tensor: Callable[[int], torch.Tensor],
        extra_globals: dict[tuple[str, str], Any],
        where: str,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._load_tensor = load_tensor
        self._extra = extra_globals
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if key in self._extra:
            return self._extra[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy >= 1.25 dtype classes
            import numpy.dtypes

            obj = getattr(numpy.dtypes, name, None)
            if obj is not None:
                return obj
        raise UnsupportedValueError(
            f"{self._where}: the checkpoint names {module}.{name}, which is not allowed to load. "
            f"If you trust it, pass safe_globals=[{module}.{name}] to the load call."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, int):
            raise CorruptCheckpointError(f"{self._where}: bad tensor reference {pid!r}")
        return self._load_tensor(pid)


def globals_key(obj: Any) -> tuple[str, str]:
    return (obj.__module__, obj.__qualname__)


def restore_state_dict(
    skeleton: bytes,
    load_tensor: Callable[[int], torch.Tensor],
    safe_globals: Iterable[Any] = (),
    where: str = "checkpoint",
) -> Any:
    """Rebuild a state dict from its skeleton; ``load_tensor(i)`` supplies tensor ``i``."""
    extra = {globals_key(g): g for g in safe_globals}
    try:
        return _RestrictedUnpickler(skeleton, load_tensor, extra, where).load()
    except (UnsupportedValueError, CorruptCheckpointError):
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        ImportError,
    ) as e:
        raise CorruptCheckpointError(f"{where}: cannot read the non-tensor part: {e}") from e
