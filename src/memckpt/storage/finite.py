"""Does a staged tensor hold NaN or Inf? Checked on the staged bytes, piece by piece.

A replica or a step whose floats turned NaN/Inf passes every checksum: the bytes are
faithfully NaN. So every save records, per tensor, whether it holds a non-finite value,
computed in the background from the staged copy in the pool buffer (never from the
live tensor, never in the blocking part), piece by piece in the same pass as the
checksum, while the piece is still in cache.

The screen is a sum: NaN and Inf survive any addition (``inf + -inf`` is NaN), so a
finite sum proves a finite piece. A non-finite sum is either a non-finite value or an
overflow of large finite ones, told apart by ``torch.isfinite`` on that piece only.
Float8 types (no sum on CPU) are checked by their bit patterns; integer, bool and
other non-floating types are always finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch

__all__ = ["finite_check", "is_floating"]

# float8 bit patterns of NaN/Inf (on the raw byte): (mask, value) pairs
_FLOAT8_NONFINITE: Final[dict[str, tuple[int, int]]] = {
    "float8_e4m3fn": (0x7F, 0x7F),  # S.1111.111 is NaN; no Inf
    "float8_e5m2": (0x7C, 0x7C),  # exponent all ones: Inf or NaN
    "float8_e4m3fnuz": (0xFF, 0x80),  # the one NaN: negative zero's pattern
    "float8_e5m2fnuz": (0xFF, 0x80),
    "float8_e8m0fnu": (0xFF, 0xFF),
}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_floating(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` can be NaN or Inf (floating, complex, float8)."""
    return dtype.is_floating_point or dtype.is_complex or _name(dtype) in _FLOAT8_NONFINITE


def _sum_screen(dtype: torch.dtype) -> Callable[[torch.Tensor], bool]:
    acc = torch.float32 if dtype == torch.float16 else None  # fp16 sums overflow at 65504

    def check(raw: torch.Tensor) -> bool:
        t = raw.view(dtype)
        if t.is_complex():
            t = torch.view_as_real(t)
        s = t.sum(dtype=acc) if acc is not None else t.sum()
        if bool(torch.isfinite(s)):
            return True
        return bool(torch.isfinite(t).all())  # an overflow of finite values, or not

    return check


def _bits_screen(mask: int, value: int) -> Callable[[torch.Tensor], bool]:
    def check(raw: torch.Tensor) -> bool:
        return not bool(((raw & mask) == value).any())

    return check


def finite_check(dtype: torch.dtype) -> Callable[[torch.Tensor], bool] | None:
    """A function telling whether a piece (a uint8 tensor of whole elements) is all finite;
    None for dtypes that cannot hold NaN or Inf."""
    name = _name(dtype)
    if name in _FLOAT8_NONFINITE:
        return _bits_screen(*_FLOAT8_NONFINITE[name])
    if dtype.is_floating_point or dtype.is_complex:
        return _sum_screen(dtype)
    return None
