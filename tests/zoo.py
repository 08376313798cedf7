"""A state dict exercising every kind of value memckpt must round-trip."""

from __future__ import annotations

import argparse
import collections
import random
from typing import Any

import torch


def all_dtypes() -> list[torch.dtype]:
    names = [
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    ]  # fmt: skip
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


# The zoo holds every bit pattern, NaN and Inf included, on purpose: a load that must
# give them back bit-exactly asks for steps saved holding them (recovery passes over
# such steps by default). Tests that load a zoo set this in their environment.
LOAD_NON_FINITE = {"MEMCKPT_ON_NON_FINITE": "load"}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every bit pattern (NaNs too) must survive."""
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def make_zoo(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=gen)
    tied = torch.randn(4, 4, generator=gen)
    zoo: dict[str, Any] = {
        "dtypes": {str(d): random_tensor(d, (3, 5), gen) for d in all_dtypes()},
        "scalar0d": torch.tensor(3.25),
        "scalar0d_int": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "view": base.view(-1)[5:20],
        "conj": torch.randn(3, dtype=torch.complex64, generator=gen).conj(),
        "big": torch.randn(3 << 20, generator=gen),  # several checksum chunks
        "tied_a": tied,
        "tied_b": tied,
        "requires_grad": torch.randn(3, requires_grad=True, generator=gen),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "list": [torch.ones(2), 1, "two", None, (3.0, b"four")],
        "tuple": (torch.zeros(1), {"deep": {"er": torch.full((2,), 9)}}),
        "ordered": collections.OrderedDict(a=1, b=torch.tensor([1, 2])),
        "numbers": {"int": 2**70, "float": float("inf"), "complex": 1 + 2j, "bool": True},
        "text": "héllo",
        "bytes": b"\x00\xff" * 10,
        "none": None,
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.Random(seed).getstate(),
        "args": argparse.Namespace(lr=0.1, name="x"),
        "int_keys": {0: torch.tensor([0]), 1: "one"},
        "set": {1, 2, 3},
    }
    return zoo


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-exact, type-exact comparison of two state dicts."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        ca = a.detach().resolve_conj().contiguous().reshape(-1)
        cb = b.detach().resolve_conj().contiguous().reshape(-1)
        assert torch.equal(ca.view(torch.uint8), cb.view(torch.uint8)), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, argparse.Namespace):
        assert vars(a) == vars(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
