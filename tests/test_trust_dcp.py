"""No checkpoint bytes run code on load: DCP bytes items, DCP's .metadata and Enum members.

A memory checkpoint is read from the job's tree and from peers; whoever can write there
must not get to run code in the process that loads it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import pathlib
import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import WriteItemType

import memckpt.adapters.dcp as dcp_adapter
from memckpt.adapters.dcp import MemoryStorageReader, MemoryStorageWriter, checkpoint_id, close
from memckpt.errors import CorruptCheckpointError, UnsupportedValueError
from memckpt.storage.manifest import read_manifest
from memckpt.storage.statedict import check_skeleton, restore_state_dict
from multiproc import free_port

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _close_runtimes():
    yield
    close()


class Touch:
    """Unpickling it creates ``path``: stands for any code a planted pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


@dataclasses.dataclass
class Point:
    """A harmless user class: loads only when the reader is told it may."""

    x: int
    y: int


class OwnPlanner(DefaultLoadPlanner):
    """A user's planner: unpickles bytes items as DCP's does (``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=False)


def _failure(err: BaseException) -> BaseException:
    """The error a rank raised inside DCP's CheckpointException."""
    assert isinstance(err, CheckpointException), err
    (failure,) = err.failures.values()
    return failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)


def _no_tensors(i: int) -> torch.Tensor:
    raise AssertionError(f"tensor {i} asked for")


# -- bytes items --------------------------------------------------------------------------------


@pytest.mark.parametrize("planner", [None, DefaultLoadPlanner, OwnPlanner])
def test_a_planted_bytes_item_is_refused_and_runs_nothing(shm_dir, tmp_path, planner):
    # Given a step whose bytes item unpickles into a call that creates a file
    marker = tmp_path / "ran"
    cid = checkpoint_id(shm_dir, "job", 1)
    dcp.save({"w": torch.ones(4), "payload": Touch(marker)}, checkpoint_id=cid,
             storage_writer=MemoryStorageWriter())  # fmt: skip
    assert not marker.exists()
    # When the documented load runs, with DCP's planner or the user's own
    dest = {"w": torch.zeros(4), "payload": None}
    with pytest.raises(CheckpointException) as err:
        dcp.load(dest, checkpoint_id=cid, storage_reader=MemoryStorageReader(),
                 planner=planner() if planner else None)  # fmt: skip
    # Then memckpt refuses the item by name, says how to opt in, and nothing ran
    failure = _failure(err.value)
    assert isinstance(failure, UnsupportedValueError), failure
    assert cid in str(failure) and "'payload'" in str(failure)
    assert "MemoryStorageReader(safe_globals=" in str(failure)
    assert not marker.exists()
    assert dest["payload"] is None


def test_a_user_class_in_a_bytes_item_loads_once_named_in_safe_globals(shm_dir):
    cid = checkpoint_id(shm_dir, "job", 2)
    dcp.save({"w": torch.ones(2), "pt": Point(1, 2), "plain": {"step": 2, "tag": "a"}},
             checkpoint_id=cid, storage_writer=MemoryStorageWriter())  # fmt: skip
    # refused by default, naming the class
    with pytest.raises(CheckpointException) as err:
        dcp.load({"w": torch.zeros(2), "pt": None}, checkpoint_id=cid,
                 storage_reader=MemoryStorageReader())  # fmt: skip
    failure = _failure(err.value)
    assert isinstance(failure, UnsupportedValueError) and "Point" in str(failure), failure
    # plain data loads without any opt-in; the class loads once named
    dest: dict[str, Any] = {"w": torch.zeros(2), "pt": None, "plain": {"step": 0, "tag": ""}}
    dcp.load(dest, checkpoint_id=cid, storage_reader=MemoryStorageReader(safe_globals=[Point]))
    assert dest["pt"] == Point(1, 2) and dest["plain"] == {"step": 2, "tag": "a"}
    assert torch.equal(dest["w"], torch.ones(2))
    # the opt-in holds for that reader only
    assert Point not in torch.serialization.get_safe_globals()


def test_bytes_that_are_no_torch_save_payload_are_corrupt(shm_dir):
    reader = MemoryStorageReader(checkpoint_id(shm_dir, "job", 3))
    with pytest.raises(CorruptCheckpointError, match=r"step-3: bytes item 'blob' of rank 1"):
        reader._check_bytes("blob", 1, b"PK\x03\x04 not a zip archive")


# -- Enum members pickled by name (CPython 3.11.0 - 3.11.x: getattr(cls, name)) -------------------

_PLANNER = b"ctorch.distributed.checkpoint.planner\nWriteItemType\n"


def _getattr_pickle(target: bytes, name: str) -> bytes:
    """The protocol-2 opcodes of ``getattr(<target>, name)``, as 3.11.2 writes an Enum member."""
    text = name.encode()
    return (
        b"\x80\x02cbuiltins\ngetattr\n" + target
        + b"X" + len(text).to_bytes(4, "little") + text
        + b"\x86R."
    )  # fmt: skip


def test_an_enum_member_pickled_by_name_loads_when_its_class_is_allowed():
    raw = _getattr_pickle(_PLANNER, "TENSOR")
    got = restore_state_dict(raw, _no_tensors, [WriteItemType], where="test")
    assert got is WriteItemType.TENSOR
    # the structure check calls nothing and accepts it
    check_skeleton(raw, 0, "test")
    # without the class allowed, the class itself is refused
    with pytest.raises(UnsupportedValueError, match="WriteItemType"):
        restore_state_dict(raw, _no_tensors, (), where="test")


