"""Split a state dict into its tensors and a pickled skeleton, and join them back.

Tensors are pulled out through pickle's ``persistent_id`` hook, so they can sit
anywhere in the structure (dicts, lists, tuples, small objects) and their bytes
never pass through pickle. Each tensor gets a path name (``model.layer.weight``,
``optim.state.0.exp_avg``) used to match keys when loading in place. The same
tensor object reached twice (tied weights) is stored once and comes back as one
object. The skeleton is read back by a restricted unpickler that only builds
plain data types, through constructors that refuse arguments costing more than the
bytes that hold them, and the globals a user explicitly allows (with the members of
allowed Enum classes, in both forms CPython pickles them).
"""

from __future__ import annotations

import builtins
import collections
import datetime
import enum
import fractions
import io
import math
import pickle
import pickletools
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import torch

from memckpt.errors import CorruptCheckpointError, UnsupportedValueError

__all__ = [
    "FlatStateDict",
    "check_skeleton",
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

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is fractions.Fraction:  # its own reduce names the class itself
            if max(obj.numerator.bit_length(), obj.denominator.bit_length()) > _MAX_FRACTION_BITS:
                raise UnsupportedValueError(
                    f"a Fraction of more than {_MAX_FRACTION_BITS} bits cannot be stored; "
                    "store its numerator and denominator"
                )
            return (fraction, (obj.numerator, obj.denominator))
        if isinstance(obj, type) and obj in _CHECKED_TYPES:
            # The loader calls these only through checked constructors (see _SAFE_GLOBALS):
            # the type itself would come back as one, so refuse it here rather than there.
            raise UnsupportedValueError(
                f"the state dict holds the type {obj.__name__} itself, which memckpt does not "
                f"store; store its name ('{obj.__name__}') instead"
            )
        return _reduce_numpy(obj)

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


# -- numpy values ---------------------------------------------------------------------------
# numpy's own pickles rebuild arrays through ndarray.__setstate__ and dtype.__setstate__,
# which trust their input: a crafted dtype state can claim to hold Python objects and make
# raw bytes be read as pointers (a crash, or worse), and it mutates numpy's shared dtype
# singletons. Plain arrays and scalars are therefore stored through the two constructors
# below, which check what they are given and never put a dtype where the skeleton could
# reach it; anything else of numpy's (dtype values, object arrays, structured dtypes)
# needs an explicit safe_globals opt-in.


def _plain_numpy_dtype(code: Any) -> Any:
    import numpy as np

    if not isinstance(code, str) or len(code) > 64:
        raise ValueError(f"numpy dtype code {str(code)[:40]!r} is not a short string")
    dtype = np.dtype(code)
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise ValueError(f"numpy dtype {code!r} is not a plain dtype")
    return dtype


# numpy_array, numpy_scalar and fraction are named in skeletons: their names and
# arguments are part of the object format.
def numpy_array(code: str, shape: tuple[int, ...], order: str, data: bytes) -> Any:
    """A numpy array of a plain dtype from its raw bytes (the stored form of an ndarray)."""
    import numpy as np

    dtype = _plain_numpy_dtype(code)
    if not (isinstance(shape, tuple) and all(_is_size(d) for d in shape) and order in "CF"):
        raise ValueError(f"numpy array of shape {str(shape)[:60]} order {str(order)[:4]!r}")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"numpy array {shape} {dtype} given {len(data)} bytes")
    return np.frombuffer(bytearray(data), dtype).reshape(shape, order=order)


def numpy_scalar(code: str, data: bytes) -> Any:
    """A numpy scalar of a plain dtype from its raw bytes."""
    dtype = _plain_numpy_dtype(code)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"numpy {dtype} scalar given {len(data)} bytes")
    import numpy as np

    return np.frombuffer(data, dtype)[0]


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def _reduce_numpy(obj: Any) -> Any:
    """How ``_TensorPickler`` stores a numpy value; NotImplemented: pickle's default."""
    np = sys.modules.get("numpy")
    if np is None or not isinstance(obj, (np.ndarray, np.generic, np.dtype)):
        return NotImplemented
    dtype = obj if isinstance(obj, np.dtype) else obj.dtype
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        return NotImplemented
    if isinstance(obj, np.dtype) or dtype.itemsize == 0:
        return NotImplemented
    if type(obj) is np.ndarray:
        order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
        return (numpy_array, (dtype.str, obj.shape, order, obj.tobytes(order=order)))
    if type(obj) is dtype.type:
        return (numpy_scalar, (dtype.str, obj.tobytes()))
    return NotImplemented


