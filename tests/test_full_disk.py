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
    # Then the oversize save fails with a clear error naming the path and the shortfall
    assert report["error"] and str(mnt) in report["error"] and "free" in report["error"]
    # and the previous checkpoint stays and loads, and later saves work
    assert report["latest"] == 1 and report["previous_intact"]
    assert report["after"] == 3
