"""Built-in recipes (zero-argument functions returning a ``ConfigContainer``) and their registry.

Pick one by name with ``get_recipe("gpt_tiny")`` or ``memckpt config show gpt_tiny``;
add your own with ``@register_recipe``, or name any function as ``"package.module:function"``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from memckpt.errors import ConfigError
from memckpt.recipes.config import (
    CheckpointConfig,
    ConfigContainer,
    DataConfig,
    DistConfig,
    MemoryTierConfig,
    ModelConfig,
    OptimizerConfig,
    PersistentTierConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "RECIPES",
    "Recipe",
    "get_recipe",
    "gpt_small_lm",
    "gpt_tiny",
    "mlp_synthetic",
    "register_recipe",
]

Recipe = Callable[[], ConfigContainer]

RECIPES: dict[str, Recipe] = {}
"""Recipes by name; ``register_recipe`` adds to it."""


def register_recipe(fn: Recipe) -> Recipe:
    """Register ``fn`` under its ``__name__`` (usable as a decorator); names are unique."""
    name = fn.__name__
    if name in RECIPES and RECIPES[name] is not fn:
        raise ConfigError(f"a recipe named {name!r} is already registered ({RECIPES[name]!r})")
    RECIPES[name] = fn
    return fn


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``, or the function ``"package.module:function"``."""
    if name in RECIPES:
        return RECIPES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"recipe {name!r}: cannot import {module_name!r}: {e}") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ConfigError(f"recipe {name!r}: {module_name} has no function {attr!r}")
        return fn  # type: ignore[no-any-return]
    close = difflib.get_close_matches(name, list(RECIPES), n=3, cutoff=0.5)
    hint = " Did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
    raise ConfigError(
        f"unknown recipe {name!r}.{hint} Recipes: {', '.join(sorted(RECIPES))} "
        "(or name your own function as 'package.module:function')"
    )


@register_recipe
def gpt_tiny() -> ConfigContainer:
    """Character-level GPT on sums like "12+7=19;": 2 layers, 64 wide; sized for 2 CPU cores."""
    return ConfigContainer(
        train=TrainConfig(steps=300, micro_batch_size=16, log_every=25),
        model=ModelConfig(kind="gpt", n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.0),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.01, warmup_steps=20),
        data=DataConfig(kind="arithmetic", seed=0, num_samples=20000, max_operand=99),
        checkpoint=CheckpointConfig(
            job_id="gpt-tiny",
            memory=MemoryTierConfig(interval=20, keep_last=2),
            persistent=PersistentTierConfig(dir="checkpoints", interval=100),
        ),
    )


@register_recipe
def mlp_synthetic() -> ConfigContainer:
    """A 3-layer MLP regressing a fixed random teacher network; the smallest end-to-end run."""
    return ConfigContainer(
        train=TrainConfig(steps=200, micro_batch_size=64, log_every=20),
        model=ModelConfig(kind="mlp", mlp_in=32, mlp_hidden=256, mlp_layers=3, mlp_out=8),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.0, warmup_steps=10),
        data=DataConfig(kind="regression", seed=0, num_samples=20000),
        checkpoint=CheckpointConfig(
            job_id="mlp-synthetic",
            memory=MemoryTierConfig(interval=10, keep_last=2),
            persistent=PersistentTierConfig(dir="checkpoints", interval=50),
        ),
    )


@register_recipe
def gpt_small_lm() -> ConfigContainer:
    """GPT-2-small-sized (12 layers, 768 wide, 1024 context, ~124M parameters) on GPUs with NCCL.

    Shows the knobs of a real run; too big to train on the 2-core CPU machines.
    """
    return ConfigContainer(
        train=TrainConfig(steps=100_000, micro_batch_size=12, log_every=100, grad_clip=1.0),
        model=ModelConfig(
            kind="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0
        ),
        optimizer=OptimizerConfig(
            lr=6e-4, min_lr=6e-5, weight_decay=0.1, beta1=0.9, beta2=0.95, warmup_steps=2000
        ),
        data=DataConfig(kind="arithmetic", seed=0, num_samples=5_000_000, max_operand=999_999),
        checkpoint=CheckpointConfig(
            job_id="gpt-small-lm",
            # In RAM every 50 steps costs about a copy of weights plus optimizer state (~1.5 GB).
            memory=MemoryTierConfig(interval=50, keep_last=2, timeout_s=600.0),
            persistent=PersistentTierConfig(dir="checkpoints", interval=2000),
        ),
        # With a measured mean time between failures, IterManager picks the Young/Daly interval.
        schedule=ScheduleConfig(redundant_time=30.0, mtbf_s=None),
        dist=DistConfig(backend="nccl", timeout_s=600.0),
    )
