"""``memckpt config show`` and ``memckpt config list`` through ``memckpt.tools.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memckpt.recipes import ConfigContainer, build_config, from_yaml, to_yaml
from memckpt.tools.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_show_prints_the_recipe_as_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "config", "show", "gpt_tiny")
    assert rc == 0
    assert out == to_yaml(build_config("gpt_tiny"))
    assert out.startswith("train:\n  steps: 300\n")


def test_show_applies_yaml_then_overrides_in_any_argument_order(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 40\n  log_every: 4\n")
    expected = build_config("gpt_tiny", path, ["train.steps=7", "+logger.tags.team=infra"])
    for argv in (
        ["gpt_tiny", "--yaml", str(path), "train.steps=7", "+logger.tags.team=infra"],
        ["--yaml", str(path), "gpt_tiny", "train.steps=7", "+logger.tags.team=infra"],
        ["gpt_tiny", "train.steps=7", "--yaml", str(path), "+logger.tags.team=infra"],
    ):
        rc, out, _ = run(capsys, "config", "show", *argv)
        assert rc == 0, argv
        assert from_yaml(ConfigContainer, "stdout", text=out) == expected, argv


def test_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "config", "show", "mlp_synthetic", "train.steps=3", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["train"]["steps"] == 3 and doc["model"]["kind"] == "mlp"


def test_show_reports_a_bad_override_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "config", "show", "gpt_tiny", "train.steps=abc")
    assert (rc, out) == (2, "")
    assert err == (
        "memckpt: error: override 'train.steps=abc': train.steps: expected int, got str 'abc'\n"
    )


def test_show_reports_an_unknown_key_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "config", "show", "gpt_tiny", "model.n_layers=3")
    assert rc == 2
    assert "unknown key 'model.n_layers'; did you mean 'model.n_layer'" in err


def test_show_reports_an_unknown_recipe_with_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, _, err = run(capsys, "config", "show", "gpt_tiyn")
    assert rc == 2
    assert err.startswith("memckpt: error: unknown recipe 'gpt_tiyn'. Did you mean 'gpt_tiny'?")


def test_show_reports_a_bad_yaml_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: fast\n")
    rc, _, err = run(capsys, "config", "show", "gpt_tiny", "--yaml", str(path))
    assert rc == 2
    assert f"{path}:2: optimizer.lr: expected float, got str 'fast'" in err


def test_show_rejects_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config", "show", "gpt_tiny", "--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_show_help_after_the_recipe_prints_the_override_forms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = run(capsys, "config", "show", "gpt_tiny", "--help")
    assert rc == 0
    assert "++key=value" in out and "--yaml FILE" in out


def test_list_names_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "config", "list")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["gpt_small_lm", "gpt_tiny", "mlp_synthetic"]
