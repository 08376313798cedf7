"""An operator after a failure: ls, status, verify and inspect on a 2-node job, in text and JSON.

Two simulated nodes (two base directories) of one job with pairwise replication: each node
holds both ranks' objects. Then node 1 is lost (its directory deleted, then replaced by an
empty one), a data byte of a copy is flipped, and a header is damaged. At each step the
commands must say what an operator needs: where each rank's copies are, what is at risk,
what is damaged, and what a restart would load. docs/operations.md shows this transcript.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from memckpt.storage.reader import ObjectReader
from memckpt.tools.cli import main as cli_main
from multiproc import run_ranks
from replication_workers import save_steps


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return code, got.out, got.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    doc = json.loads(out)
    return code, doc


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def data_offset(path: Path, tensor: str) -> int:
    with ObjectReader(path) as r:
        return next(t.offset for t in r.index.tensors if t.name == tensor)


def ranks(doc: dict[str, Any], step: int) -> dict[int, dict[str, Any]]:
    (s,) = [s for s in doc["steps"] if s["step"] == step]
    return {r["rank"]: r for r in s["ranks"]}


@pytest.mark.timeout(180)
def test_operator_after_node_loss_and_damage(shm_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each
    node0, node1 = shm_dir / "node0", shm_dir / "node1"
    n0, n1 = str(node0), str(node1)

    # Given: a 2-node job that saved steps 1 and 2, each replicated to the other node
    run_ranks(save_steps, 2, str(shm_dir), 1, "pairwise", [1, 2], timeout=90)
    code, doc = run_json(capsys, "status", n0, n1)
    assert code == 0 and doc["recovery"]["step"] == 2 and doc["recovery"]["fetches"] == []
    assert all(r["copies"] == 2 and r["state"] == "ok" for r in ranks(doc, 2).values())

    # When node 1 is lost and its directory left out
    shutil.rmtree(node1)
    code, doc = run_json(capsys, "status", n0)
    # Then status names node 1 as not given, each rank held once (at risk), and the plan
    assert code == 0
    assert [(n["node"], n["state"]) for n in doc["nodes"]] == [
        ("node0", "holds the job"),
        ("node1", "not given"),
    ]
    for r, view in ranks(doc, 2).items():
        assert view["node"] == f"node{r}" and view["copies"] == 1 and view["state"] == "at risk"
        assert view["held_on"] == ["node0"]
    assert doc["at_risk"] == [{"step": s, "rank": r} for s in (2, 1) for r in (0, 1)]
    assert doc["recovery"]["step"] == 2
    assert doc["recovery"]["fetches"] == [{"rank": 1, "from_node": "node0", "from_rank": 0}]

    # When the node is replaced by an empty one: an empty directory is a node with nothing
    node1.mkdir()
    code, out, _ = run(capsys, "status", n0, n1, "--job", "job")
    assert code == 0
    assert "node1 │ " in out and "empty" in out
    assert "at risk (one good copy left): step 2 rank 0, 1; step 1 rank 0, 1" in out
    assert "recovery plan: load step 2" in out and "fetch from node0" in out
    code, doc = run_json(capsys, "status", n0, n1)
    assert code == 0 and doc["nodes"][1]["state"] == "empty"
    assert ranks(doc, 2)[1]["on"] == [
        {
            "node": "node0",
            "state": "ok",
            "detail": "",
            "path": str(node0 / "job/step-2/rank-1.mck"),
        },
        {"node": "node1", "state": "missing", "detail": "", "path": None},
    ]
    code, out, _ = run(capsys, "ls", n0, n1)
    assert code == 0 and f"{n1}: holds no job (a node with nothing on it)" in out

    # When a data byte of the one copy of rank 1's step 2 flips
    obj = node0 / "job" / "step-2" / "rank-1.mck"
    flip(obj, data_offset(obj, "model.w") + 100)
    # Then ls (headers only) says what it checked and points to verify
    code, out, _ = run(capsys, "ls", n0, n1)
    assert code == 0 and "checked: headers" in out and "memckpt verify" in out
    # verify re-hashes: checksum mismatch, named, exit 1
    code, out, _ = run(capsys, "verify", n0, n1)
    assert code == 1
    assert f"{obj} │ damaged: checksum mismatch in tensor 'model.w' chunk 0" in out
    code, doc = run_json(capsys, "verify", n0, n1)
    assert code == 1 and list(doc["damaged"]) == [str(obj)]
    assert doc["damaged"][str(obj)].startswith("checksum mismatch in tensor 'model.w' chunk 0")
    # status --verify: rank 1 of step 2 is lost; a restart loads step 1
    code, doc = run_json(capsys, "status", n0, n1, "--verify")
    assert code == 1 and doc["checked"] == "data"
    assert ranks(doc, 2)[1]["state"] == "lost" and ranks(doc, 2)[0]["state"] == "at risk"
    (step2,) = [s for s in doc["steps"] if s["step"] == 2]
    assert not step2["recoverable"] and "no live copy of rank(s) [1]" in step2["why_not"]
    assert doc["recovery"]["step"] == 1
    code, out, _ = run(capsys, "status", n0, n1, "--verify")
    assert "lost (no good copy on these nodes): step 2 rank 1" in out
    assert "recovery plan: load step 1" in out
    # inspect --verify names the damage and exits 1
    code, out, _ = run(capsys, "inspect", str(node0 / "job"), "--step", "2", "--verify")
    assert code == 1
    assert "step 2 rank 1: damaged: checksum mismatch in tensor 'model.w' chunk 0" in out
    code, doc = run_json(capsys, "inspect", str(node0 / "job"), "--step", "2", "--verify")
    assert code == 1 and [o["state"] for o in doc["objects"]] == ["ok", "damaged"]

    # When the header of rank 0's step 1 copy is damaged too
    flip(node0 / "job" / "step-1" / "rank-0.mck", 20)
    # Then ls calls rank 0 damaged (not missing), says what, and exits 1
    code, doc = run_json(capsys, "ls", n0, n1)
    assert code == 1
    (s1,) = [s for s in doc[0]["steps"] if s["step"] == 1]
    assert s1["damaged"] == [0] and s1["missing"] == [] and not s1["complete"]
    assert s1["damage"][0]["detail"] == "header checksum mismatch"
    code, out, _ = run(capsys, "ls", n0, n1)
    assert "step 1: " in out and "rank-0.mck: damaged: header checksum mismatch" in out
    # status --verify: nothing can be recovered from these nodes
    code, doc = run_json(capsys, "status", n0, n1, "--verify")
    assert code == 1 and doc["recovery"]["step"] is None
    assert doc["lost"] == [{"step": 2, "rank": 1}, {"step": 1, "rank": 0}]
    code, out, _ = run(capsys, "status", n0, n1, "--verify")
    assert "nothing can be recovered" in out
    code, out, _ = run(capsys, "inspect", str(node0 / "job"), "--step", "1")
    assert code == 1 and "step 1 rank 0: damaged: header checksum mismatch" in out
