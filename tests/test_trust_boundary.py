"""The job tree is untrusted: what is planted in it is refused, never followed or waited on.

``/dev/shm`` is shared by every user of a node. Each test plants one thing a probe
found (see benchmarks/probes.py) and checks the storage layer's rules: the job root is
ours and private, nothing is read through a symlink or from a FIFO or device, nothing
is deleted outside the job, a save's I/O errors reach the handle as MemckptErrors, and
every reader (latest, ls, gc) applies the same rule to a manifest.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt import ids
from memckpt.errors import (
    ConfigError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    StorageIOError,
)
from memckpt.storage import manifest as manifest_mod
from memckpt.storage import safe_fs
from memckpt.storage.manifest import read_manifest, write_manifest
from memckpt.storage.store import delete_job
from memckpt.tools.catalog import gc_job, scan_job
from memckpt.tools.cli import main as cli_main

JOB = "trust"


def _sd(v: float = 1.0) -> dict[str, Any]:
    return {"w": torch.full((64,), v), "step": int(v)}


def _manager(base: Path, keep_last: int = 3) -> memckpt.CheckpointManager:
    return memckpt.CheckpointManager(base, JOB, keep_last=keep_last, prefault=False)


def _save_steps(base: Path, steps: list[int], keep_last: int = 3) -> None:
    mgr = _manager(base, keep_last)
    try:
        for s in steps:
            mgr.save(s, _sd(float(s)), blocking=True)
    finally:
        mgr.close()


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() in a daemon thread; fail (not hang) when it does not return in time."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds}s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _victim(tmp_path: Path) -> Path:
    """A directory outside the job, with files a symlinked step must never touch."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text("someone else's")
    (victim / "rank-0.mck").write_text("someone else's data")
    (victim / "notes.txt").write_text("keep me")
    return victim


def _victim_intact(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["manifest.json", "notes.txt", "rank-0.mck"]
    assert (victim / "manifest.json").read_text() == "someone else's"


# -- the job root --------------------------------------------------------------------------


def test_job_root_is_created_private(tmp_path):
    mgr = _manager(tmp_path)
    mgr.close()
    assert stat.S_IMODE(os.stat(tmp_path / JOB).st_mode) == 0o700


def test_group_writable_job_root_is_refused_with_the_fix(tmp_path):
    root = tmp_path / JOB
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(ConfigError, match=r"writable by other users.*chmod 700"):
        _manager(tmp_path)


def test_symlinked_job_root_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / JOB).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symlink"):
        _manager(tmp_path / "base")
    assert list(elsewhere.iterdir()) == []


def test_base_writable_by_all_without_sticky_bit_is_refused(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o777)
    with pytest.raises(ConfigError, match=r"sticky bit.*chmod \+t"):
        _manager(base)
    base.chmod(0o1777)  # as /dev/shm is: fine
    _manager(base).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a directory of another user")
def test_job_root_of_another_user_is_refused(tmp_path):
    # Given a job directory that another user created first, open to all (0777)
    root = tmp_path / JOB
    root.mkdir()
    os.chown(root, 65534, 65534)
    root.chmod(0o777)
    # Then neither a writer nor a restart uses it, and the error names owner and fix
    with pytest.raises(ConfigError) as e:
        _manager(tmp_path)
    assert "uid 65534" in str(e.value) and str(root) in str(e.value)
    root.chmod(0o755)  # not writable by others, but still not ours
    with pytest.raises(ConfigError, match="not to you"):
        _manager(tmp_path)


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "step-5", "step-0", "step-3.writing.0"])
def test_job_ids_that_tools_would_misread_are_refused(tmp_path, bad):
    with pytest.raises(InvalidNameError, match="job id"):
        memckpt.CheckpointManager(tmp_path, bad)


def test_ls_of_a_base_lists_every_job(tmp_path, capsys):
    for job in ("step-x", "a"):  # "step-x" is a fine name: not a step directory's
        m = memckpt.CheckpointManager(tmp_path, job, prefault=False)
        m.save(1, _sd(), blocking=True)
        m.close()
    assert cli_main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step-x" in out and f"{tmp_path / 'a'}" in out


# -- symlinks and odd files in the tree ------------------------------------------------------


def test_gc_never_deletes_through_a_symlinked_step(tmp_path):
    _save_steps(tmp_path, [5, 6])
    victim = _victim(tmp_path)
    (tmp_path / JOB / "step-1").symlink_to(victim)
    deleted = gc_job(tmp_path / JOB, keep=1)
    _victim_intact(victim)
    assert deleted == [5]


def test_retention_never_deletes_through_a_symlinked_step(tmp_path):
    victim = _victim(tmp_path)
    _save_steps(tmp_path, [1])
    (tmp_path / JOB / "step-0").symlink_to(victim)
    _save_steps(tmp_path, [2, 3, 4], keep_last=1)
    _victim_intact(victim)


def test_delete_job_never_deletes_through_a_symlinked_step(tmp_path):
    victim = _victim(tmp_path)
    _save_steps(tmp_path, [1])
    (tmp_path / JOB / "step-7").symlink_to(victim)
    delete_job(ids.JobLayout(tmp_path, JOB))
    _victim_intact(victim)
    assert not (tmp_path / JOB).exists()


def test_delete_job_keeps_files_memckpt_did_not_write(tmp_path):
    _save_steps(tmp_path, [1])
    (tmp_path / JOB / "README.txt").write_text("mine")
    delete_job(ids.JobLayout(tmp_path, JOB))
    assert (tmp_path / JOB / "README.txt").read_text() == "mine"
    assert not (tmp_path / JOB / "step-1").exists()


