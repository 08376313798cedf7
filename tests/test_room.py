"""Admission control: a save that would not fit is skipped before it stages, with the numbers.

The cgroup parsing is pure (it takes the /proc and /sys roots), so fake trees drive it;
the engine's check is driven by monkeypatching what it reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.engine import save_engine
from memckpt.storage.room import CGROUP_MARGIN, MemoryLimit, Room, cgroup_memory, shortfall


def _tree(tmp: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    (tmp / "proc").mkdir()
    (tmp / "proc" / "cgroup").write_text(proc)
    root = tmp / "sys"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp / "proc" / "cgroup", root


def test_cgroup_v2_limit_and_usage(tmp_path):
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/c1\n", {
        "kubepods/pod1/c1/memory.max": "1073741824\n",
        "kubepods/pod1/c1/memory.current": "268435456\n",
    })  # fmt: skip
    m = cgroup_memory(proc, root)
    assert m == MemoryLimit(1 << 30, 256 << 20, str(root / "kubepods/pod1/c1/memory.max"))
    assert m.headroom == 768 << 20


def test_cgroup_v2_unlimited_leaf_under_a_limited_parent(tmp_path):
    proc, root = _tree(tmp_path, "0::/pod/c\n", {
        "pod/c/memory.max": "max\n", "pod/c/memory.current": "100\n",
        "pod/memory.max": "2000000000\n", "pod/memory.current": "1500000000\n",
    })  # fmt: skip
    m = cgroup_memory(proc, root)
    assert m is not None and m.limit == 2_000_000_000 and m.headroom == 500_000_000


def test_cgroup_v1_memory_controller(tmp_path):
    proc, root = _tree(tmp_path, "12:cpu,cpuacct:/x\n4:memory:/docker/abc\n1:name=systemd:/\n", {
        "memory/docker/abc/memory.limit_in_bytes": "536870912\n",
        "memory/docker/abc/memory.usage_in_bytes": "134217728\n",
    })  # fmt: skip
    m = cgroup_memory(proc, root)
    assert m is not None and m.limit == 512 << 20 and m.usage == 128 << 20


def test_cgroup_v1_path_not_visible_in_the_container_falls_back_to_the_root(tmp_path):
    # a container often sees its own cgroup mounted at the root, not under its host path
    proc, root = _tree(tmp_path, "4:memory:/process_api/e128\n", {
        "memory/memory.limit_in_bytes": "1000000000\n",
        "memory/memory.usage_in_bytes": "400000000\n",
    })  # fmt: skip
    m = cgroup_memory(proc, root)
    assert m is not None and m.headroom == 600_000_000


@pytest.mark.parametrize(
    ("proc", "files"),
    [
        ("0::/\n", {"memory.max": "max\n", "memory.current": "5\n"}),  # no limit
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                          "memory/memory.usage_in_bytes": "5\n"}),  # v1's "no limit"
        ("0::/\n", {}),  # nothing readable
        ("garbage", {}),
        ("0::/\n", {"memory.max": "lots\n", "memory.current": "5\n"}),
    ],
)  # fmt: skip
def test_no_limit_or_unreadable_means_no_cgroup_check(tmp_path, proc, files):
    assert cgroup_memory(*_tree(tmp_path, proc, files)) is None


def test_this_machine_answers_without_error():
    m = cgroup_memory()
    assert m is None or (m.limit > 0 and m.usage >= 0)


def test_shortfall_names_the_numbers_and_what_to_change():
    fits = Room(10 << 20, 1 << 30, "/dev/shm/x", MemoryLimit(1 << 30, 0, "f"), None)
    assert shortfall(fits) is None
    tmpfs = shortfall(Room(80 << 20, 60 << 20, "/dev/shm/x"))
    assert "83.9 MB" in tmpfs and "62.9 MB" in tmpfs and "/dev/shm/x" in tmpfs
    assert "--shm-size" in tmpfs and "keep_last" in tmpfs
    cg = MemoryLimit(1 << 30, (1 << 30) - CGROUP_MARGIN - (5 << 20), "/sys/fs/cgroup/memory.max")
    mem = shortfall(Room(10 << 20, 1 << 40, "/dev/shm/x", cg))
    assert "memory limit" in mem and "/sys/fs/cgroup/memory.max" in mem
    lim = shortfall(Room(10 << 20, 1 << 40, "/dev/shm/x", None, 1 << 20))
    assert "limit_bytes" in lim
    assert shortfall(Room(0, 0, "/dev/shm/x")) is None  # reuses a free buffer: nothing new


def test_a_save_over_the_cgroup_headroom_is_skipped_and_training_goes_on(
    shm_dir, monkeypatch, caplog
):
    state = {"w": torch.ones(1 << 20)}  # 4 MiB
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, prefault=False) as m:
        assert m.save(1, state).wait().committed
        # Given a container whose memory limit leaves 8 MiB above the margin
        tight = MemoryLimit(1 << 30, (1 << 30) - CGROUP_MARGIN - (8 << 20), "/fake/memory.max")
        monkeypatch.setattr(save_engine, "cgroup_memory", lambda: tight)
        with caplog.at_level(logging.WARNING, logger="memckpt"):
            big = m.save(2, {"w": torch.ones(4 << 20)}).wait()  # 16 MiB more: over it
        # Then the save is skipped (no exception), says why, and step 1 stays loadable
        assert not big.committed and "/fake/memory.max" in big.skipped
        assert any("skipping the save of step 2" in r.message for r in caplog.records)
        assert not (shm_dir / "job" / "step-2").exists()
        assert m.latest() == 1
        # and a save that reuses step 1's buffer needs nothing new: it commits
        assert m.save(3, state).wait().committed
        assert m.latest() == 3
        assert not list((shm_dir / "job").glob("step-*.writing.*"))


def test_a_blocking_save_without_room_returns_the_skip(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", limit_bytes=1 << 20) as m:
        h = m.save(1, {"w": torch.ones(1 << 20)}, blocking=True)
        r = h.wait()
        assert not r.committed and "limit_bytes" in r.skipped and m.latest() is None
    assert os.path.isdir(shm_dir / "job")
