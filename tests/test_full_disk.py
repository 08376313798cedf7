from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = str(Path(__file__).with_name("full_disk_worker.py"))


def _can_mount_private_tmpfs(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=1m none {tmp}"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.timeout(90)
def test_full_tmpfs_fails_the_save_cleanly_and_keeps_the_previous(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_private_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a private mount namespace (needs root)")
    # Given a 24 MiB tmpfs that only this test's namespace sees
    script = f"mount -t tmpfs -o size=24m none {mnt} && exec {sys.executable} {WORKER} {mnt}"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Then the oversize save is skipped (a result, not an exception) with a reason naming
    # the path and the shortfall
    assert report["committed"] is False
    assert report["error"] and str(mnt) in report["error"] and "free" in report["error"]
    # and the previous checkpoint stays and loads, and later saves work
    assert report["latest"] == 1 and report["previous_intact"]
    assert report["after"] == 3


def _loop_in_tmpfs(tmp: Path, size_mb: int, state_mib: int, steps: int) -> dict:
    mnt = tmp / "mnt"
    mnt.mkdir()
    if not _can_mount_private_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a private mount namespace (needs root)")
    script = (f"mount -t tmpfs -o size={size_mb}m none {mnt} && "
              f"exec {sys.executable} {WORKER} {mnt} {state_mib} {steps}")  # fmt: skip
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]  # never a SIGBUS, never an OOM kill
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
def test_a_state_larger_than_a_64mb_tmpfs_skips_every_save_and_trains_on(tmp_path):
    # Given Docker's default /dev/shm (64 MB) and an 80 MiB state
    report = _loop_in_tmpfs(tmp_path, 64, 80, 5)
    # Then training runs to the end, every save is skipped with its reason, none committed
    assert report["trained"] == 5 and len(report["results"]) == 5
    for r in report["results"]:
        assert not r["committed"] and "free" in r["skipped"] and "--shm-size" in r["skipped"]
    assert report["latest"] is None


@pytest.mark.timeout(120)
def test_a_state_that_fits_once_keeps_one_loadable_step(tmp_path):
    # Given a 64 MB tmpfs and a 40 MiB state: it fits once, not twice
    report = _loop_in_tmpfs(tmp_path, 64, 40, 4)
    # Then the first save commits, the later ones are skipped, and the step loads intact
    committed = [r["step"] for r in report["results"] if r["committed"]]
    assert committed == [1]
    assert all(r["skipped"] for r in report["results"][1:])
    assert report["latest"] == 1 and report["intact"]
