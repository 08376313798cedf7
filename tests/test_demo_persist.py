"""``memckpt demo --persist URL``: both nodes lose their memory, the durable tier restores them.

The demo runs as a user runs it, in its own processes, against the ``s3`` fixture's server:
credentials and endpoint reach it through the ``AWS_*`` environment only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memckpt.storage.remote import RemoteTier

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_persist_wipes_both_nodes_and_restores_identical_from_s3(tmp_path, s3):
    env = dict(os.environ, AWS_ENDPOINT_URL=s3.endpoint)
    proc = subprocess.run(
        [sys.executable, "-m", "memckpt", "demo", "--steps", "24", "--interval", "3",
         "--kill-step", "20", "--persist", s3.url, "--out", str(tmp_path / "demo"), "--json"],
        capture_output=True, text=True, timeout=280, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["ok"] and report["identical"] is True
    assert report["tier"] == "durable" and report["persist"] == s3.url
    assert report["recovered_step"] is not None and report["recovered_step"] % 3 == 0
    assert report["sources"] == {}  # no node had memory to give
    # the demo's job was deleted from the store at the end, and its memory tree
    job = report["persisted_job"].rsplit("/", 1)[-1]
    assert job.startswith("demo-") and RemoteTier(s3.url, job, s3.options()).step_dirs() == []
    assert not Path(report["memory_tree"]).exists()


def test_demo_persist_refuses_an_unknown_scheme_before_any_run(tmp_path):
    from memckpt.errors import ConfigError
    from memckpt.tools.demo import run_demo

    with pytest.raises(ConfigError, match="'nosuch'"):
        run_demo(tmp_path / "demo", steps=6, memory_interval=2, persist="nosuch://b/x")
    assert not (tmp_path / "demo").exists()
