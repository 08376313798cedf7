"""One pass over a staged chunk: its checksum and whether it holds NaN/Inf.

The save's background part hashes every chunk of the staged copy and checks every
floating tensor for non-finite values. Done as two passes (xxhash, then numpy on the
piece while it is in cache) the check costs 80 % of the hashing; fused into the
hash's stripe loop (``memckpt.storage._scan``, C with AVX2/AVX-512) the data is read
once and the check costs next to nothing, since hashing a staged GiB is bound by
memory bandwidth, not by arithmetic.

The kernel is optional: built by ``pip install`` where a C compiler is found, used on
x86-64 CPUs with AVX2 or AVX-512, and replaced by xxhash plus ``memckpt.storage.finite``
(numpy) elsewhere, with the same results (tests/test_scan.py checks both, and the
kernel's portable C form, against each other).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import torch
import xxhash

from memckpt.storage.finite import Check, finite_check, lanes_of

__all__ = ["ChunkScan", "chunk_scanner", "native_level", "use_native"]

log = logging.getLogger(__name__)

try:
    from memckpt.storage import _scan as _native
except ImportError:  # no compiler at install time, or another interpreter
    _native = None

# the numpy fallback checks a chunk in pieces this size, each hashed then checked in cache
_PIECE: Final = 256 << 10


# the kernel runs where the CPU has AVX2 or AVX-512; its portable C form is no faster
# than xxhash plus numpy (both vectorised), so there the fallback runs instead
_MIN_LEVEL: Final = 2
_enabled = _native is not None and _native.set_simd(9) >= _MIN_LEVEL


def native_level() -> int | None:
    """The fused kernel's vector width in use (2 AVX2, 3 AVX-512), or None when the
    numpy fallback runs instead (kernel not built, turned off, or no AVX2)."""
    return int(_native.set_simd(9)) if _enabled and _native is not None else None


def use_native(enabled: bool) -> bool:
    """Turn the fused kernel on or off (benchmarks and tests compare the two); returns
    whether it is in use. Off, or not usable, the numpy fallback gives the same results."""
    global _enabled
    _enabled = enabled and _native is not None and _native.set_simd(9) >= _MIN_LEVEL
    return _enabled


class ChunkScan:
    """Hashes and checks the chunks of one tensor: ``scan(chunk) -> (digest, finite)``.

    ``digest`` is the chunk's xxh3-64 (``format.checksum``) when hashing was asked,
    else 0; ``finite`` is False when the chunk holds NaN/Inf (always True for dtypes
    that cannot, or when no check was asked). A chunk is whole elements.
    """

    def __init__(self, dtype: torch.dtype | None, *, hashed: bool) -> None:
        self.hashed = hashed
        self.lanes = lanes_of(dtype) if dtype is not None else None
        self.check: Check | None = finite_check(dtype) if dtype is not None else None

    @property
    def checks(self) -> bool:
        """Whether this scanner looks for NaN/Inf at all."""
        return self.lanes is not None or self.check is not None

    def scan(self, chunk: Any) -> tuple[int, bool]:
        if not self.checks:  # nothing to check: xxhash alone
            return (xxhash.xxh3_64_intdigest(chunk) if self.hashed else 0), True
        if _enabled and _native is not None:
            width, mask, value = self.lanes or (0, 0, 0)
            digest, finite = _native.scan(chunk, self.hashed, width, mask, value)
            if digest is None:  # 240 bytes or fewer: the short-input forms of xxh3
                digest = xxhash.xxh3_64_intdigest(chunk) if self.hashed else 0
            if self.lanes is None and self.check is not None:  # a dtype the kernel lacks
                finite = self.check(chunk)
            return digest, bool(finite)
        return self._fallback(memoryview(chunk).cast("B"))

    def _fallback(self, mv: memoryview) -> tuple[int, bool]:
        h = xxhash.xxh3_64() if self.hashed else None
        finite = True
        for o in range(0, len(mv), _PIECE):
            piece = mv[o : o + _PIECE]
            if h is not None:
                h.update(piece)
            if self.check is not None and finite and not self.check(piece):
                finite = False
        return (h.intdigest() if h is not None else 0), finite


def chunk_scanner(dtype: torch.dtype | None, *, hashed: bool) -> ChunkScan:
    """A scanner for the chunks of a tensor of ``dtype`` (None: hash only, no check)."""
    return ChunkScan(dtype, hashed=hashed)
