"""``pip install memckpt`` alone runs the main job: wheel, fresh venv, ``memckpt demo``.

Builds the wheel of this checkout, installs it with ``torch==2.13.0`` and nothing else
(no extras: no matplotlib) into a new virtual environment, and runs ``memckpt demo``
from there: the help, then a 6-step demo that must end with identical weights, a
one-line note instead of the plot, and no warning about numpy or PyYAML.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
TORCH = "2.13.0"
# What a missing core dependency looked like: torch without numpy, the recipes without PyYAML.
MISSING_DEPENDENCY_SIGNS = ("numpy", "pyyaml", "no module named", "install the recipes extra")


def run(cmd: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``cmd`` with an environment that cannot see this checkout's sources."""
    # Bytecode is written on first import (the wheel is installed --no-compile): without it
    # every process of the demo compiles torch's modules again, minutes in all.
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{tail}"
    return proc


def fresh_venv(root: Path) -> Path:
    """A new venv under ``root`` without pip (this environment's pip installs into it)."""
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], root, 120)
    return venv / "bin" / "python"


def test_plain_install_runs_the_demo_with_identical_weights(tmp_path: Path) -> None:
    # Given: the wheel of this checkout in a new venv with torch and no extras
    if importlib.util.find_spec("pip") is None:
        pytest.skip("needs pip in the test environment to build and install the wheel")
    pip = [sys.executable, "-m", "pip"]
    wheels = tmp_path / "wheels"
    run([*pip, "wheel", "--no-deps", "-q", "-w", wheels, REPO], tmp_path, 300)
    (wheel,) = wheels.glob("memckpt-*.whl")
    python = fresh_venv(tmp_path)
    run([*pip, "--python", python, "install", "-q", "--no-compile", f"torch=={TORCH}", wheel],
        tmp_path, 400)  # fmt: skip
    memckpt = python.parent / "memckpt"

    where = run([python, "-c", "import memckpt, torch; print(memckpt.__file__, torch.__version__)"],
                tmp_path, 120).stdout.split()  # fmt: skip
    assert where[0].startswith(str(tmp_path / "venv")), where  # the wheel, not this checkout
    assert where[1].split("+")[0] == TORCH
    probe = "import importlib.util as u; print(u.find_spec('matplotlib') is None)"
    assert run([python, "-c", probe], tmp_path, 60).stdout.strip() == "True"  # no recipes extra

    # When: the help, then a short demo
    help_ = run([memckpt, "demo", "--help"], tmp_path, 120)
    demo = run([memckpt, "demo", "--steps", "6", "--interval", "2", "--out", tmp_path / "demo",
                "--json"], tmp_path, 300)  # fmt: skip

    # Then: both work, silently about dependencies, and the weights are identical
    assert "--device" in help_.stdout and help_.stderr == ""
    report = json.loads(demo.stdout[demo.stdout.index("{") :])
    assert report["identical"] is True and report["ok"] is True, report
    assert report["tier"] == "memory" and report["sources"] == {"0": 0, "1": 0}
    assert report["plot"] is None
    notes = [line for line in demo.stderr.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "no plot" in notes[0], demo.stderr
    quiet = "\n".join([line for line in demo.stderr.splitlines() if line not in notes])
    logs = "\n".join(p.read_text() for p in (tmp_path / "demo").rglob("node*.log"))
    for text in (quiet, logs):
        assert not [s for s in MISSING_DEPENDENCY_SIGNS if s in text.lower()], text[-3000:]
    assert run([python, "-c", "import torch; print(torch.__version__)"], tmp_path,
               60).stdout.strip().split("+")[0] == TORCH  # fmt: skip