# -- what the skeleton may call ----------------------------------------------------------------
# A skeleton is a program: every global it names can be called with arguments it chooses.
# Those allowed below build data from data the skeleton holds, in time and memory in
# proportion to it. Constructors that can do more from a few bytes are wrapped to refuse
# such arguments (Fraction('1e99999999') computes a 10**99999999; bytearray(3 << 30) and
# str(a structure that shares itself) allocate or run from a number), or are left out
# (range, which makes deque(range(2**62), 1) and list(range(2**62)) out of 20 bytes).
_FRACTION_TEXT: Final = re.compile(r"[+-]?[0-9]{1,4300}(?:/[0-9]{1,4300})?")
_MAX_FRACTION_BITS: Final = 1 << 16


def fraction(*args: Any) -> Any:
    """fractions.Fraction from integers or ``'n/d'`` text only (no exponent, no decimals)."""
    if len(args) == 1 and isinstance(args[0], str):
        if _FRACTION_TEXT.fullmatch(args[0]) is None:
            raise ValueError(f"Fraction({args[0][:40]!r}): only 'n/d' text is read")
    elif not (
        1 <= len(args) <= 2
        and all(
            isinstance(a, int) and not isinstance(a, bool) and a.bit_length() <= _MAX_FRACTION_BITS
            for a in args
        )
    ):
        raise ValueError(
            f"Fraction of {', '.join(type(a).__name__ for a in args)}: "
            f"only integers of up to {_MAX_FRACTION_BITS} bits are read"
        )
    return fractions.Fraction(*args)


def _from_stored_data(kind: type) -> Callable[..., Any]:
    """``kind`` (bytes or bytearray) from stored bytes, text or a list, never from a size."""

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
            raise ValueError(
                f"{kind.__name__}() of a {type(args[0]).__name__}: only stored bytes, text or "
                "lists are read (a number would allocate that many bytes)"
            )
        return kind(*args)

    build.__name__ = build.__qualname__ = kind.__name__
    return build


def _text(*args: Any) -> str:
    """str of text, or of bytes with an encoding; never the repr of a structure."""
    if args and not (
        (len(args) == 1 and isinstance(args[0], str))
        or (len(args) >= 2 and isinstance(args[0], (bytes, bytearray)))
    ):
        raise ValueError(
            f"str() of a {type(args[0]).__name__}: only text, or bytes with an encoding, is read"
        )
    return str(*args)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", n): getattr(builtins, n)
    for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
              "slice")
}  # fmt: skip
_SAFE_GLOBALS.update(
    {
        ("builtins", "bytes"): _from_stored_data(bytes),
        ("builtins", "bytearray"): _from_stored_data(bytearray),
        ("builtins", "str"): _text,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("collections", "deque"): collections.deque,
        ("fractions", "Fraction"): fraction,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "dtype"): torch.dtype,
        (__name__, "fraction"): fraction,
        (__name__, "numpy_array"): numpy_array,
        (__name__, "numpy_scalar"): numpy_scalar,
    }
)
_CHECKED_TYPES: Final = frozenset({str, bytes, bytearray, fractions.Fraction})
# A dtype is pickled by name (torch.float32). Names are checked against this fixed set
# before any lookup: getattr(torch, name) of another name imports parts of torch lazily.
_TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)
}


def _optional_safe_globals() -> None:
    import argparse
    import pathlib

    for mod, names in (
        (argparse, ["Namespace"]),
        (datetime, ["datetime", "date", "time", "timedelta", "timezone"]),
        (pathlib, ["PosixPath", "PurePosixPath", "Path"]),
    ):
        for n in names:
            _SAFE_GLOBALS[(mod.__name__, n)] = getattr(mod, n)


