"""YAML files merged onto a recipe, dict conversion, precedence recipe < YAML < CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from memckpt.errors import ConfigError
from memckpt.recipes import (
    ConfigContainer,
    build_config,
    from_dict,
    from_yaml,
    gpt_small_lm,
    gpt_tiny,
    merge_dict,
    merge_yaml,
    mlp_synthetic,
    to_dict,
    to_yaml,
)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def yaml_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        merge_yaml(gpt_tiny(), path)
    return str(info.value).replace(str(path), "run.yaml")


def test_yaml_sets_only_the_keys_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 40\noptimizer:\n  lr: 1e-3\n")
    cfg = merge_yaml(gpt_tiny(), path)
    expected = gpt_tiny()
    expected.train.steps, expected.optimizer.lr = 40, 1e-3
    assert cfg == expected


def test_yaml_merges_into_nested_sections_and_dict_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "checkpoint:\n  memory:\n    interval: 3\nlogger:\n  tags:\n    team: infra\n",
    )
    cfg = merge_yaml(gpt_tiny(), path)
    assert cfg.checkpoint.memory.interval == 3
    assert cfg.checkpoint.memory.keep_last == gpt_tiny().checkpoint.memory.keep_last
    assert cfg.logger.tags == {"team": "infra"}


def test_an_empty_yaml_file_changes_nothing(tmp_path: Path) -> None:
    assert merge_yaml(gpt_tiny(), write(tmp_path, "# nothing here\n")) == gpt_tiny()


def test_yaml_wrong_type_names_file_line_key_and_type(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "train:\n  micro_batch_size: 8\n  steps: abc\n")
    assert msg == "run.yaml:3: train.steps: expected int, got str 'abc'"


def test_yaml_unknown_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "model:\n  n_layers: 4\n")
    assert msg.startswith("run.yaml:2: unknown key 'model.n_layers'; did you mean 'model.n_layer'")
    assert "Valid keys under 'model' (ModelConfig): kind, n_layer, n_head" in msg


def test_yaml_unknown_section_is_an_error(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "trainer:\n  steps: 4\n")
    assert msg.startswith("run.yaml:1: unknown key 'trainer'; did you mean 'train'?")


def test_yaml_uses_yaml_1_2_booleans(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "train:\n  progress: yes\n")
    assert msg == "run.yaml:2: train.progress: expected bool, got str 'yes' (write true or false)"


def test_yaml_numbers_for_str_fields_must_be_quoted(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "checkpoint:\n  job_id: 7\n")
    assert msg == (
        "run.yaml:2: checkpoint.job_id: expected str, got int 7 (quote it to make it a string)"
    )
    ok = merge_yaml(gpt_tiny(), write(tmp_path, "checkpoint:\n  job_id: '7'\n", "ok.yaml"))
    assert ok.checkpoint.job_id == "7"


def test_yaml_section_given_a_scalar_is_an_error(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "train: 5\n")
    assert msg.startswith("run.yaml:1: train: expected TrainConfig (a mapping), got int 5")


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "the top level must be a mapping" in yaml_error(tmp_path, "- 1\n- 2\n")


def test_yaml_duplicate_keys_are_errors(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "train:\n  steps: 3\n  steps: 4\n")
    assert msg == "run.yaml:3: duplicate key 'train.steps' (first at line 2)"


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "train:\n  steps: [1\n")
    assert msg.startswith("run.yaml:3: invalid YAML: while parsing a flow sequence")


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: YAML file not found"):
        merge_yaml(gpt_tiny(), tmp_path / "nope.yaml")


def test_yaml_interpolations_resolve_against_recipe_and_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "optimizer:\n  lr: 0.01\n  min_lr: ${optimizer.lr}\n"
        "logger:\n  tags:\n    job: run-${checkpoint.job_id}\n",
    )
    cfg = merge_yaml(gpt_tiny(), path)
    assert cfg.optimizer.min_lr == 0.01
    assert cfg.logger.tags == {"job": "run-gpt-tiny"}


def test_yaml_unresolvable_interpolation_names_the_key(tmp_path: Path) -> None:
    msg = yaml_error(tmp_path, "optimizer:\n  min_lr: ${optimizer.nope}\n")
    assert msg.startswith("run.yaml:2: optimizer.min_lr: cannot resolve interpolation:")
    assert "optimizer.nope" in msg


def test_precedence_is_recipe_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 40\n  log_every: 4\n")
    cfg = build_config("gpt_tiny", path, ["train.steps=7"])
    assert cfg.train.steps == 7  # override beats YAML
    assert cfg.train.log_every == 4  # YAML beats recipe
    assert cfg.train.micro_batch_size == gpt_tiny().train.micro_batch_size  # recipe kept


def test_overrides_can_reset_what_yaml_set(tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer:\n  lr: 0.5\n")
    cfg = build_config(gpt_tiny, path, ["~optimizer.lr"])
    assert cfg.optimizer.lr == ConfigContainer().optimizer.lr


@pytest.mark.parametrize("recipe", [gpt_tiny, mlp_synthetic, gpt_small_lm])
def test_to_yaml_reads_back_to_the_same_config(recipe: object, tmp_path: Path) -> None:
    cfg = build_config(
        recipe,  # type: ignore[arg-type]
        overrides=[
            "checkpoint.job_id=007",
            "logger.level=1e-3",
            "+logger.tags.flag=yes",
            "schedule.mtbf_s=3600",
        ],
    )
    path = write(tmp_path, to_yaml(cfg), "dump.yaml")
    assert from_yaml(ConfigContainer, path) == cfg
    assert merge_yaml(ConfigContainer(), path) == cfg


def test_to_yaml_quotes_strings_that_look_like_other_types() -> None:
    cfg = build_config("gpt_tiny", overrides=["checkpoint.job_id=007", "+logger.tags.a=true"])
    text = to_yaml(cfg)
    assert "job_id: '007'" in text
    assert "a: 'true'" in text


def test_to_dict_from_dict_round_trip() -> None:
    cfg = gpt_small_lm()
    data = to_dict(cfg)
    assert data["model"]["n_embd"] == 768
    assert data["checkpoint"]["memory"]["interval"] == 50
    assert from_dict(ConfigContainer, data) == cfg


def test_from_dict_is_checked_and_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(ConfigContainer, {"train": {"steps": "many"}}, source="job.json")
    assert str(info.value) == "job.json: train.steps: expected int, got str 'many'"


def test_merge_dict_leaves_its_input_unchanged() -> None:
    cfg = gpt_tiny()
    new = merge_dict(cfg, {"train": {"steps": 1}})
    assert new.train.steps == 1 and cfg.train.steps == 300
