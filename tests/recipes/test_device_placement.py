"""Where the recipes train: backend and device choice, on CPU with fake GPU counts.

The GPU path itself (NCCL training, CUDA staging, resume on the device) runs in
test_device_cuda.py, which is skipped where torch sees no GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import train_workers as w

import memckpt.recipes.train as train_mod
from memckpt.errors import ConfigError, MemckptError
from memckpt.recipes.train import Placement, choose_placement, local_placement, train
from memckpt.tools.cli import main as cli_main
from memckpt.tools.demo import choose_demo_placement

CPU = torch.device("cpu")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

# ---- the training placement


@pytest.mark.parametrize(
    ("backend", "available", "count", "local_rank", "expected"),
    [
        ("gloo", False, 0, 0, Placement("gloo", CPU)),
        ("gloo", True, 8, 3, Placement("gloo", CPU)),  # gloo stays on the CPU, GPUs or not
        ("nccl", True, 8, 3, Placement("nccl", torch.device("cuda", 3))),
        ("nccl", True, 1, 0, Placement("nccl", torch.device("cuda", 0))),
        ("auto", True, 2, 1, Placement("nccl", torch.device("cuda", 1))),
        ("auto", False, 0, 0, Placement("gloo", CPU)),
        ("auto", True, 2, 2, Placement("gloo", CPU)),  # a third rank on a 2-GPU node
    ],
)
def test_placement_follows_the_backend_and_the_ranks_gpu(
    backend: str, available: bool, count: int, local_rank: int, expected: Placement
) -> None:
    got = choose_placement(
        backend, cuda_available=available, device_count=count, local_rank=local_rank
    )

    assert got == expected


def test_nccl_without_a_gpu_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"sees none.*dist\.backend=gloo"):
        choose_placement("nccl", cuda_available=False, device_count=0, local_rank=0)


def test_nccl_ranks_never_share_a_gpu() -> None:
    with pytest.raises(ConfigError, match=r"local rank 2 has no GPU.*at most 2 ranks per node"):
        choose_placement("nccl", cuda_available=True, device_count=2, local_rank=2)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"one of gloo, nccl, auto, got 'mpi'"):
        choose_placement("mpi", cuda_available=True, device_count=1, local_rank=0)


def test_local_placement_reads_torchruns_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    assert local_placement("nccl", {"LOCAL_RANK": "2"}).device == torch.device("cuda", 2)
    assert local_placement("nccl", {}).device == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="LOCAL_RANK must be an integer"):
        local_placement("nccl", {"LOCAL_RANK": "two"})


# ---- train() wiring


class _Stop(Exception):
    """Raised by the fake process-group initialiser: the test has seen what it needs."""


def test_train_starts_the_training_group_with_nccl_on_a_gpu_placement(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a (fake) GPU, train binds the device first, then asks for an NCCL group."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train_mod, "_prepare_gpu", lambda d: calls.append(("prepare", d)))

    def init(timeout_s: float, backend: str) -> bool:
        calls.append(("init", backend))
        raise _Stop

    monkeypatch.setattr(train_mod, "_init_process_group", init)
    cfg = w.tiny_config(shm_dir, "nccl")
    cfg.dist.backend = "nccl"

    with pytest.raises(_Stop):
        train(cfg)

    assert calls == [("prepare", torch.device("cuda", 1)), ("init", "nccl")]


@no_gpu
def test_nccl_run_on_a_machine_without_gpu_fails_before_training(shm_dir: Path) -> None:
    cfg = w.tiny_config(shm_dir, "nccl")
    cfg.dist.backend = "nccl"

    with pytest.raises(ConfigError, match="trains on GPUs, but torch sees none"):
        train(cfg)

    assert not (shm_dir / "nccl").exists()  # nothing written


@no_gpu
def test_auto_on_a_cpu_machine_trains_exactly_as_gloo(shm_dir: Path) -> None:
    torch.set_num_threads(1)
    gloo = train(w.tiny_config(shm_dir, "gloo"))
    cfg = w.tiny_config(shm_dir, "auto")
    cfg.dist.backend = "auto"

    auto = train(cfg)

    assert auto.weights_sha256 == gloo.weights_sha256
    assert auto.final_loss == gloo.final_loss


# ---- the demo's placement


def test_demo_cuda_gives_each_simulated_node_its_own_gpu() -> None:
    got = choose_demo_placement("cuda", cuda_available=True, visible_gpus=["4", "6", "7"])

    assert (got.device, got.backend) == ("cuda", "nccl")
    assert got.node_env == {0: {"CUDA_VISIBLE_DEVICES": "4"}, 1: {"CUDA_VISIBLE_DEVICES": "6"}}


@pytest.mark.parametrize(
    ("available", "gpus", "expected"),
    [(False, [], "cpu"), (True, ["0"], "cpu"), (True, ["0", "1"], "cuda")],
)
def test_demo_auto_takes_gpus_only_when_each_node_gets_one(
    available: bool, gpus: list[str], expected: str
) -> None:
    got = choose_demo_placement("auto", cuda_available=available, visible_gpus=gpus)

    assert got.device == expected
    assert got.backend == ("nccl" if expected == "cuda" else "gloo")


def test_demo_cuda_refuses_one_gpu_for_two_nodes() -> None:
    with pytest.raises(MemckptError, match=r"need a GPU each.*1 is visible.*--device cpu"):
        choose_demo_placement("cuda", cuda_available=True, visible_gpus=["0"])


@no_gpu
def test_demo_cuda_without_gpu_is_a_clear_command_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(["demo", "--device", "cuda", "--out", str(tmp_path / "demo")])

    err = capsys.readouterr().err
    assert rc == 2
    assert "--device cuda: torch sees no GPU here" in err and "--device cpu" in err
    assert not (tmp_path / "demo").exists()
