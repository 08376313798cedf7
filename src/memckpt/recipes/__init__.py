"""Recipes, typed configs and the training loop that `memckpt run` launches.

``build_config("gpt_tiny", "run.yaml", ["train.steps=50"])`` gives the config of a run:
the recipe, then the YAML file, then the overrides (see ``memckpt.recipes.overrides``).
"""

from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.overrides import (
    Override,
    apply_overrides,
    build_config,
    from_dict,
    from_yaml,
    merge_dict,
    merge_yaml,
    parse_override,
    quote_value,
    to_dict,
    to_yaml,
)
from memckpt.recipes.recipes import (
    RECIPES,
    Recipe,
    get_recipe,
    gpt_small_lm,
    gpt_tiny,
    mlp_synthetic,
    register_recipe,
)

__all__ = [
    "RECIPES",
    "ConfigContainer",
    "Override",
    "Recipe",
    "apply_overrides",
    "build_config",
    "from_dict",
    "from_yaml",
    "get_recipe",
    "gpt_small_lm",
    "gpt_tiny",
    "merge_dict",
    "merge_yaml",
    "mlp_synthetic",
    "parse_override",
    "quote_value",
    "register_recipe",
    "to_dict",
    "to_yaml",
]
