"""The fused hash + NaN/Inf kernel (memckpt.storage._scan) against its references.

Its digest must be xxhash's xxh3-64 for every length and at every vector width the CPU
offers (AVX-512, AVX2, portable C), and its NaN/Inf answer must be torch.isfinite's for
every floating dtype, wherever the bad value sits (first element, last, in the stripe
the hash reads twice, in a tail shorter than a vector). Without the kernel (no compiler
at install time) the numpy fallback must give the same answers; both are tested.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import xxhash

import memckpt
from memckpt.storage import scan
from memckpt.storage.finite import lanes_of

native = pytest.mark.skipif(
    scan._native is None, reason="the native scan kernel is not built (no C compiler?)"
)

FLOAT8 = [
    (torch.float8_e4m3fn, [0x7F, 0xFF]),
    (torch.float8_e5m2, [0x7C, 0xFC, 0x7E]),
    (torch.float8_e4m3fnuz, [0x80]),
    (torch.float8_e5m2fnuz, [0x80]),
]
if hasattr(torch, "float8_e8m0fnu"):
    FLOAT8.append((torch.float8_e8m0fnu, [0xFF]))
FLOATS = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
]
LENGTHS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 60, 61, 64, 65, 100, 255, 256, 1000, 4097, 70001]


def levels() -> list[int]:
    """Every vector width this CPU runs: the kernel falls back to the best it has."""
    if scan._native is None:
        return []
    best = scan._native.set_simd(9)
    out = sorted({scan._native.set_simd(lv) for lv in (0, 2, 3) if lv <= best})
    scan._native.set_simd(9)
    return out


@pytest.fixture(params=levels() or [None], ids=lambda lv: f"simd{lv}")
def level(request):
    if request.param is None:
        pytest.skip("the native scan kernel is not built (no C compiler?)")
    scan._native.set_simd(request.param)
    yield request.param
    scan._native.set_simd(9)


def test_the_digest_is_xxh3_64_for_every_length(level):
    rng = random.Random(level)
    lengths = list(range(0, 1300)) + [1024 * k + d for k in (1, 2, 16, 17) for d in (-1, 0, 1)]
    lengths += [rng.randrange(1300, 400_000) for _ in range(60)] + [4 << 20]
    for n in lengths:
        data = os.urandom(n)
        digest, finite = scan._native.scan(data, True, 0, 0, 0)
        assert finite is True
        if n <= 240:
            assert digest is None, n  # short inputs: the caller hashes them with xxhash
        else:
            assert digest == xxhash.xxh3_64_intdigest(data), n


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _bad_values(dtype: torch.dtype) -> list[complex | float]:
    if dtype.is_complex:
        return [complex(float("nan"), 0), complex(0, float("inf")), complex(-float("inf"), 1)]
    return [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_the_check_agrees_with_isfinite(level, dtype):
    rng = random.Random(str(dtype))
    width, mask, value = lanes_of(dtype)
    for n in LENGTHS:
        for where in (None, 0, n - 1, n // 2, max(0, n - 3)):
            t = torch.randn(n, dtype=torch.complex64) if dtype.is_complex else torch.randn(n)
            t = (t * 1000).to(dtype)
            if where is not None:
                t[where] = rng.choice(_bad_values(dtype))
            data = _raw(t)
            want = bool(torch.isfinite(t).all())
            for hashed in (True, False):
                digest, finite = scan._native.scan(data, hashed, width, mask, value)
                assert finite is want, (dtype, n, where, hashed)
                if hashed and len(data) > 240:
                    assert digest == xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize(("dtype", "patterns"), FLOAT8, ids=lambda v: str(v))
def test_float8_patterns(level, dtype, patterns):
    width, mask, value = lanes_of(dtype)
    for n in LENGTHS:
        good = _raw(torch.linspace(-2, 2, n).to(dtype))
        assert scan._native.scan(good, True, width, mask, value)[1] is True, n
        for pattern in patterns:
            for where in {0, n - 1, n // 2}:
                bad = bytearray(good)
                bad[where] = pattern
                for hashed in (True, False):
                    assert scan._native.scan(bytes(bad), hashed, width, mask, value)[1] is False


@native
def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="width"):
        scan._native.scan(b"x" * 300, True, 3, 0, 0)
    with pytest.raises(ValueError, match="whole 4-byte lanes"):
        scan._native.scan(b"x" * 301, True, 4, 0x7F800000, 0x7F800000)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("dtype", [*FLOATS, torch.int64, torch.float8_e4m3fn], ids=str)
def test_chunk_scanner_native_and_numpy_agree(use_native, dtype):
    if use_native and scan._native is None:
        pytest.skip("the native scan kernel is not built (no C compiler?)")
    scan.use_native(use_native)
    try:
        for n in (3, 100, 70001, 300_000):
            t = torch.arange(n).to(dtype) if not dtype.is_complex else torch.randn(n).to(dtype)
            for poison in (False, True):
                if poison and (dtype.is_floating_point or dtype.is_complex):
                    t = t.clone()
                    t[n - 1] = float("nan")
                data = _raw(t)
                digest, finite = scan.chunk_scanner(dtype, hashed=True).scan(memoryview(data))
                assert digest == xxhash.xxh3_64_intdigest(data)
                assert finite is bool(torch.isfinite(t.to(torch.complex128)).all())
                assert scan.chunk_scanner(dtype, hashed=False).scan(data)[0] == 0
    finally:
        scan.use_native(True)  # the default


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "numpy"])
def test_a_save_finds_the_nan_either_way(tmp_path, use_native):
    """End to end: a NaN in the last element of a multi-chunk bf16 tensor is recorded."""
    if use_native and scan._native is None:
        pytest.skip("the native scan kernel is not built (no C compiler?)")
    scan.use_native(use_native)
    try:
        state = {"w": torch.randn(3 << 20).to(torch.bfloat16), "f": torch.randn(1000)}
        with memckpt.CheckpointManager(tmp_path, "scan", prefault=False) as m:
            assert m.save(1, state).wait().step_finite
            state["w"][-1] = float("inf")
            r = m.save(2, state).wait()
            assert r.committed and not r.step_finite and r.non_finite == ("w",)
            assert m.latest() == 1  # recovery passes over step 2
            loaded = m.load()
            assert loaded is not None and torch.isfinite(loaded["w"].float()).all()
    finally:
        scan.use_native(True)  # the default


def test_native_level_reports_what_runs():
    level = scan.native_level()
    if scan._native is None:
        assert level is None
    else:
        assert level in (0, 2, 3)
        scan.use_native(False)
        try:
            assert scan.native_level() is None
        finally:
            scan.use_native(True)  # the default
