"""memckpt.engine.rng: one RNG state dict that every loader reads and every caller restores."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import memckpt
from memckpt.engine.rng import capture_rng_state, restore_rng_state
from memckpt.errors import CorruptCheckpointError


def draws() -> dict[str, Any]:
    """One value from each generator on the CPU (and from each GPU's, where there are GPUs)."""
    out: dict[str, Any] = {
        "python": [*(random.random() for _ in range(3)), random.gauss(0, 1)],
        "numpy": [*np.random.rand(3).tolist(), float(np.random.standard_normal())],
        "torch": torch.rand(3).tolist(),
    }
    if torch.cuda.is_initialized():
        out["cuda"] = [torch.rand(3, device=f"cuda:{i}").tolist()
                       for i in range(torch.cuda.device_count())]  # fmt: skip
    return out


def seeded() -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # python and numpy now hold a cached Gaussian
    np.random.standard_normal()


def test_restore_replays_every_generator() -> None:
    # Given: a captured state, then draws that move every generator on
    seeded()
    state = capture_rng_state()
    expected = draws()

    # When: the state is restored
    restore_rng_state(state)

    # Then: every generator draws the same values again
    assert draws() == expected


def test_state_holds_only_plain_data_and_tensors() -> None:
    state = capture_rng_state()

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (int, float, str, torch.Tensor))

    assert plain(state), state.keys()
    assert {"python", "numpy", "torch"} <= set(state)


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="CUDA is initialised in this process")
def test_without_cuda_initialised_the_state_has_no_cuda_entry() -> None:
    state = capture_rng_state()

    assert set(state) == {"python", "numpy", "torch"}
    assert not torch.cuda.is_initialized()  # capturing does not start CUDA


def test_round_trip_through_torch_load_weights_only() -> None:
    # Given: a captured state written with torch.save
    seeded()
    buf = io.BytesIO()
    torch.save(capture_rng_state(), buf)
    expected = draws()

    # When: it is read back by the weights-only loader and restored
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True))

    # Then
    assert draws() == expected


def test_round_trip_through_a_checkpoint_manager(tmp_path: Path) -> None:
    # Given: a captured state saved as part of a memory checkpoint
    seeded()
    with memckpt.CheckpointManager(tmp_path, "rng", keep_last=1) as mgr:
        mgr.save(1, {"rng": capture_rng_state()}, blocking=True)
        expected = draws()

        # When: it is loaded through memckpt's restricted loader and restored
        loaded = mgr.load()
        restore_rng_state(loaded["rng"])

    # Then
    assert draws() == expected


def test_a_state_without_numpy_and_cuda_entries_restores_the_rest() -> None:
    # Given: a state with only python's and torch's generators
    seeded()
    state = {k: v for k, v in capture_rng_state().items() if k in ("python", "torch")}
    expected = draws()
    np.random.seed(99)  # numpy moves on elsewhere

    # When
    restore_rng_state(state)

    # Then: python and torch replay; numpy is left where it was
    got = draws()
    assert (got["python"], got["torch"]) == (expected["python"], expected["torch"])
    np.random.seed(99)
    assert got["numpy"] == draws()["numpy"]


def test_gpu_states_of_devices_this_process_lacks_are_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a state written on a 3-GPU node, restored where 1 GPU is visible
    state = capture_rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    set_devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, i: set_devices.append(i))

    # When
    with caplog.at_level(logging.DEBUG, logger="memckpt.engine.rng"):
        restore_rng_state(state)

    # Then: device 0 gets its state, the others are logged and skipped
    assert set_devices == [0]
    assert "3 CUDA generator states, this process sees 1" in caplog.text


def test_gpu_states_restore_nothing_where_torch_sees_no_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seeded()
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    expected = draws()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with caplog.at_level(logging.DEBUG, logger="memckpt.engine.rng"):
        restore_rng_state(state)

    assert draws() == expected
    assert "torch sees no GPU here" in caplog.text


@pytest.mark.parametrize("layout", ["state", "lightning", "recipes"])
def test_layouts_written_before_this_module_still_restore(layout: str) -> None:
    # Given: a state in the layout one of the three callers stored before
    seeded()
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cpu = torch.get_rng_state()
    if layout == "state":
        old: dict[str, Any] = {"python": py, "torch": cpu,
                               "numpy": (str(kind), keys.copy(), int(pos), int(has_gauss),
                                         float(gauss))}  # fmt: skip
    elif layout == "lightning":
        old = {"torch": cpu, "python": py, "numpy": np.random.get_state()}
    else:
        numpy_state = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
        old = {"torch": cpu, "python": py, "numpy": numpy_state}
    expected = draws()

    # When
    restore_rng_state(old)

    # Then
    assert draws() == expected


def test_something_else_than_an_rng_state_is_refused() -> None:
    with pytest.raises(CorruptCheckpointError, match="not an RNG state"):
        restore_rng_state({"model": torch.zeros(1)})
    with pytest.raises(CorruptCheckpointError, match="'python' cannot be restored"):
        restore_rng_state({"python": [3, [1, 2], None]})
