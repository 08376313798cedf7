"""Pure parts of the training recipes: data positions, fault hook rules, tier choice, schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memckpt.errors
from memckpt.recipes.checkpointing import (
    COMPLETE_MARKER,
    choose_resume_tier,
    latest_persistent_step,
    weights_sha256,
)
from memckpt.recipes.config import CheckpointConfig, ConfigContainer, DataConfig, ModelConfig
from memckpt.recipes.data import ArithmeticData, RegressionData, build_data, decode
from memckpt.recipes.models import build_model
from memckpt.recipes.train import fault_kill_step, lr_at, memory_manager_kwargs, train

# ---- data


def small_arithmetic(seed: int = 0) -> ArithmeticData:
    return ArithmeticData(seed=seed, num_lines=300, max_operand=99, block_size=16)


def test_arithmetic_batches_are_a_pure_function_of_step_rank_and_world() -> None:
    a, b = small_arithmetic(), small_arithmetic()
    b.batch(1, 0, 2, 8)  # b's history differs; the batch must not

    for step in (1, 7, 500):  # 500 is several epochs in
        xa, ya = a.batch(step, 1, 2, 8)
        xb, yb = b.batch(step, 1, 2, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(1, 0, 2, 8)[0], small_arithmetic(seed=1).batch(1, 0, 2, 8)[0])


def test_ranks_read_disjoint_samples_within_an_epoch() -> None:
    data = small_arithmetic()
    world, size = 3, 8
    seen: list[int] = []
    for step in range(1, 6):
        for rank in range(world):
            start = ((step - 1) * world + rank) * size
            seen += data.sampler.items(start, size).tolist()
    assert len(seen) == len(set(seen)) == 5 * world * size


def test_arithmetic_targets_are_inputs_shifted_by_one_over_true_sums() -> None:
    data = small_arithmetic()
    x, y = data.batch(3, 0, 1, 4)

    assert x.shape == y.shape == (4, 16) and data.vocab_size == 13
    assert torch.equal(x[:, 1:], y[:, :-1])
    for line in data.text.split(";")[:50]:
        lhs, rhs = line.split("=")
        a, b = lhs.split("+")
        assert int(a) + int(b) == int(rhs)
    assert set(decode(x[0])) <= set("0123456789+=;")


def test_regression_targets_come_from_a_fixed_teacher() -> None:
    a = RegressionData(seed=3, num_samples=100, dim_in=8, dim_out=2)
    b = RegressionData(seed=3, num_samples=100, dim_in=8, dim_out=2)

    xa, ya = a.batch(2, 1, 2, 5)
    xb, yb = b.batch(2, 1, 2, 5)

    assert xa.shape == (5, 8) and ya.shape == (5, 2)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_mismatched_model_and_data_kinds_are_rejected() -> None:
    cfg = ConfigContainer()
    cfg.model.kind = "mlp"  # data stays "arithmetic"

    with pytest.raises(ValueError, match=r"does not fit data\.kind"):
        train(cfg)
    with pytest.raises(ValueError, match="needs token data"):
        build_model(ModelConfig(kind="gpt"), vocab_size=None)
    with pytest.raises(ValueError, match=r"data\.kind"):
        build_data(DataConfig(kind="images"), ModelConfig())


# ---- fault hook


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"MEMCKPT_KILL_AT_STEP": "8"}, 8),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_RESTART_COUNT": "1"}, None),
        ({"MEMCKPT_KILL_AT_STEP": "8", "TORCHELASTIC_RESTART_COUNT": "2"}, None),
        ({"MEMCKPT_KILL_AT_STEP": "8", "TORCHELASTIC_RESTART_COUNT": "0"}, 8),
        (
            {
                "MEMCKPT_KILL_AT_STEP": "8",
                "MEMCKPT_RESTART_COUNT": "0",
                "TORCHELASTIC_RESTART_COUNT": "1",
            },
            8,
        ),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_KILL_NODE": "1", "MEMCKPT_NODE_ID": "1"}, 8),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_KILL_NODE": "1", "MEMCKPT_NODE_ID": "0"}, None),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_KILL_NODE": "1", "GROUP_RANK": "1"}, 8),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_KILL_NODE": "1", "GROUP_RANK": "0"}, None),
        ({"MEMCKPT_KILL_AT_STEP": "8", "MEMCKPT_KILL_NODE": "1"}, None),
    ],
)
def test_fault_hook_is_armed_only_on_the_first_attempt_of_the_named_node(
    env: dict[str, str], expected: int | None
) -> None:
    assert fault_kill_step(env) == expected


def test_fault_hook_rejects_a_step_that_is_not_a_number() -> None:
    with pytest.raises(ValueError, match="MEMCKPT_KILL_AT_STEP"):
        fault_kill_step({"MEMCKPT_KILL_AT_STEP": "soon"})


# ---- checkpoints


@pytest.mark.parametrize(
    ("memory", "persistent", "tier"),
    [(None, None, None), (10, None, "memory"), (None, 10, "persistent"),
     (20, 10, "memory"), (10, 20, "persistent"), (10, 10, "memory")],
)  # fmt: skip
def test_resume_takes_the_newer_tier_and_memory_on_a_tie(
    memory: int | None, persistent: int | None, tier: str | None
) -> None:
    assert choose_resume_tier(memory, persistent) == tier


def test_persistent_steps_without_the_completion_marker_are_ignored(tmp_path: Path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        if complete:
            (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "step-99.tmp").mkdir()

    assert latest_persistent_step(tmp_path) == 10
    assert latest_persistent_step(tmp_path / "absent") is None


def test_weights_hash_sees_a_single_bit() -> None:
    sd = {"w": torch.ones(4), "b": torch.zeros(2)}
    flipped = {"w": torch.ones(4), "b": torch.zeros(2)}
    flipped["w"].view(torch.int32)[3] ^= 1

    assert weights_sha256(sd) == weights_sha256({k: v.clone() for k, v in sd.items()})
    assert weights_sha256(sd) != weights_sha256(flipped)


def test_replication_is_passed_to_the_manager_only_across_nodes() -> None:
    ckpt = CheckpointConfig()

    one_node = memory_manager_kwargs(ckpt, num_nodes=1, node_id="a")
    two_nodes = memory_manager_kwargs(ckpt, num_nodes=2, node_id="a")
    ckpt.replication.enabled = False
    disabled = memory_manager_kwargs(ckpt, num_nodes=2, node_id="a")

    assert one_node == disabled == {"timeout_s": ckpt.memory.timeout_s}
    assert two_nodes == {"timeout_s": ckpt.memory.timeout_s, "replication": "pairwise",
                         "node_id": "a"}  # fmt: skip


# ---- learning rate


def test_learning_rate_warms_up_linearly_then_decays_to_min_lr() -> None:
    opt = ConfigContainer().optimizer  # lr 3e-3, min 3e-4, 10 warm-up steps

    assert lr_at(0, opt, 100) == pytest.approx(opt.lr / 10)
    assert lr_at(9, opt, 100) == pytest.approx(opt.lr)
    assert lr_at(10, opt, 100) == pytest.approx(opt.lr)
    assert lr_at(55, opt, 100) == pytest.approx((opt.lr + opt.min_lr) / 2)
    assert lr_at(100, opt, 100) == pytest.approx(opt.min_lr)
    assert lr_at(500, opt, 100) == pytest.approx(opt.min_lr)


def test_prune_persistent_keeps_the_newest_complete_steps_and_skips_partial_ones(tmp_path):
    from memckpt.recipes.checkpointing import (
        COMPLETE_MARKER,
        latest_persistent_step,
        prune_persistent,
    )

    for step in (10, 20, 30, 40):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        (d / "data.distcp").write_bytes(b"x")
        if step != 40:  # step 40 is still being written
            (d / COMPLETE_MARKER).write_text("{}")
    assert prune_persistent(tmp_path, 2) == [10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-20", "step-30", "step-40"]
    assert latest_persistent_step(tmp_path) == 30
    with pytest.raises(memckpt.errors.ConfigError, match="keep_last must be >= 1"):
        prune_persistent(tmp_path, 0)
