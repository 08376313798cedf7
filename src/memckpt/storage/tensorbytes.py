"""Raw byte views of tensors and buffers, without numpy."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["is_plain_cpu", "tensor_memoryview", "typed_view"]


def is_plain_cpu(t: torch.Tensor) -> bool:
    """True when ``t``'s bytes are exactly its values, laid out contiguously in CPU memory."""
    return (
        t.device.type == "cpu"
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and t.layout == torch.strided
    )


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A writable byte view of a plain CPU tensor's memory (see ``is_plain_cpu``)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def typed_view(
    buf_u8: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` over ``buf_u8[offset:offset+nbytes]`` (no copy)."""
    piece = buf_u8[offset : offset + nbytes]
    if dtype.itemsize != 1 or dtype != torch.uint8:
        piece = piece.view(dtype)
    return piece.view(shape)