def test_a_directory_inside_an_old_step_does_not_fail_later_saves(tmp_path):
    mgr = _manager(tmp_path, keep_last=1)
    try:
        mgr.save(1, _sd(1.0), blocking=True)
        (tmp_path / JOB / "step-1" / "sub").mkdir()
        (tmp_path / JOB / "step-1" / "sub" / "x").write_text("x")
        for s in (2, 3):
            h = mgr.save(s, _sd(float(s)))
            assert h.wait().step == s  # committed steps never report a failure
        assert mgr.latest() == 3
    finally:
        mgr.close()
    assert not (tmp_path / JOB / "step-1").exists()


def test_a_save_never_writes_through_a_symlinked_step_dir(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / JOB).mkdir(mode=0o700)
    (tmp_path / JOB / "step-1").symlink_to(victim)
    _save_steps(tmp_path, [1])
    _victim_intact(victim)
    assert (tmp_path / JOB / "step-1").is_dir() and not (tmp_path / JOB / "step-1").is_symlink()
    assert read_manifest(tmp_path / JOB / "step-1" / "manifest.json").step == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["manifest.json", "rank-0.mck"])
def test_a_fifo_in_the_tree_never_blocks(tmp_path, name):
    _save_steps(tmp_path, [1, 2])
    path = tmp_path / JOB / "step-2" / name
    path.unlink()
    os.mkfifo(path)

    def restart() -> int | None:
        mgr = _manager(tmp_path)
        try:
            return mgr.latest()
        finally:
            mgr.close()

    assert _within(20, restart) == 1
    assert _within(20, lambda: scan_job(tmp_path / JOB))[-1].committed is (name == "rank-0.mck")


def test_a_manifest_linked_to_dev_zero_is_refused_without_reading(tmp_path):
    _save_steps(tmp_path, [1, 2])
    path = tmp_path / JOB / "step-2" / "manifest.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        mgr = _manager(tmp_path)
        try:
            assert mgr.latest() == 1
        finally:
            mgr.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20 and time.perf_counter() - t0 < 10


def test_an_oversized_manifest_is_refused_before_reading(tmp_path):
    _save_steps(tmp_path, [1])
    path = tmp_path / JOB / "step-1" / "manifest.json"
    with open(path, "r+b") as f:
        f.truncate(manifest_mod.MAX_MANIFEST_BYTES + 1)  # sparse: costs no memory
    with pytest.raises(memckpt.CorruptCheckpointError, match="more than"):
        read_manifest(path)


# -- one rule for every reader ---------------------------------------------------------------


def _tamper_newest(base: Path, step: int, how: str) -> None:
    path = base / JOB / f"step-{step}" / "manifest.json"
    m = read_manifest(path)
    if how == "job":
        bad = manifest_mod.StepManifest("other-job", m.step, m.world_size, m.objects, m.blobs)
    elif how == "step":
        bad = manifest_mod.StepManifest(m.job_id, step + 100, m.world_size, m.objects, m.blobs)
    else:  # a digest that matches no object
        objects = {0: manifest_mod.ObjectDigest(m.objects[0].size, m.objects[0].digest ^ 1)}
        bad = manifest_mod.StepManifest(m.job_id, m.step, m.world_size, objects, m.blobs)
    write_manifest(path, bad)


@pytest.mark.parametrize("how", ["job", "step", "digest"])
def test_gc_with_a_tampered_newest_manifest_keeps_the_loadable_steps(tmp_path, how, capsys):
    _save_steps(tmp_path, [1, 2, 3])
    _tamper_newest(tmp_path, 3, how)
    summaries = {s.step: s for s in scan_job(tmp_path / JOB)}
    assert not summaries[3].complete
    if how != "digest":
        assert not summaries[3].committed and "not job" in (summaries[3].manifest_error or "")
    assert cli_main(["gc", str(tmp_path / JOB), "--keep", "1"]) == 0
    capsys.readouterr()
    mgr = _manager(tmp_path)
    try:
        assert mgr.latest() == 2
        out = mgr.load()
        assert mgr.last_load is not None and mgr.last_load.step == 2
        assert torch.equal(out["w"], torch.full((64,), 2.0))
    finally:
        mgr.close()


# -- I/O errors of a save --------------------------------------------------------------------


class _OsWith:
    """The os module, with some functions replaced (patched into one module only)."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(os, name)


@pytest.mark.parametrize(
    ("err", "kind"), [(errno.ENOSPC, InsufficientSpaceError), (errno.EIO, StorageIOError)]
)
def test_an_io_error_after_the_vote_is_a_memckpt_error_on_the_handle(
    tmp_path, monkeypatch, err, kind
):
    mgr = _manager(tmp_path)
    try:
        mgr.save(1, _sd(1.0), blocking=True)

        def failing_write(fd: int, data: Any) -> int:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(safe_fs, "os", _OsWith(write=failing_write))
        h = mgr.save(2, _sd(2.0))
        with pytest.raises(kind) as e:
            h.wait()
        assert isinstance(e.value, MemckptError) and "step 2" in str(e.value)
        monkeypatch.undo()
        assert not [p for p in (tmp_path / JOB / "step-2").iterdir() if ".tmp." in p.name]
        # training goes on: the next save commits
        mgr.save(3, _sd(3.0), blocking=True)
        assert mgr.latest() == 3
    finally:
        mgr.close()
