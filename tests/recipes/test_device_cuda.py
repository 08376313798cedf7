"""The recipes on a GPU: NCCL training, CUDA staging into memckpt, resume on the device.

Skipped where torch sees no GPU (the CPU logic is in test_device_placement.py); the
two-rank NCCL test needs two GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_workers as w

import memckpt
from memckpt.recipes.checkpointing import TrainingState
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.models import build_model
from memckpt.recipes.train import train
from memckpt.storage.reader import ObjectReader

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(180),
]


def on_gpu(cfg: ConfigContainer) -> ConfigContainer:
    cfg.dist.backend = "nccl"
    return cfg


def test_gpu_resume_from_memory_is_bit_identical_and_staged_from_cuda(shm_dir: Path) -> None:
    reference = train(on_gpu(w.tiny_config(shm_dir, "ref")))
    stopped = train(on_gpu(w.stopped_at(w.tiny_config(shm_dir, "run"), 7)))
    # the memory objects hold the model as CUDA tensors (staged by memckpt's CUDA path);
    # read before the resumed run, which completes and so deletes the memory tier
    objects = sorted((shm_dir / "run" / "mem" / "run").rglob("*.mck"))
    assert objects, list((shm_dir / "run" / "mem").rglob("*"))
    with ObjectReader(objects[-1]) as r:
        devices = {t.name: t.device for t in r.index.tensors}

    resumed = train(on_gpu(w.tiny_config(shm_dir, "run")))

    assert stopped.final_step == 7
    assert resumed.resumed_from is not None
    assert (resumed.resumed_from.tier, resumed.resumed_from.step) == ("memory", 7)
    assert resumed.weights_sha256 == reference.weights_sha256
    model_devices = {d for name, d in devices.items() if name.startswith("model")}
    assert model_devices == {"cuda:0"}, devices


def test_gpu_persistent_resume_is_bit_identical(shm_dir: Path) -> None:
    reference = train(on_gpu(w.tiny_config(shm_dir, "ref")))
    train(on_gpu(w.stopped_at(w.tiny_config(shm_dir, "run"), 7)))
    cfg = on_gpu(w.tiny_config(shm_dir, "run"))
    cfg.checkpoint.memory.enabled = False

    resumed = train(cfg)

    assert resumed.resumed_from is not None and resumed.resumed_from.tier == "persistent"
    assert resumed.weights_sha256 == reference.weights_sha256


def test_memory_load_restores_model_and_optimizer_on_the_gpu(shm_dir: Path) -> None:
    device = torch.device("cuda", 0)
    cfg = w.tiny_config(shm_dir, "load")

    def state() -> TrainingState:
        torch.manual_seed(0)
        module = build_model(cfg.model, 13).to(device)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return TrainingState(module, opt, sched, device=device)

    saved = state()
    saved.module(torch.zeros(2, 8, dtype=torch.long, device=device)).sum().backward()
    saved.optimizer.step()
    saved.step = 1
    with memckpt.CheckpointManager(shm_dir / "mem", "load", 2) as mgr:
        mgr.save(1, saved.memory_state()).wait()
        fresh = state()  # its optimizer has no moments yet: they come from the checkpoint
        assert fresh.load_memory(mgr) == 1

    for p, q in zip(saved.module.parameters(), fresh.module.parameters()):
        assert q.device == device and torch.equal(p, q)
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and all(m.device == device for m in moments)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_train_with_nccl_and_resume_bit_identically(tmp_path: Path) -> None:
    from memckpt.tools.launch import LaunchSpec, launch_local

    def launch(name: str, stop: int | None) -> list[dict[str, object]]:
        cfg = on_gpu(w.tiny_config(tmp_path, name.split("-")[0]))
        cfg.train.stop_after = stop
        run_dir = tmp_path / name
        res = launch_local(cfg, LaunchSpec(nnodes=1, nproc_per_node=2, run_dir=run_dir,
                                           timeout_s=150))  # fmt: skip
        assert res.ok, (res.returncodes, sorted(run_dir.glob("*.log")))
        return [json.loads((run_dir / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]

    reference = launch("ref", None)
    launch("run-1", 7)
    resumed = launch("run-2", None)

    for rank in (0, 1):
        assert resumed[rank]["resumed_from"]["step"] == 7
        assert resumed[rank]["weights_sha256"] == reference[0]["weights_sha256"]
