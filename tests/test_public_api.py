"""What ``import memckpt`` offers, and that every error a user can meet is a MemckptError."""

from __future__ import annotations

import ast
from pathlib import Path

import memckpt

SRC = Path(memckpt.__file__).parent
BUILTIN = {"ValueError", "TypeError", "RuntimeError", "KeyError", "OSError", "Exception"}


def test_import_memckpt_exports_the_user_api_only():
    seams = {"SaveTransaction", "Ballot", "Vote", "NodeRuntime", "ObjectLocator", "ObjectSource",
             "RecoveryPlan", "StepHoldings", "plan_recovery", "collective_vote"}  # fmt: skip
    assert not seams & set(memckpt.__all__)
    for name in ("CheckpointManager", "LoadInfo", "SaveResult", "State", "MemoryStorageWriter",
                 "MemoryStorageReader", "MemckptError"):  # fmt: skip
        assert name in memckpt.__all__ and getattr(memckpt, name) is not None


def test_every_exported_error_is_a_memckpt_error():
    for name in memckpt.__all__:
        obj = getattr(memckpt, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, memckpt.MemckptError), name


def test_apis_and_engine_raise_memckpt_errors_not_builtin_ones():
    bad = []
    for folder in ("adapters", "engine"):
        for path in sorted((SRC / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    fn = node.exc.func
                    if isinstance(fn, ast.Name) and fn.id in BUILTIN:
                        bad.append(f"{path.relative_to(SRC)}:{node.lineno}: raise {fn.id}")
    for path in (SRC / "manager.py",):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                fn = node.exc.func
                if isinstance(fn, ast.Name) and fn.id in BUILTIN:
                    bad.append(f"manager.py:{node.lineno}: raise {fn.id}")
    assert bad == []


def test_keep_last_is_checked_once_with_a_config_error(tmp_path):
    import pytest

    from memckpt.adapters.dcp import MemoryStorageWriter

    for bad in (0, -1, 1.5, True):
        with pytest.raises(memckpt.ConfigError, match="keep_last"):
            memckpt.CheckpointManager(tmp_path, "job", keep_last=bad)
    with pytest.raises(memckpt.ConfigError, match="persist_every"):
        MemoryStorageWriter(persist_every=0, persist_dir=tmp_path)
    with pytest.raises(memckpt.ConfigError, match="persist_dir"):
        memckpt.CheckpointManager(tmp_path, "job", persist_every=2)
