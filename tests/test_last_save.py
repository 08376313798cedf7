"""Each rank's last save in `memckpt status`: skipped saves with their reason, replication rate."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

import memckpt
from memckpt.storage.last_save import read_last_saves, record_last_save
from memckpt.tools.cli import main as cli_main
from memckpt.tools.status import last_saves


def _status_json(job: Path, capsys) -> dict:
    capsys.readouterr()
    cli_main(["status", str(job), "--json"])
    return json.loads(capsys.readouterr().out)


def test_status_shows_a_skipped_save_with_its_reason(shm_dir, capsys):
    # Given a job whose second save found no room (limit_bytes) and was skipped
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, limit_bytes=8 << 20) as m:
        assert m.save(1, {"w": torch.ones(1 << 20)}).wait().committed
        r = m.save(2, {"w": torch.ones(4 << 20)}).wait()
        assert r.skipped
    # When the operator asks for the status
    doc = _status_json(shm_dir / "job", capsys)
    (node,) = doc["last_saves"].values()
    # Then it names the skipped step, the reason and what was committed before
    assert node["0"]["step"] == 2 and node["0"]["outcome"] == "skipped"
    assert "limit_bytes" in node["0"]["reason"]
    assert node["0"]["replication_bytes_per_s"] is None  # nothing was pushed
    cli_main(["status", str(shm_dir / "job")])
    out = capsys.readouterr().out
    assert "last save of rank 0 on" in out and "step 2 skipped" in out and "limit_bytes" in out


def test_a_committed_save_records_its_size_and_the_replication_rate(shm_dir, capsys):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        r = m.save(3, {"w": torch.ones(1000)}).wait()
    (doc,) = read_last_saves(shm_dir / "job").values()
    assert doc["step"] == 3 and doc["outcome"] == "committed" and doc["nbytes"] == r.nbytes
    # a rank that pushed 50 MB in 0.5 s shows 100 MB/s
    record_last_save(memckpt.ids.JobLayout(shm_dir, "job"), 1, 3, "committed", nbytes=10,
                     replication_bytes=50_000_000, replication_s=0.5)  # fmt: skip
    assert last_saves(shm_dir / "job")[1]["replication_bytes_per_s"] == 100e6
    cli_main(["status", str(shm_dir / "job")])
    assert "replicated 50.0 MB at 100.0 MB/s" in capsys.readouterr().out


def test_planted_records_are_ignored_and_never_block(shm_dir, tmp_path):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"w": torch.ones(10)}).wait()
    peers = shm_dir / "job" / ".peers"
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"step": 1, "outcome": "committed"}))
    (peers / "last-save-rank-1.json").symlink_to(secret)  # a link: not followed
    os.mkfifo(peers / "last-save-rank-2.json")  # a FIFO: never opened for a blocking read
    (peers / "last-save-rank-3.json").write_text('{"step": "1; rm -rf /"}')  # wrong types
    (peers / "last-save-rank-4.json").write_text("x" * (1 << 20))  # too large
    done: list[dict] = []
    t = threading.Thread(target=lambda: done.append(read_last_saves(shm_dir / "job")))
    t.start()
    t.join(10)
    assert done and sorted(done[0]) == [0]
