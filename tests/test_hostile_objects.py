"""Objects crafted with valid checksums: each is refused quickly, as CorruptCheckpointError.

A peer holding the secret, or a bug, can write an object whose every checksum is right
and whose content asks the reader for minutes of work or gigabytes of memory, or holds
values that make torch raise. Each case here is built with the format module's encode
functions, so only the content is hostile, and must be refused in well under 2 s, naming
the object, by every reader: ObjectReader, load_object, ObjectReader.verify (the CLI),
verify_object_bytes (the transfer server), and CheckpointManager.load, which then falls
back to the older intact step. (A skeleton naming a global that is not allowed stays an
UnsupportedValueError at load, which the caller resolves with safe_globals.)
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import fractions
import io
import json
import os
import pickle
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import memckpt
from memckpt.errors import CorruptCheckpointError, UnsupportedValueError
from memckpt.storage.format import (
    HEADER_SIZE,
    MAX_CHUNK_SIZE,
    ObjectHeader,
    align,
    checksum,
    decode_header,
    encode_header,
)
from memckpt.storage.manifest import ObjectDigest, read_manifest, write_manifest
from memckpt.storage.reader import ObjectReader, verify_object_bytes
from memckpt.storage.statedict import flatten_state_dict
from memckpt.tools.cli import main as cli_main

FAST_S = 2.0

# -- building objects -------------------------------------------------------------------------


@dataclasses.dataclass
class Sections:
    """An object's parts: the index as JSON text, the skeleton and the data section."""

    index: bytes
    skeleton: bytes
    data: bytes


def read_object(path: Path) -> Sections:
    raw = path.read_bytes()
    h = decode_header(raw[:HEADER_SIZE], str(path), len(raw))
    return Sections(
        raw[h.index_offset : h.index_offset + h.index_length],
        raw[h.objects_offset : h.objects_offset + h.objects_length],
        raw[h.data_offset : h.data_offset + h.data_length],
    )


def write_object(path: Path, s: Sections, data_length: int | None = None) -> None:
    """Write ``s`` as an object with valid checksums; past ``s.data`` the data is a hole."""
    data_length = len(s.data) if data_length is None else data_length
    index_offset = align(HEADER_SIZE + data_length)
    objects_offset = align(index_offset + len(s.index))
    header = ObjectHeader(
        HEADER_SIZE, data_length,
        index_offset, len(s.index), checksum(s.index),
        objects_offset, len(s.skeleton), checksum(s.skeleton),
    )  # fmt: skip
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for off, part in ((HEADER_SIZE, s.data), (index_offset, s.index),
                          (objects_offset, s.skeleton)):  # fmt: skip
            os.pwrite(fd, part, off)
        os.ftruncate(fd, objects_offset + len(s.skeleton))
        os.pwrite(fd, encode_header(header), 0)
    finally:
        os.close(fd)
    _fix_manifest(path)


def _fix_manifest(obj: Path) -> None:
    """Make the step's manifest name the rewritten object, as a writer with the secret would."""
    mpath = obj.parent / "manifest.json"
    m = read_manifest(mpath)
    if m is None:
        return
    with open(obj, "rb") as f:
        digest = decode_header(f.read(HEADER_SIZE), str(obj)).digest
    rank = int(obj.name.removeprefix("rank-").removesuffix(".mck"))
    objects = {**m.objects, rank: ObjectDigest(obj.stat().st_size, digest)}
    write_manifest(mpath, dataclasses.replace(m, objects=objects))


