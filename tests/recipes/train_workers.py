"""Configs and per-rank functions of the training tests (importable by spawned children)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.train import TrainResult, train


def tiny_config(root: Path, name: str, *, steps: int = 12, kind: str = "gpt") -> ConfigContainer:
    """A model and data set small enough for a dozen steps in well under a second."""
    cfg = ConfigContainer()
    cfg.train.steps = steps
    cfg.train.micro_batch_size = 4
    cfg.train.log_every = 1
    cfg.train.progress = False
    cfg.model.kind = kind
    cfg.model.n_layer = 1
    cfg.model.n_head = 2
    cfg.model.n_embd = 32
    cfg.model.block_size = 16
    cfg.model.dropout = 0.1  # so the RNG states matter for bit identity
    cfg.model.mlp_hidden = 32
    cfg.model.mlp_layers = 2
    cfg.data.kind = "arithmetic" if kind == "gpt" else "regression"
    cfg.data.num_samples = 500
    cfg.optimizer.warmup_steps = 3
    cfg.checkpoint.job_id = name
    cfg.checkpoint.memory.base_dir = str(root / name / "mem")
    cfg.checkpoint.memory.interval = 3
    cfg.checkpoint.memory.timeout_s = 30.0
    cfg.checkpoint.persistent.dir = str(root / name / "persistent")
    cfg.checkpoint.persistent.interval = 5
    cfg.logger.metrics_file = str(root / name / "metrics.jsonl")
    cfg.dist.timeout_s = 30.0
    return cfg


def stopped_at(cfg: ConfigContainer, step: int) -> ConfigContainer:
    """``cfg`` that leaves cleanly after ``step`` (the LR schedule still spans train.steps)."""
    cfg.train.stop_after = step
    return cfg


def train_reference_and_stop(
    rank: int, world: int, reference: ConfigContainer, stopping: ConfigContainer, copy: list[str]
) -> dict[str, TrainResult]:
    """A run to the end, one that stops early; then rank 0 copies ``copy[0]`` to ``copy[1]``."""
    torch.set_num_threads(1)
    out = {"reference": train(reference), "stopped": train(stopping)}
    if rank == 0:
        shutil.copytree(copy[0], copy[1])
    dist.barrier()
    return out


def train_configs(rank: int, world: int, configs: dict[str, Any]) -> dict[str, TrainResult]:
    """``train`` each config in turn, in this process."""
    torch.set_num_threads(1)
    return {name: train(cfg) for name, cfg in configs.items()}
