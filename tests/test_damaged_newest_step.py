"""Every copy of the newest step damaged: every API's next load passes over it.

DCP on 2 simulated nodes (1 rank each, pairwise): the first load of the damaged step
fails; ``latest_checkpoint`` then names the older intact step, in the same process and
after a restart, and any complete step loads on any node, wherever its bytes are.
"""

from __future__ import annotations

import shutil

import pytest

from memckpt.storage.manifest import read_manifest
from multiproc import run_ranks
from reshard_workers import (
    flip_first_tensor_byte,
    load_damaged_newest,
    load_newest_loadable,
    load_step,
    save_steps,
    save_with_custom_planner,
)

pytestmark = pytest.mark.slow

NODES = {0: {"MEMCKPT_NODE_ID": "node0"}, 1: {"MEMCKPT_NODE_ID": "node1"}}


@pytest.mark.timeout(240)
def test_dcp_damaged_newest_step_is_passed_over_by_latest_and_after_restart(tmp_path):
    run_ranks(save_steps, 2, str(tmp_path), [20, 30], timeout=120, env_per_rank=NODES)
    damaged = sorted(tmp_path.glob("node*/job/step-30/rank-*.mck"))
    assert len(damaged) == 4  # 2 ranks x 2 nodes
    for obj in damaged:
        flip_first_tensor_byte(obj)
    out = run_ranks(load_damaged_newest, 2, str(tmp_path), timeout=120, env_per_rank=NODES)
    for r in (0, 1):
        assert out[r]["first"] == "step-30" and "checksum mismatch" in out[r]["failed"], out[r]
        assert out[r]["second"] == "step-20" and out[r]["ok"], out[r]
    # a restart agrees; then node 1 is replaced and step 20 is loaded by name there
    out = run_ranks(load_step, 2, str(tmp_path), 20, timeout=120, env_per_rank=NODES)
    assert out == {r: {"latest": "step-20", "ok": True} for r in (0, 1)}
    shutil.rmtree(tmp_path / "node1")
    out = run_ranks(load_step, 2, str(tmp_path), 20, timeout=120, env_per_rank=NODES)
    assert out == {r: {"latest": "step-21", "ok": True} for r in (0, 1)}


@pytest.mark.timeout(240)
def test_dcp_load_newest_passes_over_a_damaged_step_in_one_call(tmp_path):
    run_ranks(save_steps, 2, str(tmp_path), [20, 30], timeout=120, env_per_rank=NODES)
    for obj in tmp_path.glob("node*/job/step-30/rank-*.mck"):
        flip_first_tensor_byte(obj)
    out = run_ranks(load_newest_loadable, 2, str(tmp_path), timeout=120, env_per_rank=NODES)
    assert out == {r: {"cid": "step-20", "step": 20, "ok": True} for r in (0, 1)}


@pytest.mark.timeout(120)
def test_dcp_manifest_with_metadata_is_written_on_every_node_for_custom_planners(tmp_path):
    run_ranks(save_with_custom_planner, 2, str(tmp_path), timeout=120, env_per_rank=NODES)
    manifests = [read_manifest(tmp_path / n / "job" / "step-7" / "manifest.json")
                 for n in ("node0", "node1")]  # fmt: skip
    assert all(m is not None and ".metadata" in m.blobs for m in manifests)
    assert manifests[0] == manifests[1]  # one manifest, the same bytes on every node


@pytest.mark.timeout(240)
def test_megatron_damaged_newest_step_and_a_named_step_on_a_replaced_node(tmp_path):
    pytest.importorskip("megatron.core")
    import megatron_workers as mw

    run_ranks(mw.save_steps_two_nodes, 2, str(tmp_path), [20, 30], timeout=180,
              env_per_rank=NODES)  # fmt: skip
    # node 1 replaced; after the restart lines (latest_checkpoint names step 30) the older
    # step 20 loads by its plain id there too
    spare = tmp_path.parent / f"{tmp_path.name}-spare"
    shutil.copytree(tmp_path / "node0", spare / "node0")
    out = run_ranks(mw.load_named_step, 2, str(spare), 20, "latest", timeout=180,
                    env_per_rank=NODES)  # fmt: skip
    assert out == {0: "step-20", 1: "step-20"}
    shutil.rmtree(spare)
    damaged = sorted(tmp_path.glob("node*/job/step-30/rank-*.mck"))
    assert len(damaged) == 4
    for obj in damaged:
        flip_first_tensor_byte(obj)
    out = run_ranks(mw.load_damaged_newest, 2, str(tmp_path), timeout=180, env_per_rank=NODES)
    for r in (0, 1):
        assert out[r]["first"] == "step-30" and "checksum mismatch" in out[r]["failed"], out[r]
        assert out[r]["second"] == "step-20", out[r]
    shutil.rmtree(tmp_path / "node1")  # node 1 replaced; step 20 named explicitly
    out = run_ranks(mw.load_named_step, 2, str(tmp_path), 20, "prepare", timeout=180,
                    env_per_rank=NODES)  # fmt: skip
    assert out == {0: "step-20", 1: "step-20"}


@pytest.mark.timeout(240)
def test_one_node_two_ranks_a_damaged_object_falls_back_in_one_call(tmp_path):
    # Given 2 ranks on one node (one tree): no other node holds a copy of anything
    one_node = {0: {"MEMCKPT_NODE_ID": "node0"}, 1: {"MEMCKPT_NODE_ID": "node0"}}
    run_ranks(save_steps, 2, str(tmp_path), [20, 30], timeout=120, env_per_rank=one_node)
    (obj,) = tmp_path.glob("node0/job/step-30/rank-0.mck")
    flip_first_tensor_byte(obj)
    # When both load the newest loadable step: rank 1 must not count rank 0 as another
    # holder of the same (damaged) file, so the step is marked damaged and passed over
    out = run_ranks(load_newest_loadable, 2, str(tmp_path), timeout=120, env_per_rank=one_node)
    assert out == {r: {"cid": "step-20", "step": 20, "ok": True} for r in (0, 1)}
    assert list(tmp_path.glob("node0/job/step-30/damaged.*"))