def edit_index(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    s = read_object(path)
    doc = json.loads(s.index)
    edit(doc)
    write_object(path, dataclasses.replace(s, index=json.dumps(doc).encode()))


def replace_skeleton(path: Path, value: Any) -> None:
    s = read_object(path)
    write_object(path, dataclasses.replace(s, skeleton=skeleton_of(value)))


class Calls:
    """Pickles as the call ``fn(*args)``: what a crafted skeleton can ask the loader to run."""

    def __init__(self, fn: Any, *args: Any, state: Any = None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self) -> Any:
        return (self.fn, self.args, self.state)


class TensorRef:
    """Pickles as a reference to stored tensor ``i``."""

    def __init__(self, i: Any) -> None:
        self.i = i


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.i if isinstance(obj, TensorRef) else None


def skeleton_of(value: Any) -> bytes:
    buf = io.BytesIO()
    _RefPickler(buf, protocol=5).dump(value)
    return buf.getvalue()


def _shared_nest(depth: int) -> list[Any]:
    """A list nesting itself ``depth`` times through shared references: 2**depth to print."""
    x: list[Any] = []
    for _ in range(depth):
        x = [x, x]
    return x


def _zeros_checksum(n: int) -> int:
    h, block = xxhash.xxh3_64(), bytes(4 << 20)
    for o in range(0, n, len(block)):
        h.update(memoryview(block)[: min(len(block), n - o)])
    return h.intdigest()


def sparse_object(path: Path, nbytes: int, chunk_size: int) -> None:
    """One uint8 tensor of ``nbytes`` zeros that the file does not store (a hole)."""
    n_chunks = -(-nbytes // chunk_size)
    assert nbytes % chunk_size == 0
    doc = {
        "format": 1, "job_id": "job", "step": 2, "rank": 0, "world_size": 1,
        "chunk_size": chunk_size, "created_unix": 0.0, "extra": {},
        "tensors": [["w", "uint8", [nbytes], HEADER_SIZE, nbytes,
                     [_zeros_checksum(chunk_size)] * n_chunks, "cpu", False, False]],
    }  # fmt: skip
    skeleton = flatten_state_dict({"w": torch.empty(0)}).skeleton
    write_object(path, Sections(json.dumps(doc).encode(), skeleton, b""), data_length=nbytes)


# -- the hostile contents -----------------------------------------------------------------------


def _set_tensor_field(i: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["tensors"][0][i] = value

    return edit


def _int_tensor_requires_grad(doc: dict[str, Any]) -> None:
    t = next(t for t in doc["tensors"] if t[1] == "int64")
    t[7] = True


def _huge_shape(doc: dict[str, Any]) -> None:
    doc["tensors"].append(["huge", "float32", [0, 1 << 62, 1 << 62], HEADER_SIZE, 0,
                           [checksum(b"")], "cpu", False, False])  # fmt: skip


def _deep_json(path: Path) -> None:
    s = read_object(path)
    deep = b'{"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    index = s.index.replace(b'"extra":{}', b'"extra":' + deep)
    assert index != s.index
    write_object(path, dataclasses.replace(s, index=index))


def _chunk_size(size: int) -> Callable[[Path], None]:
    """Rewrite with another chunk size, every chunk checksum recomputed (all valid)."""

    def craft(path: Path) -> None:
        s = read_object(path)
        doc = json.loads(s.index)
        doc["chunk_size"] = size
        for t in doc["tensors"]:
            rel = t[3] - HEADER_SIZE
            body = memoryview(s.data)[rel : rel + t[4]]
            t[5] = [checksum(body[c : c + size]) for c in range(0, max(t[4], 1), size)]
        write_object(path, dataclasses.replace(s, index=json.dumps(doc).encode()))

    return craft


INDEX_CRAFTS: dict[str, Callable[[Path], None]] = {
    "unknown-device": lambda p: edit_index(p, _set_tensor_field(6, "tpu:0")),
    "negative-cuda-index": lambda p: edit_index(p, _set_tensor_field(6, "cuda:-1")),
    "int-requires-grad": lambda p: edit_index(p, _int_tensor_requires_grad),
    "huge-shape": lambda p: edit_index(p, _huge_shape),
    "string-created-unix": lambda p: edit_index(p, lambda d: d.update(created_unix="yesterday")),
    "deep-json": _deep_json,
    "5GiB-chunk-size": _chunk_size(5 << 30),
    "sparse-6GiB-tensor": lambda p: sparse_object(p, 6 << 30, 4 << 20),
    "sparse-32TiB-tensor": lambda p: sparse_object(p, 32 << 40, MAX_CHUNK_SIZE),
}

_rng = random.Random(0)
SKELETON_CRAFTS: dict[str, Any] = {
    "fraction-exponent": Calls(fractions.Fraction, "1e99999999"),
    # a 1 MB skeleton: the gcd of two 4-Mbit integers takes ~30 s
    "fraction-huge-ints": Calls(
        fractions.Fraction, _rng.getrandbits(4_000_000) | 1, _rng.getrandbits(3_999_000) | 1
    ),
    "bytearray-of-size": Calls(bytearray, 3 << 30),
    "bytes-of-size": Calls(bytes, 3 << 30),
    "str-of-shared-nest": Calls(str, _shared_nest(64)),
    "unknown-torch-device": Calls(torch.device, "tpu"),
    "timedelta-overflow": Calls(datetime.timedelta, 10**12),
    "tensor-ref-out-of-range": TensorRef(7),
    "tensor-ref-not-int": TensorRef("w"),
    "int-of-text": Calls(int, "x"),
}


def _save(base: Path, steps: tuple[int, ...] = (1, 2)) -> Path:
    with memckpt.CheckpointManager(base, "job", keep_last=5) as m:
        for s in steps:
            sd = {"w": torch.full((1000,), float(s)), "n": torch.arange(4), "meta": {"s": s}}
            m.save(s, sd).wait()
    return base / "job"


def _refused_quickly(fn: Callable[[], Any], where: Path) -> float:
    t0 = time.perf_counter()
    with pytest.raises(CorruptCheckpointError) as err:
        fn()
    took = time.perf_counter() - t0
    assert str(where) in str(err.value)
    assert took < FAST_S, f"took {took:.1f}s: {err.value}"
    return took


# -- 4 and 5: every reader refuses, quickly ----------------------------------------------------


@pytest.mark.parametrize("craft", INDEX_CRAFTS, ids=str)
def test_crafted_index_is_refused_quickly_by_every_reader(shm_dir, craft):
    # Given an object whose checksums are valid but whose index is hostile
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    INDEX_CRAFTS[craft](obj)
    tracemalloc.start()
    try:
        # When any reader opens it, Then it is CorruptCheckpointError naming the object
        _refused_quickly(lambda: ObjectReader(obj), obj)
        _refused_quickly(lambda: memckpt.load_object(obj), obj)
        if obj.stat().st_blocks * 512 >= obj.stat().st_size:  # a sparse file is not read in
            view = memoryview(obj.read_bytes())
            _refused_quickly(lambda: verify_object_bytes(view, str(obj)), obj)
        # and nothing large was allocated on the way
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("craft", SKELETON_CRAFTS, ids=str)
def test_crafted_skeleton_is_refused_quickly_by_every_reader(shm_dir, craft):
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    replace_skeleton(obj, {"w": SKELETON_CRAFTS[craft]})
    tracemalloc.start()
    try:
        _refused_quickly(lambda: memckpt.load_object(obj), obj)

        def verify() -> None:
            with ObjectReader(obj) as r:
                r.verify()

        _refused_quickly(verify, obj)
        view = memoryview(obj.read_bytes())
        _refused_quickly(lambda: verify_object_bytes(view, str(obj)), obj)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_deque_of_range_is_refused_and_range_needs_an_opt_in(shm_dir):
    # deque(range(2**62), 1) never finishes; range is allowed only when the caller says so
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    replace_skeleton(obj, {"w": Calls(collections.deque, range(2**62), 1)})
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedValueError, match=r"builtins\.range.*safe_globals"):
        memckpt.load_object(obj)
    # the structure checks call no global they do not allow, and no deque takes that
    with ObjectReader(obj) as r:
        _refused_quickly(r.verify, obj)
    _refused_quickly(lambda: verify_object_bytes(memoryview(obj.read_bytes()), str(obj)), obj)
    assert time.perf_counter() - t0 < FAST_S
    replace_skeleton(obj, {"r": range(2**62)})
    assert memckpt.load_object(obj, safe_globals=[range])["r"] == range(2**62)


def test_verify_reads_in_small_pieces_whatever_the_chunk_size(shm_dir):
    # Given an intact object written with the largest chunk size the format allows
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    _chunk_size(MAX_CHUNK_SIZE)(obj)
    # When it is verified, Then it is intact and verify did not allocate a chunk-sized buffer
    tracemalloc.start()
    try:
        with ObjectReader(obj) as r:
            assert r.verify() == []
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    assert torch.equal(memckpt.load_object(obj)["w"], torch.full((1000,), 2.0))


def test_numpy_pickles_never_reach_numpys_setstate_by_default(shm_dir):
    # numpy's own ndarray/dtype pickles trust their state: an object array whose list is
    # shorter than its shape crashes the process in ndarray.__setstate__
    np = pytest.importorskip("numpy")
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    crash = Calls(reconstruct, np.ndarray, (0,), b"b",
                  state=(1, (1000,), np.dtype("O"), False, [1, 2]))  # fmt: skip
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    replace_skeleton(obj, {"a": crash})
    with pytest.raises(UnsupportedValueError, match=r"_reconstruct.*safe_globals"):
        memckpt.load_object(obj)
    # the structure checks of verify and the transfer server call none of numpy's globals
    with ObjectReader(obj) as r:
        assert r.verify() == []
    verify_object_bytes(memoryview(obj.read_bytes()), str(obj))


def test_allowlist_never_looks_names_up_in_torch(shm_dir):
    # Given a skeleton naming a torch attribute that is no dtype (a lazily imported module)
    obj = _save(shm_dir, (2,)) / "step-2" / "rank-0.mck"
    s = read_object(obj)
    sk = b"\x80\x05\x8c\x05torch\x8c\x07_dynamo\x93."  # STACK_GLOBAL torch._dynamo
    write_object(obj, dataclasses.replace(s, skeleton=sk))
    before = set(sys.modules)
    with pytest.raises(UnsupportedValueError, match=r"torch\._dynamo"):
        memckpt.load_object(obj)
    # Then nothing was imported to answer the question
    assert not {m for m in set(sys.modules) - before if m.startswith("torch")}


# -- 5: the collective fallback and the CLI ------------------------------------------------------

FALLBACK_CRAFTS = {
    "unknown-device": INDEX_CRAFTS["unknown-device"],
    "int-requires-grad": INDEX_CRAFTS["int-requires-grad"],
    "huge-shape": INDEX_CRAFTS["huge-shape"],
    "string-created-unix": INDEX_CRAFTS["string-created-unix"],
    "deep-json": INDEX_CRAFTS["deep-json"],
    "sparse-6GiB-tensor": INDEX_CRAFTS["sparse-6GiB-tensor"],
    "fraction-exponent": lambda p: replace_skeleton(p, SKELETON_CRAFTS["fraction-exponent"]),
    "str-of-shared-nest": lambda p: replace_skeleton(p, SKELETON_CRAFTS["str-of-shared-nest"]),
}


@pytest.mark.parametrize("craft", FALLBACK_CRAFTS, ids=str)
def test_manager_falls_back_to_the_intact_older_step(shm_dir, craft):
    # Given an intact step 1 and a step 2 crafted with valid checksums and manifest
    job = _save(shm_dir)
    FALLBACK_CRAFTS[craft](job / "step-2" / "rank-0.mck")
    # When the newest step is loaded
    t0 = time.perf_counter()
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        out = m.load()
        # Then the damage takes part in the vote and step 1 is loaded instead
        assert m.last_load.step == 1 and m.last_load.fell_back_from == (2,)
        with pytest.raises(CorruptCheckpointError, match=r"step-2/rank-0\.mck"):
            m.load(step=2)
    assert torch.equal(out["w"], torch.full((1000,), 1.0)) and out["meta"] == {"s": 1}
    assert time.perf_counter() - t0 < 10


def test_cli_reports_crafted_objects_without_tracebacks(shm_dir, capsys):
    # Given steps 1..3, step 2 with a hostile index and step 3 with a hostile skeleton
    job = _save(shm_dir, (1, 2, 3))
    INDEX_CRAFTS["deep-json"](job / "step-2" / "rank-0.mck")
    replace_skeleton(job / "step-3" / "rank-0.mck", SKELETON_CRAFTS["fraction-exponent"])
    capsys.readouterr()
    # ls lists every step; step 2 is damaged and incomplete, the others complete (exit 1:
    # damage found)
    assert cli_main(["ls", str(shm_dir), "--json"]) == 1
    (doc,) = json.loads(capsys.readouterr().out)
    steps = {s["step"]: s for s in doc["steps"]}
    assert sorted(steps) == [1, 2, 3]
    assert steps[2]["damaged"] == [0] and not steps[2]["complete"]
    assert steps[1]["complete"] and steps[3]["complete"]
    # inspect shows the damage as data
    assert cli_main(["inspect", str(job), "--step", "2", "--json"]) == 1
    (o,) = json.loads(capsys.readouterr().out)["objects"]
    assert "malformed index" in o["error"] or "not valid JSON" in o["error"]
    assert cli_main(["inspect", str(job), "--step", "2"]) == 1
    assert "damaged:" in capsys.readouterr().out
    # verify names both objects and exits 1
    assert cli_main(["verify", str(job), "--json"]) == 1
    out = capsys.readouterr()
    damaged = json.loads(out.out)["damaged"]
    assert sorted(Path(p).parent.name for p in damaged) == ["step-2", "step-3"]
    assert "Fraction" in damaged[str(job / "step-3" / "rank-0.mck")]
    assert cli_main(["verify", str(job), "--step", "1"]) == 0
    assert "Traceback" not in out.err + capsys.readouterr().err


# -- 3: every read completes, whatever the kernel returns per call -----------------------------


def test_reads_complete_when_the_kernel_returns_short_reads(shm_dir, monkeypatch):
    # Given an object, and a kernel that returns at most 1000 bytes per read call (as Linux
    # returns at most 0x7ffff000 bytes per call, on any file)
    job = _save(shm_dir, (2,))
    obj = job / "step-2" / "rank-0.mck"
    pread, preadv = os.pread, os.preadv
    monkeypatch.setattr(os, "pread", lambda fd, n, off: pread(fd, min(n, 1000), off))
    monkeypatch.setattr(
        os, "preadv", lambda fd, bufs, off: preadv(fd, [memoryview(bufs[0])[:1000]], off)
    )
    # Then opening, verifying and loading all read every byte
    with ObjectReader(obj) as r:
        assert r.verify() == []
    out = memckpt.load_object(obj)
    assert torch.equal(out["w"], torch.full((1000,), 2.0)) and out["meta"] == {"s": 2}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_non_tensor_part_over_2GiB_round_trips(shm_dir):
    # Given a state whose non-tensor part is 2.2 GB: more than one read call returns
    n = 2_200_000_000
    # this test's own peak (the process ran other tests before): reset VmHWM, read it at the end
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"blob": bytes(n)}).wait()
    # When it is loaded and verified
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        out = m.load()
        assert m.last_load.step == 1
    blob = out.pop("blob")
    assert len(blob) == n and blob.count(0, n - 4096) == 4096
    del blob
    assert cli_main(["verify", str(shm_dir / "job")]) == 0
    # and memory stayed within a few copies of the value
    status = Path("/proc/self/status").read_text()
    peak_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]
    )
    assert peak_kib * 1024 < 5 * n


def test_tuples_shared_through_the_memo_are_refused_before_hashing(shm_dir):
    import time

    from memckpt.storage.statedict import restore_state_dict

    # Given 172 bytes of pickle: a tuple nested 40 deep, both halves of every level the same
    # memo entry, used as a dict key (hashing it would visit 2**40 elements)
    body = b"}\x94))\x86\x94" + b"".join(b"h" + bytes([k]) + b"\x86\x94" for k in range(1, 41))
    raw = b"\x80\x05" + body + b"K\x01s."
    # When it is loaded, Then it is refused at once as damaged
    t0 = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="shared pieces"):
        restore_state_dict(raw, lambda i: None, where="crafted")
    assert time.perf_counter() - t0 < 2
