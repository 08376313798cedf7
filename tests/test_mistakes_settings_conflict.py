"""A job opened twice with other settings names only the options that differ, and who set them."""

from __future__ import annotations

import pytest

import memckpt
from memckpt.engine.runtime import RuntimeOptions, differing_options


def test_a_conflict_names_only_the_differing_options_with_both_values_and_who_set_them(shm_dir):
    # Given a job opened by one manager
    # When a second manager asks for other keep_last and transfer timeout
    with (
        memckpt.CheckpointManager(shm_dir, "job", keep_last=2, transfer_timeout_s=30.0),
        pytest.raises(memckpt.MemckptError) as e,
    ):
        memckpt.CheckpointManager(shm_dir, "job", keep_last=3, transfer_timeout_s=5.0)
    msg = str(e.value)
    # Then the error names those two options, each with both values, and no full dumps
    assert "RuntimeOptions(" not in msg, msg
    assert "keep_last=2 where this call asks for 3" in msg, msg
    assert "transfer_timeout_s=30.0 where this call asks for 5.0" in msg, msg
    for same in ("chunk_size", "prefault", "durable", "replication", "connections"):
        assert same not in msg, (same, msg)
    # and who opened the job, and who asks: the API and the caller's line in this file
    assert msg.count("CheckpointManager at test_mistakes_settings_conflict.py:") == 2, msg


def test_differing_options_lists_compared_fields_in_declaration_order():
    a = RuntimeOptions(keep_last=2, replication="pairwise", extra=(("x", 1),))
    b = RuntimeOptions(keep_last=3, replication=None, extra=(("x", 2),))
    assert differing_options(a, b) == ["keep_last", "replication"]  # extra is not compared
    assert differing_options(a, a) == []
