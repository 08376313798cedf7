"""The memckpt command for an operator: one vocabulary, exit codes, errors, --json, help.

Exit codes everywhere: 0 ok, 1 damage found (status: or nothing recoverable), 2 usage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt import ids
from memckpt.storage.reader import ObjectReader
from memckpt.storage.store import load_step_manifest
from memckpt.tools.cli import main as cli_main
from memckpt.tools.demo import DemoReport, print_report


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return code, got.out, got.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each


def save_job(base: Path, steps: tuple[int, ...] = (1, 2), job: str = "job") -> Path:
    with memckpt.CheckpointManager(base, job, keep_last=5) as m:
        for s in steps:
            state = {"w": torch.arange(16.0) * s, "step": s, "meta": {"lr": 0.5, "name": "run"}}
            m.save(s, state).wait()
    return base / job


def flip(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0x40 for x in b))


def data_offset(path: Path, tensor: str = "w") -> int:
    with ObjectReader(path) as r:
        return next(t.offset for t in r.index.tensors if t.name == tensor)


# -- 1. status after a node loss: an empty or missing node directory holds nothing -----------


def test_status_counts_a_replaced_empty_or_missing_node_dir_as_a_node_with_nothing(shm_dir, capsys):
    save_job(shm_dir / "node0")
    (shm_dir / "node1").mkdir()
    code, doc = run_json(capsys, "status", str(shm_dir / "node0"), str(shm_dir / "node1"),
                         "--job", "job")  # fmt: skip
    assert code == 0
    assert [(n["node"], n["state"]) for n in doc["nodes"]] == [
        ("node0", "holds the job"),
        ("node1", "empty"),
    ]
    assert doc["recovery"]["step"] == 2
    code, doc = run_json(capsys, "status", str(shm_dir / "node0"), str(shm_dir / "gone"))
    assert code == 0 and doc["nodes"][1]["state"] == "no such directory"


# -- 2. damage: one vocabulary, what was checked, marks, exit codes ---------------------------


def test_ls_says_it_checked_headers_only_and_points_to_verify(shm_dir, capsys):
    job = save_job(shm_dir)
    obj = job / "step-2" / "rank-0.mck"
    flip(obj, data_offset(obj), n=4)
    code, out, _ = run(capsys, "ls", str(shm_dir))
    assert code == 0  # a header check cannot see data damage, and says so
    assert "checked: headers" in out and "memckpt verify" in out
    code, doc = run_json(capsys, "ls", str(shm_dir))
    assert code == 0 and doc[0]["checked"] == "headers"
    code, out, _ = run(capsys, "verify", str(shm_dir))
    assert code == 1 and "damaged: checksum mismatch in tensor 'w' chunk 0" in out


def test_a_damaged_header_is_damaged_not_missing(shm_dir, capsys):
    job = save_job(shm_dir)
    flip(job / "step-2" / "rank-0.mck", 20)
    code, doc = run_json(capsys, "ls", str(job))
    (s2,) = [s for s in doc[0]["steps"] if s["step"] == 2]
    assert code == 1
    assert s2["damaged"] == [0] and s2["missing"] == [] and s2["ranks"] == []
    assert s2["objects"][0]["state"] == "damaged"
    assert s2["objects"][0]["detail"] == "header checksum mismatch"
    code, out, _ = run(capsys, "ls", str(job))
    assert f"step 2: {job}/step-2/rank-0.mck: damaged: header checksum mismatch" in out


def test_ls_verify_and_status_show_damage_marks_and_set_aside_copies(shm_dir, capsys):
    job = save_job(shm_dir)
    layout = ids.JobLayout(shm_dir, "job")
    checksum = load_step_manifest(layout, 2).checksum
    # a load found step 2 damaged on every holder; another set a step-1 copy aside
    mark = layout.damage_mark_path(2, checksum)
    mark.write_text("rank 0: checksum mismatch in tensor 'w' chunk 0")
    shutil.copyfile(layout.object_path(1, 0), layout.damaged_object_path(1, 0))
    code, doc = run_json(capsys, "ls", str(shm_dir))
    assert code == 1
    steps = {s["step"]: s for s in doc[0]["steps"]}
    assert not steps[2]["complete"] and steps[1]["complete"] and steps[1]["damaged"] == [0]
    assert [d["path"] for d in steps[2]["damage"]] == [str(mark)]
    assert (
        "a load found this step's data damaged on every holder" in steps[2]["damage"][0]["detail"]
    )
    assert "set aside by a load" in steps[1]["damage"][0]["detail"]
    code, out, _ = run(capsys, "ls", str(shm_dir))
    assert "step (load mark)" in out and "rank 0 (set aside)" in out
    code, doc = run_json(capsys, "verify", str(shm_dir))
    assert code == 1 and sorted(doc["damaged"]) == sorted(
        [str(mark), str(layout.damaged_object_path(1, 0))]
    )
    code, doc = run_json(capsys, "status", str(shm_dir))
    (s2,) = [s for s in doc["steps"] if s["step"] == 2]
    assert code == 1 and not s2["recoverable"] and "damaged" in s2["why_not"]
    assert doc["recovery"]["step"] == 1
    # gc counts the marked step as not loadable: it keeps step 1
    code, doc = run_json(capsys, "gc", str(job), "--keep", "1", "--dry-run")
    assert code == 0 and doc["deleted"] == []


def test_verify_names_a_checksum_mismatch_and_takes_several_paths(shm_dir, capsys):
    a, b = save_job(shm_dir / "node0", job="a"), save_job(shm_dir / "node1", job="b")
    obj = b / "step-1" / "rank-0.mck"
    flip(obj, data_offset(obj) + 8)
    code, doc = run_json(capsys, "verify", str(shm_dir / "node0"), str(shm_dir / "node1"))
    assert code == 1 and doc["objects"] == 4
    assert doc["damaged"] == {str(obj): "checksum mismatch in tensor 'w' chunk 0 (bytes from 0)"}
    assert {r["state"] for r in doc["results"] if r["path"] != str(obj)} == {"ok"}
    assert run(capsys, "verify", str(a), "--step", "2")[0] == 0


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_an_unknown_step_is_a_usage_error_naming_the_steps(shm_dir, capsys, command):
    save_job(shm_dir)
    code, out, err = run(capsys, command, str(shm_dir), "--step", "99")
    assert code == 2 and out == ""
    assert err.startswith("memckpt: error: no step 99 in ") and "(steps: [1, 2])" in err
    code, doc = run_json(capsys, command, str(shm_dir), "--step", "99")
    assert code == 2 and doc["kind"] == "usage" and doc["exit"] == 2
    assert "(steps: [1, 2])" in doc["error"]


def test_inspect_exits_1_on_a_damaged_object(shm_dir, capsys):
    job = save_job(shm_dir)
    with ObjectReader(job / "step-2" / "rank-0.mck") as r:
        index_at = r.header.index_offset
    flip(job / "step-2" / "rank-0.mck", index_at + 3)
    code, out, _ = run(capsys, "inspect", str(job))
    assert code == 1 and "step 2 rank 0: damaged: index checksum mismatch" in out
    code, doc = run_json(capsys, "inspect", str(job), "--step", "2")
    assert code == 1 and doc["objects"][0]["state"] == "damaged"
    assert run(capsys, "inspect", str(job), "--step", "1")[0] == 0


# -- 3. bad paths: one line, what is wrong, what to do, exit 2 --------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "/no/such"],
        ["verify", "/no/such"],
        ["status", "/no/such"],
        ["inspect", "/no/such"],
        ["gc", "/no/such", "--keep", "1"],
        ["export", "/no/such", "--to", "/tmp/memckpt-never-written"],
    ],
    ids=lambda a: a[0],
)
def test_a_bad_path_is_one_line_with_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("memckpt: error: ") and "/no/such" in err
    assert "give" in err  # what to do
    code, doc = run_json(capsys, *argv)
    assert code == 2 and doc["kind"] == "usage" and "/no/such" in doc["error"]
    assert not Path("/tmp/memckpt-never-written").exists()


def test_a_directory_without_jobs_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "reference").mkdir()  # e.g. memckpt demo's output directory
    for argv in (["ls", str(tmp_path)], ["status", str(tmp_path)], ["verify", str(tmp_path)]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "no memckpt job" in err and "base directory" in err, argv


def _dcp_job(base: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    from memckpt.adapters.dcp import MemoryStorageWriter, checkpoint_id, close

    state = {"model": {"w": torch.arange(8.0)}}
    dcp.save(state, checkpoint_id=checkpoint_id(base, "job", 4),
             storage_writer=MemoryStorageWriter())  # fmt: skip
    close()
    return base / "job"


def test_export_to_a_file_or_a_full_directory_is_a_usage_error(shm_dir, tmp_path, capsys):
    job = _dcp_job(shm_dir)
    afile = tmp_path / "hostname"
    afile.write_text("x")
    code, _, err = run(capsys, "export", str(job), "--to", str(afile))
    assert code == 2 and "exists and is not a directory" in err and err.count("\n") == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    code, _, err = run(capsys, "export", str(job), "--to", str(tmp_path / "full"))
    assert code == 2 and "holding other files" in err
    code, _, err = run(capsys, "export", str(job), "--step", "7", "--to", str(tmp_path / "o"))
    assert code == 2 and "no committed step 7" in err and "[4]" in err
    code, doc = run_json(capsys, "export", str(job), "--to", str(tmp_path / "out"))
    assert code == 0 and doc["step"] == 4 and (tmp_path / "out" / ".metadata").is_file()


# -- 4. --json on every command, errors too ----------------------------------------------------


def test_every_command_prints_json(shm_dir, tmp_path, capsys):
    job = save_job(shm_dir)
    for argv in (
        ["ls", str(shm_dir)],
        ["inspect", str(job)],
        ["verify", str(shm_dir)],
        ["status", str(shm_dir)],
        ["gc", str(job), "--keep", "1", "--dry-run"],
        ["config", "list"],
        ["config", "show", "gpt_tiny", "train.steps=5"],
    ):
        code, doc = run_json(capsys, *argv)
        assert code == 0, (argv, doc)
        assert doc, argv
    code, doc = run_json(capsys, "config", "list")
    assert "gpt_tiny" in [d["name"] for d in doc]
    dcp_job = _dcp_job(tmp_path / "dcp")
    code, doc = run_json(capsys, "export", str(dcp_job), "--to", str(tmp_path / "x"))
    assert code == 0 and doc["to"] == str(tmp_path / "x")


@pytest.mark.parametrize(
    ("argv", "kind", "code"),
    [
        (["ls", "--bogus"], "usage", 2),
        (["gc", "/no/such"], "usage", 2),  # --keep missing: argparse
        (["config", "show", "gpt_tiny", "no.such.key=1"], "usage", 2),
        (["status", "/no/such"], "usage", 2),
    ],
)
def test_errors_under_json_are_json_with_the_same_exit_code(capsys, argv, kind, code):
    got, out, _ = run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert got == code and doc["exit"] == code and doc["kind"] == kind and doc["error"]
    assert "usage:" not in out
    try:
        text_code, _, text_err = run(capsys, *argv)
    except SystemExit as e:  # argparse's own way out, in text
        text_code, text_err = e.code, capsys.readouterr().err
    assert text_code == code and "error:" in text_err


def test_damage_found_by_a_command_that_reads_data_is_exit_1_in_json(shm_dir, capsys):
    job = _dcp_job(shm_dir)
    obj = job / "step-4" / "rank-0.mck"
    with ObjectReader(obj) as r:
        at = r.index.tensors[0].offset
    flip(obj, at + 2)
    code, doc = run_json(capsys, "export", str(job), "--to", str(shm_dir / "out"))
    assert code == 1 and doc["kind"] == "damaged" and "checksum mismatch" in doc["error"]


# -- 5. --version, plain help, gc's options ----------------------------------------------------


def test_version_and_help_in_plain_text(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"memckpt {memckpt.__version__} (torch ")
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "exit codes: 0 ok; 1 damage found" in out
    assert "docs/operations.md" in out
    with pytest.raises(SystemExit):
        cli_main(["gc", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--keep N complete steps to keep" in out
    assert "--dry-run print the steps that would be deleted; delete nothing" in out


# -- 6. inspect: non-tensor entries (restricted loader) and the real data size --------------


class Untrusted:
    """A class a load does not allow: inspect must never build it."""

    built = False

    def __setstate__(self, state: Any) -> None:
        Untrusted.built = True


def test_inspect_shows_non_tensor_entries_and_the_data_size(shm_dir, capsys):
    job = save_job(shm_dir)
    code, doc = run_json(capsys, "inspect", str(job), "--step", "1")
    (o,) = doc["objects"]
    assert code == 0 and o["data_bytes"] == 64 and o["size"] > 1 << 20  # a pool buffer
    assert {(e["name"], e["value"]) for e in o["entries"]} == {
        ("step", "1"), ("meta.lr", "0.5"), ("meta.name", "'run'"),
    }  # fmt: skip
    code, out, _ = run(capsys, "inspect", str(job), "--step", "1")
    assert "tensors 64 B, non-tensor part" in out and "meta.name" in out


def test_inspect_never_builds_a_class_a_load_does_not_allow(shm_dir, capsys):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"w": torch.ones(2), "obj": Untrusted()}).wait()
    code, doc = run_json(capsys, "inspect", str(shm_dir / "job"))
    (o,) = doc["objects"]
    assert code == 0 and not Untrusted.built
    assert "Untrusted, which is not allowed to load" in o["entries_error"]


# -- 7. demo: the memory tree, deleted or kept -------------------------------------------------


def _report(kept: bool) -> DemoReport:
    return DemoReport(steps=6, kill_step=5, memory_interval=2, recovered_step=2, tier="memory",
                      sources={0: 0, 1: 0}, recovery_s=0.1, identical=True, reference_sha256="a",
                      final_sha256="a", run_seconds={"reference": 1.0}, plot=None,
                      out_dir="/tmp/demo", memory_tree="/dev/shm/memckpt-demo-x/job",
                      kept=kept)  # fmt: skip


def test_demo_summary_says_where_the_memory_tree_went(capsys):
    print_report(_report(kept=False))
    out = capsys.readouterr().out
    assert "deleted (/dev/shm/memckpt-demo-x/job); --keep keeps it" in out
    assert out.rstrip().endswith("then the memckpt status command it prints")
    print_report(_report(kept=True))
    out = capsys.readouterr().out
    assert "kept: /dev/shm/memckpt-demo-x/job" in out
    assert ("memckpt status /dev/shm/memckpt-demo-x/job/node0 /dev/shm/memckpt-demo-x/job/node1"
            in out)  # fmt: skip
    assert _report(kept=True).as_dict()["status_command"].startswith("memckpt status ")
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    assert "--keep" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_keep_leaves_a_tree_that_status_reads(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "memckpt", "demo", "--steps", "6", "--interval", "2", "--keep",
         "--out", str(tmp_path / "demo"), "--json"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    tree = Path(report["memory_tree"])
    try:
        assert proc.returncode == 0 and report["ok"] and report["kept"], proc.stderr[-3000:]
        cmd = report["status_command"].split()
        assert cmd[:2] == ["memckpt", "status"]
        code, doc = run_json(capsys, *cmd[1:])
        assert code == 0 and doc["job_id"] == "demo" and doc["recovery"]["step"] == 6
        assert {r["state"] for s in doc["steps"] for r in s["ranks"]} == {"ok"}
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)


# -- 8. the pynvml deprecation warning -------------------------------------------------------


def test_the_cli_prints_no_pynvml_warning_and_keeps_other_warnings(shm_dir):
    save_job(shm_dir)
    env = dict(os.environ, PYTHONWARNINGS="always")
    for argv in (["ls", str(shm_dir)], ["inspect", str(shm_dir / "job")]):
        proc = subprocess.run([sys.executable, "-m", "memckpt", *argv], capture_output=True,
                              text=True, timeout=60, env=env)  # fmt: skip
        assert proc.returncode == 0 and "pynvml" not in proc.stderr, proc.stderr
    other = "import warnings; import memckpt.tools.cli; warnings.warn('other', FutureWarning)"
    proc = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert "FutureWarning: other" in proc.stderr
