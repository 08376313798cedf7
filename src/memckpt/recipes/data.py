"""Synthetic training data made locally from a seed: no downloads, no iterator state.

A batch is a pure function of (data seed, step, rank, world size): sample ``s`` of the
run is ``((step - 1) * world_size + rank) * batch_size + i``, so ranks read disjoint
samples, and the data position of a run is just its step. Samples are drawn without
replacement within an epoch (a seeded permutation per epoch), so resuming at step N
reads exactly what an uninterrupted run reads there.

``arithmetic``: a character corpus of lines like ``"12+7=19;"`` over the fixed
vocabulary ``ARITHMETIC_VOCAB``; a sample is a window of ``block_size`` tokens and
its target is the same window shifted by one.
``regression``: inputs drawn from N(0, 1) and the outputs of a fixed random teacher
network (``mlp_in -> mlp_out``).
"""

from __future__ import annotations

import random
from typing import Final, Protocol

import torch

from memckpt.errors import ConfigError
from memckpt.recipes.config import DataConfig, ModelConfig

__all__ = [
    "ARITHMETIC_VOCAB",
    "ArithmeticData",
    "EpochSampler",
    "RegressionData",
    "SyntheticData",
    "arithmetic_corpus",
    "build_data",
    "decode",
    "encode",
    "first_sample",
]

ARITHMETIC_VOCAB: Final = "0123456789+=;"
_CHAR_TO_ID: Final = {c: i for i, c in enumerate(ARITHMETIC_VOCAB)}
_TEACHER_HIDDEN: Final = 64
# Keeps the per-epoch permutations of different seeds apart (any large odd constant).
_EPOCH_SALT: Final = 0x9E3779B1


class SyntheticData(Protocol):
    """What the training loop needs from a data set."""

    @property
    def vocab_size(self) -> int | None:
        """Tokens in the vocabulary; None for non-token data."""
        ...

    def batch(
        self, step: int, rank: int, world_size: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of ``batch_size`` samples for optimizer step ``step`` (>= 1)."""
        ...


def encode(text: str) -> torch.Tensor:
    """Token ids (int64) of ``text``; raises ValueError on a character outside the vocabulary."""
    try:
        return torch.tensor([_CHAR_TO_ID[c] for c in text], dtype=torch.long)
    except KeyError as e:
        raise ConfigError(
            f"character {e.args[0]!r} is not in the arithmetic vocabulary {ARITHMETIC_VOCAB!r}"
        ) from None


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of token ids."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return "".join(ARITHMETIC_VOCAB[i] for i in values)


def arithmetic_corpus(seed: int, num_lines: int, max_operand: int) -> str:
    """``num_lines`` sums ``"a+b=c;"`` with operands in [0, max_operand], from ``seed``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        lines.append(f"{a}+{b}={a + b};")
    return "".join(lines)


class EpochSampler:
    """Maps global sample numbers to item indices: a seeded permutation of items per epoch."""

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ConfigError(f"a data set needs at least one item, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * _EPOCH_SALT + epoch) % (1 << 63))
            perm = torch.randperm(self.num_items, generator=g)
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def items(self, first_sample: int, count: int) -> torch.Tensor:
        """Item indices of samples ``first_sample .. first_sample + count - 1``."""
        samples = torch.arange(first_sample, first_sample + count)
        epochs = samples // self.num_items
        positions = samples % self.num_items
        out = torch.empty(count, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[positions[mask]]
        return out


def first_sample(step: int, rank: int, world_size: int, batch_size: int) -> int:
    """Global number of the first sample rank ``rank`` reads at step ``step`` (>= 1)."""
    if step < 1:
        raise ConfigError(f"steps count from 1, got {step}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size}")
    return ((step - 1) * world_size + rank) * batch_size


class ArithmeticData:
    """Windows of a character corpus of sums; targets are the inputs shifted by one token."""

    def __init__(self, seed: int, num_lines: int, max_operand: int, block_size: int) -> None:
        self.block_size = block_size
        self.text = arithmetic_corpus(seed, num_lines, max_operand)
        self.tokens = encode(self.text)
        if len(self.tokens) <= block_size:
            raise ConfigError(
                f"the corpus has {len(self.tokens)} tokens, too few for windows of "
                f"{block_size}; raise data.num_samples"
            )
        self.sampler = EpochSampler(len(self.tokens) - block_size, seed)

    @property
    def vocab_size(self) -> int:
        return len(ARITHMETIC_VOCAB)

    def batch(
        self, step: int, rank: int, world_size: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.sampler.items(first_sample(step, rank, world_size, batch_size), batch_size)
        offsets = starts[:, None] + torch.arange(self.block_size + 1)[None, :]
        windows = self.tokens[offsets]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class RegressionData:
    """Inputs from N(0, 1) and the outputs of a fixed random tanh teacher network."""

    def __init__(self, seed: int, num_samples: int, dim_in: int, dim_out: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # float64 then float32: the table does not depend on BLAS blocking details.
        w1 = torch.randn(dim_in, _TEACHER_HIDDEN, generator=g, dtype=torch.float64)
        w2 = torch.randn(_TEACHER_HIDDEN, dim_out, generator=g, dtype=torch.float64)
        x = torch.randn(num_samples, dim_in, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ w1 / dim_in**0.5) @ w2 / _TEACHER_HIDDEN**0.5
        self.inputs = x.float()
        self.targets = y.float()
        self.sampler = EpochSampler(num_samples, seed)

    @property
    def vocab_size(self) -> None:
        return None

    def batch(
        self, step: int, rank: int, world_size: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.items(first_sample(step, rank, world_size, batch_size), batch_size)
        return self.inputs[idx], self.targets[idx]


def build_data(data: DataConfig, model: ModelConfig) -> ArithmeticData | RegressionData:
    """The data set ``data.kind`` names, shaped for ``model`` (block size, widths)."""
    if data.kind == "arithmetic":
        return ArithmeticData(data.seed, data.num_samples, data.max_operand, model.block_size)
    if data.kind == "regression":
        return RegressionData(data.seed, data.num_samples, model.mlp_in, model.mlp_out)
    raise ConfigError(f"data.kind must be 'arithmetic' or 'regression', got {data.kind!r}")