@pytest.mark.parametrize(
    "target, name",
    [
        (_PLANNER, "__class__"),  # an attribute of an allowed Enum that is not a member
        (_PLANNER, "_missing_"),
        (_PLANNER, "__init_subclass__"),
        (b"ccollections\nOrderedDict\n", "fromkeys"),  # an allowed class that is no Enum
        (b"cbuiltins\ndict\n", "__class__"),
        (_getattr_pickle(_PLANNER, "TENSOR")[2:-1], "__class__"),  # a member, not a class
        (b"X\x02\x00\x00\x00os", "system"),  # a string standing for a module
    ],
)
def test_getattr_of_anything_but_an_allowed_enum_member_is_refused(target, name):
    raw = _getattr_pickle(target, name)
    with pytest.raises(UnsupportedValueError, match=r"builtins\.getattr"):
        restore_state_dict(raw, _no_tensors, [WriteItemType], where="test")


def test_getattr_of_a_module_global_is_refused_before_any_lookup():
    # getattr(os, 'system'): the module itself can only be named, and naming it is refused
    raw = b"\x80\x02cbuiltins\ngetattr\ncos\nsystem\nX\x06\x00\x00\x00systemR."
    with pytest.raises(UnsupportedValueError, match=r"os\.system"):
        restore_state_dict(raw, _no_tensors, [WriteItemType], where="test")


def _dumps_enums_by_name(obj: Any, *args: Any, **kwargs: Any) -> bytes:
    """``pickle.dumps`` writing Enum members as CPython 3.11.2 does: getattr(cls, name)."""

    class ByName(pickle.Pickler):
        def reducer_override(self, o: Any) -> Any:
            if isinstance(o, enum.Enum):
                return (getattr, (type(o), o.name))
            return NotImplemented

    buf = io.BytesIO()
    ByName(buf, protocol=kwargs.get("protocol", pickle.DEFAULT_PROTOCOL)).dump(obj)
    return buf.getvalue()


def test_dcp_metadata_with_enum_members_by_name_loads_and_exports(shm_dir, tmp_path, monkeypatch):
    # Given a step whose .metadata was written by a 3.11.2 interpreter (members by name)
    by_name = types.SimpleNamespace(dumps=_dumps_enums_by_name, dump=pickle.dump)
    monkeypatch.setattr(dcp_adapter, "pickle", by_name)
    cid = checkpoint_id(shm_dir, "job", 4)
    state = {"w": torch.arange(6.0), "meta": {"step": 4}}
    dcp.save(state, checkpoint_id=cid, storage_writer=MemoryStorageWriter())
    monkeypatch.undo()
    raw = read_manifest(Path(cid) / "manifest.json").blobs[".metadata"]
    assert b"getattr" in raw and b"_MEM_FORMAT_ENCODING" in raw
    # When it is loaded and exported on this interpreter, Then both work
    dest: dict[str, Any] = {"w": torch.zeros(6), "meta": {"step": 0}}
    dcp.load(dest, checkpoint_id=cid, storage_reader=MemoryStorageReader())
    assert torch.equal(dest["w"], state["w"]) and dest["meta"] == {"step": 4}
    out = dcp_adapter.export(cid, tmp_path / "exported")
    again: dict[str, Any] = {"w": torch.zeros(6), "meta": {"step": 0}}
    dcp.load(again, storage_reader=dcp.FileSystemReader(out))
    assert torch.equal(again["w"], state["w"])


def test_dcp_metadata_with_a_planted_getattr_is_refused(shm_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    def planted(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        return pickle.dumps({"metadata": Touch(marker)})

    monkeypatch.setattr(dcp_adapter, "pickle", types.SimpleNamespace(dumps=planted))
    cid = checkpoint_id(shm_dir, "job", 5)
    dcp.save({"w": torch.ones(2)}, checkpoint_id=cid, storage_writer=MemoryStorageWriter())
    monkeypatch.undo()
    with pytest.raises(UnsupportedValueError, match=r"\.metadata"):
        MemoryStorageReader(cid).read_metadata()
    assert not marker.exists()


# -- State relies on the reader -----------------------------------------------------------------


class _Tagged(torch.nn.Linear):
    """A module whose extra state is a user object: DCP saves it as a bytes item."""

    def get_extra_state(self) -> Any:
        return Point(3, 4)

    def set_extra_state(self, state: Any) -> None:
        self.loaded_extra = state


@pytest.fixture
def one_rank():
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}"
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_state_fsdp_bytes_items_load_through_the_readers_check(shm_dir, one_rank):
    from memckpt.adapters.state import State

    torch.manual_seed(0)
    model = _Tagged(3, 2)
    with State(model, None, "fsdp", base_dir=shm_dir, job_id="job") as s:
        s.save(1)
    # a user object among DCP's bytes items is refused by default ...
    with State(_Tagged(3, 2), None, "fsdp", base_dir=shm_dir, job_id="job") as s:
        with pytest.raises(CheckpointException) as err:
            s.load()
        assert isinstance(_failure(err.value), UnsupportedValueError)
    # ... and loads once State is told it may
    fresh = _Tagged(3, 2)
    with State(fresh, None, "fsdp", base_dir=shm_dir, job_id="job", safe_globals=[Point]) as s:
        assert s.load() == {} and s.step == 1
    assert fresh.loaded_extra == Point(3, 4)
    assert torch.equal(fresh.weight, model.weight)


def test_restricted_unpickler_still_refuses_ordinary_disallowed_globals():
    raw = pickle.dumps(collections.Counter(a=1), protocol=2)
    with pytest.raises(UnsupportedValueError, match="Counter"):
        restore_state_dict(raw, _no_tensors, (), where="test")