_optional_safe_globals()


class _Unknown:
    """Stands in for a global that is not allowed, so a skeleton's structure can be checked
    without running code the checker does not trust (see ``check_skeleton``)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unknown:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Unknown:  # getattr(cls, "method")(...)
        return _Unknown()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _without_unknown_tzinfo(kind: type) -> Callable[..., Any]:
    """``kind`` (datetime or time) for the structure check: a tzinfo of a class that is not
    allowed (zoneinfo, pytz) may be allowed at load time, so it is left out of the check."""

    def build(*args: Any) -> Any:
        return kind(*(a for a in args if not isinstance(a, _Unknown)))

    return build


# What the structure check calls instead of an allowed global.
_CHECK_ONLY_GLOBALS: dict[tuple[str, str], Any] = {
    ("datetime", "datetime"): _without_unknown_tzinfo(datetime.datetime),
    ("datetime", "time"): _without_unknown_tzinfo(datetime.time),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self,
        data: bytes,
        load_tensor: Callable[[int], torch.Tensor],
        extra_globals: dict[tuple[str, str], Any] | None,
        where: str,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._load_tensor = load_tensor
        self._extra = extra_globals  # None: check only, unknown globals become _Unknown
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if self._extra is None and key in _CHECK_ONLY_GLOBALS:
            return _CHECK_ONLY_GLOBALS[key]
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if self._extra is None:
            return _Unknown
        if key in self._extra:
            return self._extra[key]
        if key == ("builtins", "getattr"):
            return self._enum_member
        raise UnsupportedValueError(
            f"{self._where}: the checkpoint names {module}.{name}, which is not allowed to load. "
            f"If you trust it, pass safe_globals=[{module}.{name}] to the load call."
        )

    def _enum_member(self, *args: Any) -> Any:
        """``getattr(cls, name)`` of an allowed Enum class and one of its member names only.

        Some CPython 3.11 releases (3.11.2, for one) pickle an Enum member by name, as
        ``getattr(cls, name)``; others by value, as ``cls(value)``. Both load; any other
        getattr is refused, so it never reaches an attribute that is not a member.
        """
        if len(args) == 2:
            cls, name = args
            if (
                isinstance(cls, type)
                and issubclass(cls, enum.Enum)
                and self._allows(cls)
                and isinstance(name, str)
                and name in cls.__members__
            ):
                return cls.__members__[name]
        # never the repr of a structure: a pickle can share one into an exponential repr
        shown = ", ".join(
            f"{a.__module__}.{a.__qualname__}" if isinstance(a, type)
            else repr(a[:60]) if isinstance(a, str)
            else f"<{type(a).__name__}>"
            for a in args
        )  # fmt: skip
        raise UnsupportedValueError(
            f"{self._where}: the checkpoint calls builtins.getattr({shown}), which is not "
            "allowed to load: only a member of an allowed Enum class is read this way"
        )

    def _allows(self, obj: Any) -> bool:
        """Whether ``obj`` is one of the globals this load allows (not merely equal to one)."""
        return any(v is obj for v in _SAFE_GLOBALS.values()) or any(
            v is obj for v in (self._extra or {}).values()
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, int) or isinstance(pid, bool):
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
    """Rebuild a state dict from its skeleton; ``load_tensor(i)`` supplies tensor ``i``.

    Any fault of the skeleton is a CorruptCheckpointError naming ``where``; a global
    neither allowed nor in ``safe_globals`` is an UnsupportedValueError.
    """
    extra = {globals_key(g): g for g in safe_globals}
    return _unpickle(skeleton, load_tensor, extra, where)


def check_skeleton(skeleton: bytes, num_tensors: int, where: str) -> None:
    """Check that a skeleton unpickles, refers only to its tensors, and builds nothing costly.

    Globals that are not allowed are not called (nor imported): the user may allow them at
    load time. Raises CorruptCheckpointError naming ``where``.
    """
    empty = torch.empty(0)

    def load(i: int) -> torch.Tensor:
        if not 0 <= i < num_tensors:
            raise CorruptCheckpointError(f"{where}: tensor reference {i} out of range")
        return empty

    _unpickle(skeleton, load, None, where)


MAX_SHARED_EXPANSION = 1 << 20
"""Elements a hashable structure may expand to through pickle's memo (see _check_sharing)."""

