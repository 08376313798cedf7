"""Recipes, typed configs and the training loop that `memckpt run` launches."""

from memckpt.recipes.config import ConfigContainer

__all__ = ["ConfigContainer"]
