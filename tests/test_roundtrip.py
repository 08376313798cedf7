from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.errors import StateDictMismatchError, UnsupportedValueError
from zoo import LOAD_NON_FINITE, all_dtypes, assert_same, make_zoo


@pytest.fixture(autouse=True)
def _zoo_holds_nan(monkeypatch):
    monkeypatch.setenv(*next(iter(LOAD_NON_FINITE.items())))


@pytest.fixture
def mgr(shm_dir: Path):
    m = memckpt.CheckpointManager(shm_dir, "job", keep_last=2)
    yield m
    m.close()


def test_zoo_round_trips_bit_exactly_in_one_process(mgr):
    # Given a state dict with every dtype, 0-d, empty, strided, tied and non-tensor values
    zoo = make_zoo()
    # When it is saved and loaded back as new tensors
    mgr.save(10, zoo).wait()
    out = mgr.load()
    # Then every value comes back with the same type, dtype, shape and bits
    assert_same(zoo, out)
    assert mgr.last_load is not None and mgr.last_load.step == 10


def test_every_torch_dtype_round_trips(mgr):
    assert len(all_dtypes()) >= 15
    sd = {str(d): torch.ones(2, dtype=d) for d in all_dtypes()}
    mgr.save(1, sd, blocking=True)
    out = mgr.load()
    for k, t in sd.items():
        assert out[k].dtype == t.dtype


def test_tied_tensors_come_back_as_one_object(mgr):
    zoo = make_zoo()
    mgr.save(1, zoo).wait()
    out = mgr.load()
    assert out["tied_a"] is out["tied_b"]
    assert isinstance(out["param"], torch.nn.Parameter)


def test_non_contiguous_tensors_keep_logical_values(mgr):
    base = torch.arange(24.0).reshape(4, 6)
    sd = {"t": base.t(), "s": base[:, ::2], "e": torch.tensor(1.0).expand(3, 3)}
    mgr.save(1, sd).wait()
    out = mgr.load()
    for k in sd:
        assert torch.equal(out[k], sd[k])
        assert out[k].shape == sd[k].shape


def test_load_into_existing_state_dict_copies_in_place(mgr):
    zoo = make_zoo(seed=1)
    mgr.save(5, zoo).wait()
    # Given an existing state dict of the same structure holding other values
    dest = make_zoo(seed=2)
    dest["expanded"] = torch.zeros(3, 4)  # an expanded view cannot receive data in place
    big = dest["big"]
    strided_dest = dest["strided"]
    # When loading into it
    out = mgr.load(state_dict=dest)
    # Then the same tensor objects now hold the saved values, and non-tensors are updated
    assert out is dest
    assert dest["big"] is big and torch.equal(big, zoo["big"])
    assert dest["strided"] is strided_dest and torch.equal(strided_dest, zoo["strided"])
    assert_same(zoo["dtypes"], dest["dtypes"])
    assert dest["rng_python"] == zoo["rng_python"]


def test_load_into_mismatched_state_dict_names_key_and_changes_nothing(mgr):
    sd = {"a": torch.ones(4), "b": torch.ones(2, 3), "c": torch.ones(3)}
    mgr.save(1, sd).wait()
    dest = {"a": torch.zeros(4), "b": torch.zeros(3, 2), "c": torch.zeros(3, dtype=torch.int32)}
    with pytest.raises(StateDictMismatchError) as err:
        mgr.load(state_dict=dest)
    msg = str(err.value)
    assert "'b'" in msg and "(3, 2)" in msg and "(2, 3)" in msg
    assert "'c'" in msg and "torch.int32" in msg and "torch.float32" in msg
    # nothing was partially overwritten, not even the key that matched
    assert torch.equal(dest["a"], torch.zeros(4))


def test_load_into_expanded_view_is_refused_before_copying(mgr):
    mgr.save(1, {"a": torch.ones(3, 4), "b": torch.ones(2)}).wait()
    dest = {"a": torch.zeros(4).expand(3, 4), "b": torch.zeros(2)}
    with pytest.raises(StateDictMismatchError, match=r"'a'.*expanded"):
        mgr.load(state_dict=dest)
    assert torch.equal(dest["b"], torch.zeros(2))


def test_load_strict_reports_keys_missing_from_checkpoint(mgr):
    mgr.save(1, {"a": torch.ones(1), "b": torch.ones(1)}).wait()
    with pytest.raises(StateDictMismatchError, match=r"'z'.*not in the checkpoint"):
        mgr.load(state_dict={"a": torch.zeros(1), "z": torch.zeros(1)})
    dest = {"a": torch.zeros(1), "z": torch.zeros(1)}
    mgr.load(state_dict=dest, strict=False)
    assert dest["a"].item() == 1.0 and dest["z"].item() == 0.0


