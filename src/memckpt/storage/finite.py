"""Does a staged tensor hold NaN or Inf? Checked on the staged bytes, piece by piece.

Where the fused native kernel runs (``memckpt.storage.scan``: x86-64 with AVX2/AVX-512
and a C compiler at install time) it applies ``lanes_of``'s rule inside the checksum
loop; this module's numpy checks are the fallback elsewhere, and the reference.

A replica or a step whose floats turned NaN/Inf passes every checksum: the bytes are
faithfully NaN. So every save records, per tensor, whether it holds a non-finite value,
computed in the background from the staged copy in the pool buffer (never from the
live tensor, never in the blocking part), piece by piece in the same pass as the
checksum, while the piece is still in cache.

float32/64 and complex pieces are screened with a sum (a BLAS dot product with ones):
NaN and Inf survive any addition (``inf + -inf`` is NaN), so a finite sum proves a
finite piece; a non-finite
sum is either a non-finite value or an overflow of large finite ones, told apart by
``isfinite`` on that piece only. float16, bfloat16 and the float8 types are checked
exactly by their bit patterns (exponent all ones, or their one NaN pattern). Integer,
bool and other non-floating types are always finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import torch

__all__ = ["Check", "finite_check", "is_floating", "lanes_of"]

# formats numpy sums natively: a finite sum proves a finite piece
_SUMMED: Final[dict[str, str]] = {
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<f4",
    "complex128": "<f8",
}

# the one rule of NaN/Inf, for the fused kernel (memckpt.storage.scan) and the numpy bit
# tests below alike: a value is non-finite when (lane & mask) == value, for little-endian
# lanes of this many bytes (exponent all ones; float8 types with one NaN pattern: that)
_LANES: Final[dict[str, tuple[int, int, int]]] = {
    "float32": (4, 0x7F800000, 0x7F800000),
    "complex64": (4, 0x7F800000, 0x7F800000),
    "float64": (8, 0x7FF0000000000000, 0x7FF0000000000000),
    "complex128": (8, 0x7FF0000000000000, 0x7FF0000000000000),
    "float16": (2, 0x7C00, 0x7C00),
    "bfloat16": (2, 0x7F80, 0x7F80),
    "float8_e5m2": (1, 0x7C, 0x7C),  # exponent all ones: Inf or NaN
    "float8_e4m3fn": (1, 0x7F, 0x7F),  # S.1111.111 is NaN; no Inf
    "float8_e4m3fnuz": (1, 0xFF, 0x80),  # the one NaN: negative zero's pattern
    "float8_e5m2fnuz": (1, 0xFF, 0x80),
    "float8_e8m0fnu": (1, 0xFF, 0xFF),
}

_PIECE: Final = 256 << 10  # the writer checks pieces of at most this many bytes
Check = Callable[[Any], bool]  # a buffer (memoryview, bytes, array) -> all finite?


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_floating(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` can be NaN or Inf (floating, complex, float8)."""
    return dtype.is_floating_point or dtype.is_complex


def _sum_screen(np_dtype: str) -> Check:
    ones = np.ones(_PIECE // np.dtype(np_dtype).itemsize, dtype=np_dtype)

    def check(piece: Any) -> bool:
        a = np.frombuffer(piece, dtype=np_dtype)
        w = ones[: len(a)] if len(a) <= len(ones) else np.ones(len(a), dtype=np_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(a, w)):  # BLAS: a third cheaper than a.sum() here
                return True
        return bool(np.isfinite(a).all())  # an overflow of finite values, or not

    return check


def _bits_screen(width: int, mask: int, value: int) -> Check:
    np_dtype = {1: "u1", 2: "<u2"}[width]

    def check(piece: Any) -> bool:
        a = np.frombuffer(piece, dtype=np_dtype) & mask
        if mask == value:  # masked lanes are at most mask: equal to it only when all set
            return int(a.max(initial=0)) < mask
        return not bool((a == value).any())

    return check


def lanes_of(dtype: torch.dtype) -> tuple[int, int, int] | None:
    """``(width, mask, value)``: an element of ``dtype`` is NaN/Inf when some ``width``-byte
    lane of it has ``lane & mask == value``; None for dtypes without such a rule (those
    that are always finite, and floating formats this table does not know)."""
    return _LANES.get(_name(dtype))


@functools.cache
def finite_check(dtype: torch.dtype) -> Check | None:
    """A function telling whether a piece (the bytes of whole elements) is all finite;
    None for dtypes that cannot hold NaN or Inf. Runs in numpy, which releases the GIL
    and uses one core: the copy threads run several pieces side by side. One per dtype
    (cached): the checks keep no state between pieces."""
    name = _name(dtype)
    if name in _SUMMED:
        return _sum_screen(_SUMMED[name])
    if name in _LANES:  # float16, bfloat16, the float8 types: their bits
        return _bits_screen(*_LANES[name])
    if dtype.is_floating_point or dtype.is_complex:  # a format added later: torch decides
        return lambda piece: bool(
            torch.isfinite(torch.frombuffer(bytearray(piece), dtype=dtype)).all()
        )
    return None
