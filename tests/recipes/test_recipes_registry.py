"""The built-in recipes, the registry, and the docs' table of config fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from memckpt.errors import ConfigError
from memckpt.recipes import (
    RECIPES,
    ConfigContainer,
    build_config,
    get_recipe,
    gpt_small_lm,
    gpt_tiny,
    mlp_synthetic,
)
from memckpt.recipes.overrides import to_dict

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def test_registry_holds_the_built_in_recipes() -> None:
    assert {"gpt_tiny", "mlp_synthetic", "gpt_small_lm"} <= set(RECIPES)
    assert get_recipe("gpt_tiny") is gpt_tiny


@pytest.mark.parametrize("name", ["gpt_tiny", "mlp_synthetic", "gpt_small_lm"])
def test_recipes_return_fresh_containers(name: str) -> None:
    a, b = get_recipe(name)(), get_recipe(name)()
    assert isinstance(a, ConfigContainer) and a == b and a is not b
    a.train.steps += 1
    assert b.train.steps != a.train.steps


def test_gpt_tiny_is_small() -> None:
    m = gpt_tiny().model
    assert (m.kind, m.n_layer, m.n_embd, m.block_size) == ("gpt", 2, 64, 64)
    assert m.n_embd % m.n_head == 0


def test_mlp_synthetic_pairs_an_mlp_with_regression_data() -> None:
    cfg = mlp_synthetic()
    assert (cfg.model.kind, cfg.data.kind) == ("mlp", "regression")


def test_gpt_small_lm_is_sized_like_a_small_language_model() -> None:
    m = gpt_small_lm().model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)


def test_unknown_recipe_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError) as info:
        get_recipe("gpt_tiyn")
    msg = str(info.value)
    assert msg.startswith("unknown recipe 'gpt_tiyn'. Did you mean 'gpt_tiny'?")
    assert "Recipes: gpt_small_lm, gpt_tiny, mlp_synthetic" in msg


def test_a_recipe_can_be_named_by_module_and_function() -> None:
    assert get_recipe("memckpt.recipes.recipes:mlp_synthetic") is mlp_synthetic
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        get_recipe("memckpt.recipes.recipes:nope")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        get_recipe("no_such_module_xyz:f")


def test_build_config_rejects_a_recipe_that_returns_something_else() -> None:
    def broken() -> Any:
        return {"train": {}}

    with pytest.raises(ConfigError, match="recipe 'broken' returned dict, not a ConfigContainer"):
        build_config(broken)


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        is_section = isinstance(value, dict) and dataclasses.is_dataclass(_section_type(path))
        paths += _leaf_paths(value, path) if is_section else [path]
    return paths


def _section_type(path: str) -> Any:
    obj: Any = ConfigContainer()
    for part in path.split("."):
        obj = getattr(obj, part)
    return type(obj)


def test_docs_table_lists_every_config_field() -> None:
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", DOCS.read_text(), re.MULTILINE))
    fields = set(_leaf_paths(to_dict(ConfigContainer())))
    missing = sorted(fields - documented)
    assert not missing, f"docs/recipes.md lacks rows for {missing}; add them to the fields table"
