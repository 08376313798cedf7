from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.storage.reader import ObjectReader
from memckpt.tools.cli import main as cli_main


def _save_two_steps(base: Path) -> Path:
    with memckpt.CheckpointManager(base, "job", keep_last=3) as m:
        m.save(1, {"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3)}).wait()
        m.save(2, {"w": torch.arange(1 << 20, dtype=torch.float32) * 2, "b": torch.ones(3)}).wait()
    return base / "job"


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _tensor_offset(path: Path, name: str) -> int:
    with ObjectReader(path) as r:
        return next(t.offset for t in r.index.tensors if t.name == name)


def test_flipped_byte_is_detected_by_load_and_falls_back(shm_dir):
    job = _save_two_steps(shm_dir)
    obj = job / "step-2" / "rank-0.mck"
    _flip_byte(obj, _tensor_offset(obj, "w") + 123_456)
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        # an explicit step reports exactly what is damaged
        with pytest.raises(memckpt.CorruptCheckpointError, match=r"'w' chunk 0"):
            m.load(step=2)
        # the newest-step load falls back to the older intact step
        out = m.load()
        assert m.last_load.step == 1 and m.last_load.fell_back_from == (2,)
        assert torch.equal(out["w"], torch.arange(1 << 20, dtype=torch.float32))


def test_flipped_byte_is_reported_by_verify_with_tensor_name(shm_dir, capsys):
    job = _save_two_steps(shm_dir)
    assert cli_main(["verify", str(job)]) == 0
    obj = job / "step-2" / "rank-0.mck"
    _flip_byte(obj, _tensor_offset(obj, "b") + 5)
    capsys.readouterr()
    assert cli_main(["verify", str(job), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["objects"] == 2
    (damaged,) = doc["damaged"].items()
    assert damaged[0].endswith("step-2/rank-0.mck")
    assert damaged[1].startswith("checksum mismatch in tensor 'b' chunk 0")
    assert cli_main(["verify", str(job), "--step", "1"]) == 0


@pytest.mark.parametrize(
    "where", ["header", "index", "truncate", "skeleton"], ids=lambda w: f"damaged-{w}"
)
def test_damaged_structure_is_a_clear_error_not_a_crash(shm_dir, where):
    job = _save_two_steps(shm_dir)
    obj = job / "step-2" / "rank-0.mck"
    with ObjectReader(obj) as r:
        h = r.header
    if where == "header":
        _flip_byte(obj, 20)
    elif where == "index":
        _flip_byte(obj, h.index_offset + 3)
    elif where == "skeleton":
        _flip_byte(obj, h.objects_offset + 3)
    else:
        os.truncate(obj, h.index_offset)
    with pytest.raises(memckpt.CorruptCheckpointError, match=r"rank-0\.mck"):
        memckpt.load_object(obj)
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        out = m.load()  # a damaged header hides the object; other damage is caught at load
        assert m.last_load.step == 1
        assert torch.equal(out["w"], torch.arange(1 << 20, dtype=torch.float32))


def test_ls_inspect_gc_commands(shm_dir, capsys):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=5) as m:
        for s in range(4):
            m.save(s, {"x": torch.full((10,), s), "meta": {"s": s}}).wait()
    job = shm_dir / "job"
    capsys.readouterr()
    assert cli_main(["ls", str(shm_dir), "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2, 3]
    assert all(s["complete"] and s["committed"] for s in doc["steps"])
    assert cli_main(["inspect", str(job), "--step", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (t,) = doc["objects"][0]["tensors"]
    assert t["name"] == "x" and t["shape"] == [10] and t["dtype"] == "int64"
    assert cli_main(["gc", str(job), "--keep", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [0, 1]
    assert sorted(p.name for p in job.glob("step-*")) == ["step-2", "step-3"]
    assert cli_main(["inspect", str(job), "--step", "0"]) == 2  # clear error, not a traceback


def test_cli_human_tables_render(shm_dir):
    _save_two_steps(shm_dir)
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(
        [sys.executable, "-m", "memckpt.tools.cli", "ls", str(shm_dir)],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    ).stdout  # fmt: skip
    assert "step" in out and "complete" in out and "yes" in out