_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_ARG_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}  # pickletools' TAKEN_FROM_ARGUMENT{1,4,4U,8U}
_TUPLE_OPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _check_sharing(data: bytes, where: str, limit: int = MAX_SHARED_EXPANSION) -> None:
    """Refuse a pickle whose tuples, through shared memo entries, expand beyond ``limit``.

    A few hundred bytes can nest a tuple 40 deep with both halves of every level the
    same memo entry; unpickling is quick, but hashing it (as a dict key) visits 2**40
    elements. This walks the opcodes without building anything or copying byte
    payloads and tracks the expanded size of every tuple and frozenset; any other
    value counts as one. Malformed streams are left to the unpickler to report.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    pos, n = 0, len(data)
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}

    def pop_to_mark() -> list[int]:
        if not marks:
            return []
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def expanded(items: list[int]) -> int:
        size = 1 + sum(items)
        if size > limit:
            raise CorruptCheckpointError(
                f"{where}: the non-tensor part builds a structure of more than {limit} "
                "elements out of shared pieces (hashing it would not finish); the object was "
                "crafted or damaged: load another step"
            )
        return size

    while pos < n:
        op = _OPCODES.get(data[pos : pos + 1])
        pos += 1
        if op is None:
            return
        arg = b""
        if op.arg is not None:
            k = op.arg.n
            if k >= 0:
                arg, pos = data[pos : pos + k], pos + k
            elif k == -1:  # text lines; GLOBAL and INST carry two
                for _ in range(2 if op.name in ("GLOBAL", "INST") else 1):
                    end = data.find(b"\n", pos)
                    if end < 0:
                        return
                    arg, pos = data[pos:end], end + 1
            else:
                width = _ARG_WIDTH[k]
                length = int.from_bytes(data[pos : pos + width], "little", signed=k == -3)
                pos += width + max(length, 0)
        name = op.name
        if name == "STOP":
            return
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            key = len(memo) if name == "MEMOIZE" else _memo_key(name, arg)
            if key is not None and stack:
                memo[key] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            key = _memo_key(name, arg)
            stack.append(memo.get(key, 1) if key is not None else 1)
        elif name == "DUP":
            stack.append(stack[-1] if stack else 1)
        elif name in _TUPLE_OPS:
            k = _TUPLE_OPS[name]
            items = stack[-k:] if len(stack) >= k else list(stack)
            del stack[len(stack) - len(items) :]
            stack.append(expanded(items))
        elif name in ("TUPLE", "FROZENSET"):
            stack.append(expanded(pop_to_mark()))
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                if stack:
                    stack.pop()
            stack.extend(1 for _ in op.stack_after)


def _memo_key(name: str, arg: bytes) -> int | None:
    try:
        if name in ("GET", "PUT"):
            return int(arg)
        return int.from_bytes(arg, "little")
    except ValueError:
        return None


def _unpickle(
    skeleton: bytes,
    load_tensor: Callable[[int], torch.Tensor],
    extra: dict[tuple[str, str], Any] | None,
    where: str,
) -> Any:
    _check_sharing(skeleton, where)
    try:
        return _RestrictedUnpickler(skeleton, load_tensor, extra, where).load()
    except (UnsupportedValueError, CorruptCheckpointError, MemoryError):
        raise
    except Exception as e:  # a skeleton is untrusted input: whatever it makes fail, it is damaged
        raise CorruptCheckpointError(
            f"{where}: cannot read the non-tensor part ({type(e).__name__}: {e}); the object "
            "is damaged or was not written by memckpt: load another step"
        ) from e