def test_load_fills_a_fresh_optimizer_state_dict(mgr):
    # Given a trained optimizer's state and a fresh one whose state is still empty
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    mgr.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}).wait()
    fresh_model = torch.nn.Linear(3, 2)
    fresh = torch.optim.AdamW(fresh_model.parameters())
    dest = {"model": fresh_model.state_dict(), "optim": fresh.state_dict()}
    # When loading into it, the missing state entries are created and merged in
    mgr.load(state_dict=dest)
    fresh.load_state_dict(dest["optim"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(fresh_model.weight, model.weight)


def test_caller_may_mutate_tensors_right_after_async_save(mgr):
    # Given an async save of a large tensor
    t = torch.arange(4 << 20, dtype=torch.float32)
    expected = t.clone()
    handle = mgr.save(1, {"t": t})
    # When the caller overwrites it before the save completes
    t.fill_(-1.0)
    handle.wait()
    # Then the checkpoint holds the values at save time
    assert torch.equal(mgr.load()["t"], expected)


def test_save_result_reports_bytes_and_timings(mgr):
    res = mgr.save(3, {"t": torch.zeros(1000)}).wait()
    assert res.step == 3 and res.nbytes == 4000 and res.num_tensors == 1
    assert 0 < res.blocking_s <= res.total_s
    assert res.committed


def test_load_without_checkpoint_returns_none(mgr):
    assert mgr.latest() is None
    assert mgr.load() is None
    with pytest.raises(memckpt.CheckpointNotFoundError, match="step 7"):
        mgr.load(step=7)


def test_load_specific_step(mgr):
    for s in (1, 2):
        mgr.save(s, {"s": torch.tensor(s)}).wait()
    assert mgr.load(step=1)["s"].item() == 1
    assert mgr.load()["s"].item() == 2


@dataclasses.dataclass
class Custom:
    lr: float


def test_unknown_classes_need_explicit_safe_globals(mgr):
    mgr.save(1, {"cfg": Custom(0.5), "t": torch.ones(1)}).wait()
    with pytest.raises(UnsupportedValueError, match=r"test_roundtrip\.Custom.*safe_globals"):
        mgr.load()
    out = mgr.load(safe_globals=[Custom])
    assert out["cfg"] == Custom(0.5)


def test_plain_numpy_values_round_trip_without_numpys_unpickler(mgr):
    np = pytest.importorskip("numpy")
    sd = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">i4"),
        "empty": np.zeros((0, 3)),
        "f64": np.float64(2.5),
        "i8": np.int8(-3),
        "when": np.datetime64("2024-01-02T03:04"),
    }
    mgr.save(1, sd).wait()
    out = mgr.load()
    for k, v in sd.items():
        assert type(out[k]) is type(v) and out[k].dtype == v.dtype, k
        assert np.array_equal(out[k], v), k
    assert out["fortran"].flags.f_contiguous and out["a"].flags.writeable


def test_fractions_load_and_ranges_need_an_opt_in(mgr):
    mgr.save(1, {"f": Fraction(-3, 4), "r": range(2, 10, 3)}).wait()
    with pytest.raises(UnsupportedValueError, match=r"builtins\.range.*safe_globals"):
        mgr.load()
    out = mgr.load(safe_globals=[range])
    assert out == {"f": Fraction(-3, 4), "r": range(2, 10, 3)}


def test_types_the_loader_only_calls_checked_are_refused_at_save(mgr):
    # str, bytes, bytearray and Fraction load through checked constructors; the types
    # themselves would come back as those, so they are refused when saving
    for t in (str, bytes, bytearray, Fraction):
        with pytest.raises(UnsupportedValueError, match=rf"type {t.__name__} itself"):
            mgr.save(1, {"cast": t})
    mgr.save(1, {"cast": int, "kinds": [dict, list, float]}).wait()
    assert mgr.load() == {"cast": int, "kinds": [dict, list, float]}


def test_malicious_skeleton_is_never_executed(shm_dir, mgr):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (shm_dir / "pwned",))

    mgr.save(1, {"x": Evil()}).wait()
    with pytest.raises(UnsupportedValueError):
        mgr.load()
    assert not (shm_dir / "pwned").exists()


def test_unsupported_tensors_are_rejected_with_their_key(mgr):
    with pytest.raises(UnsupportedValueError, match=r"'sp'.*sparse"):
        mgr.save(1, {"sp": torch.eye(3).to_sparse()})


def test_invalid_job_ids_and_steps_are_rejected(shm_dir):
    for bad in ("../x", "a/b", "", ".hidden", "a..b"):
        with pytest.raises(memckpt.InvalidNameError):
            memckpt.CheckpointManager(shm_dir, bad)
    with memckpt.CheckpointManager(shm_dir, "ok") as m:
        for bad in (-1, 1.5, "3"):
            with pytest.raises(memckpt.InvalidNameError):
                m.save(bad, {})


def test_state_that_grows_gets_a_bigger_buffer(mgr):
    for s, n in enumerate((1000, 5 << 20, 100)):
        mgr.save(s, {"t": torch.arange(n)}).wait()
        assert mgr.load()["t"].numel() == n


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_come_back_on_their_device(mgr):  # pragma: no cover - needs CUDA
    sd = {"g": torch.randn(1000, device="cuda"), "c": torch.randn(3)}
    mgr.save(1, sd).wait()
    out = mgr.load()
    assert out["g"].device == sd["g"].device and torch.equal(out["g"], sd["g"])
    dest = {"g": torch.zeros(1000, device="cuda"), "c": torch.zeros(3)}
    mgr.load(state_dict=dest)
    assert torch.equal(dest["g"], sd["g"])


def test_blocking_save_hashes_in_parallel_and_verifies_on_load(mgr):
    # Given a blocking save, whose staging copies and hashes chunks on all cores
    zoo = make_zoo(seed=3)
    res = mgr.save(4, zoo, blocking=True).wait()
    assert res.blocking_s == res.total_s
    # Then load re-hashes every chunk and finds them all intact
    assert_same(zoo, mgr.load())
