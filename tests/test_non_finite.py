"""Steps saved holding NaN/Inf are recorded, kept, and passed over by recovery by default.

Checksums cannot see NaN (the bytes are faithfully NaN). Each save checks the staged
copy in the background; the manifest records which ranks and tensors held non-finite
values; the load transaction (so every API) resumes from the newest finite step unless
told otherwise, and retention never lets non-finite saves push that step out.
"""

from __future__ import annotations

import logging

import pytest
import torch

import memckpt
from memckpt.engine.recovery_plan import plan_recovery
from memckpt.errors import ConfigError, NonFiniteStateError
from memckpt.storage.finite import finite_check
from memckpt.storage.inventory import ManifestInfo, StepHoldings
from memckpt.storage.manifest import read_manifest

JOB = "nan"
NAN = float("nan")
INF = float("inf")


def _bits(dtype: torch.dtype, byte: int) -> torch.Tensor:
    return torch.tensor([byte, 0x38], dtype=torch.uint8)


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, 2.0], torch.float32, True),
        ([1.0, NAN], torch.float32, False),
        ([INF, 1.0], torch.float64, False),
        ([-INF, INF], torch.float32, False),  # inf + -inf is NaN: still caught
        ([3e38, 3e38], torch.float32, True),  # the sum overflows; the values are finite
        ([60000.0] * 4, torch.float16, True),  # the fp16 sum would overflow at 65504
        ([1.0, INF], torch.float16, False),
        ([1.0, NAN], torch.bfloat16, False),
        ([1e38, 1e38, 1e38, 1e38], torch.bfloat16, True),
        ([1 + 1j, complex(NAN, 0)], torch.complex64, False),
        ([1 + 1j, 2j], torch.complex128, True),
    ],
)
def test_the_finite_check_of_floating_dtypes(values, dtype, finite):
    t = torch.tensor(values).to(dtype)
    check = finite_check(dtype)
    assert check is not None
    assert check(t.view(-1).view(torch.uint8).numpy()) is finite


@pytest.mark.parametrize(
    ("dtype", "nan_byte"),
    [
        (torch.float8_e4m3fn, 0x7F),
        (torch.float8_e4m3fn, 0xFF),
        (torch.float8_e5m2, 0x7C),  # +inf
        (torch.float8_e5m2, 0xFE),  # a NaN
        (torch.float8_e4m3fnuz, 0x80),
        (torch.float8_e5m2fnuz, 0x80),
    ],
)
def test_float8_types_are_checked_by_their_bit_patterns(dtype, nan_byte):
    check = finite_check(dtype)
    assert check is not None
    good = torch.tensor([1.0, -2.0, 0.5]).to(dtype).view(torch.uint8).numpy()
    assert check(good)
    assert not check(bytes([0x38, nan_byte]))


def test_integer_and_bool_tensors_are_never_checked():
    for dt in (torch.int64, torch.int8, torch.uint8, torch.bool):
        assert finite_check(dt) is None


def _manager(base, **kw) -> memckpt.CheckpointManager:
    return memckpt.CheckpointManager(base, JOB, prefault=False, **kw)


def _sd(v: float, n: int = 1000) -> dict:
    return {"w": torch.full((n,), v), "b": torch.ones(4, dtype=torch.bfloat16), "step": 0}


def test_a_save_records_which_tensors_held_nan_and_keeps_the_step(tmp_path, caplog):
    mgr = _manager(tmp_path)
    try:
        ok = mgr.save(1, _sd(1.0)).wait()
        assert ok.step_finite and ok.non_finite == ()
        bad = _sd(2.0)
        bad["w"][7] = NAN
        bad["emb"] = torch.tensor([INF])
        with caplog.at_level(logging.WARNING, logger="memckpt"):
            r = mgr.save(2, bad).wait()
    finally:
        mgr.close()
    assert r.committed and not r.step_finite and r.non_finite == ("w", "emb")
    m = read_manifest(tmp_path / JOB / "step-2" / "manifest.json")
    assert not m.finite and m.non_finite[0].names == ("w", "emb")
    assert read_manifest(tmp_path / JOB / "step-1" / "manifest.json").finite
    assert any("step 2 was saved holding NaN/Inf" in rec.message for rec in caplog.records)


def test_the_check_reads_the_staged_copy_not_the_live_tensor(tmp_path):
    mgr = _manager(tmp_path)
    try:
        sd = _sd(1.0, n=1 << 20)
        h = mgr.save(1, sd)
        sd["w"].fill_(NAN)  # after save() returned: the staged copy is finite
        assert h.wait().step_finite
        sd2 = _sd(NAN, n=1 << 20)
        h = mgr.save(2, sd2)
        sd2["w"].fill_(1.0)  # and the other way round
        assert not h.wait().step_finite
    finally:
        mgr.close()


def _saved(tmp_path) -> None:
    mgr = _manager(tmp_path, keep_last=5)
    try:
        mgr.save(1, _sd(1.0), blocking=True)
        mgr.save(2, _sd(2.0), blocking=True)
        mgr.save(3, _sd(NAN), blocking=True)
    finally:
        mgr.close()


def test_recovery_resumes_from_the_newest_finite_step_by_default(tmp_path, caplog):
    _saved(tmp_path)
    mgr = _manager(tmp_path)
    try:
        assert mgr.latest() == 2
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="memckpt"):
            out = mgr.load()
        assert mgr.last_load.step == 2 and torch.equal(out["w"], torch.full((1000,), 2.0))
        lines = [r.message for r in caplog.records if "passing over step" in r.message]
        assert len(lines) == 1 and "NaN/Inf" in lines[0] and "loading step 2" in lines[0]
        assert "'w'" in lines[0]
        # a step asked for by number still loads (debugging)
        out = mgr.load(3)
        assert torch.isnan(out["w"]).all()
        # the step is still there after a second restart
        assert mgr.recovery_plan().skipped[3].startswith("saved holding NaN/Inf")
    finally:
        mgr.close()


def test_on_non_finite_load_and_raise(tmp_path, monkeypatch):
    _saved(tmp_path)
    mgr = _manager(tmp_path)
    try:
        out = mgr.load(on_non_finite="load")
        assert mgr.last_load.step == 3 and torch.isnan(out["w"]).all()
        with pytest.raises(NonFiniteStateError, match=r"step 3 .*'w'.*on_non_finite"):
            mgr.load(on_non_finite="raise")
        with pytest.raises(ConfigError, match="on_non_finite"):
            mgr.load(on_non_finite="ignore")
        monkeypatch.setenv("MEMCKPT_ON_NON_FINITE", "load")
        assert mgr.latest() == 3
        monkeypatch.setenv("MEMCKPT_ON_NON_FINITE", "bogus")
        with pytest.raises(ConfigError, match="MEMCKPT_ON_NON_FINITE"):
            mgr.latest()
    finally:
        mgr.close()


def test_retention_never_drops_the_newest_finite_step_for_non_finite_ones(tmp_path):
    mgr = _manager(tmp_path, keep_last=2)
    try:
        mgr.save(1, _sd(1.0), blocking=True)
        for s in (2, 3, 4, 5):
            mgr.save(s, _sd(NAN), blocking=True)
        steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / JOB).glob("step-*"))
        assert steps == [1, 4, 5]
        assert mgr.latest() == 1
        mgr.save(6, _sd(6.0), blocking=True)  # a finite step again: step 1 may go
        steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / JOB).glob("step-*"))
        assert steps == [5, 6]
    finally:
        mgr.close()


def _holdings(digests, non_finite=()) -> StepHoldings:
    info = ManifestInfo(len(digests), tuple(digests), hash(tuple(digests)) & 0xFFFF, 0.0,
                        tuple(non_finite), "rank 1: 'w'" if non_finite else "")  # fmt: skip
    return StepHoldings(dict(enumerate(digests)), info)


def test_the_plan_passes_over_a_step_one_rank_saved_non_finite():
    inv = {5: _holdings([11, 12]), 6: _holdings([21, 22], non_finite=(1,))}
    plan = plan_recovery([inv, inv], 2)
    assert plan.step == 5 and "NaN/Inf" in plan.skipped[6] and "rank 1" in plan.skipped[6]
    assert plan_recovery([inv, inv], 2, on_non_finite="load").step == 6
    raised = plan_recovery([inv, inv], 2, on_non_finite="raise")
    assert raised.step is None and raised.non_finite == (6, "rank 1: 'w'")


def test_ls_and_status_show_a_non_finite_step_and_the_room_check(tmp_path, capsys):
    from memckpt.tools.cli import main as cli_main

    _saved(tmp_path)
    job = str(tmp_path / JOB)
    capsys.readouterr()
    assert cli_main(["ls", job, "--json"]) == 0
    steps = {s["step"]: s for s in __import__("json").loads(capsys.readouterr().out)[0]["steps"]}
    assert steps[2]["finite"] is True and steps[3]["finite"] is False
    assert steps[3]["non_finite"] == {"0": {"count": 1, "tensors": ["w"]}}
    assert cli_main(["ls", job]) == 0
    out = capsys.readouterr().out
    assert "NaN/Inf" in out and "step 3: saved holding NaN/Inf (rank 0: 'w')" in out
    assert cli_main(["status", job, "--json"]) == 0
    doc = __import__("json").loads(capsys.readouterr().out)
    by_step = {s["step"]: s for s in doc["steps"]}
    assert by_step[3]["finite"] is False and not by_step[3]["recoverable"]
    assert "NaN/Inf" in by_step[3]["why_not"] and doc["recovery"]["step"] == 2
    (room,) = doc["room"].values()
    assert room["fits"] is True and room["next_save_bytes"] > 0
    assert cli_main(["status", job]) == 0
    out = capsys.readouterr().out
    assert "no: rank 0: 'w'" in out and "a save like the newest step fits" in out
