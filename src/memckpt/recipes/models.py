"""Small models for the recipes: a character-level GPT and a regression MLP.

Both map inputs to outputs; ``loss_function`` gives the matching loss, so the training
loop treats them alike (and DDP wraps the plain forward).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memckpt.errors import ConfigError
from memckpt.recipes.config import ModelConfig

__all__ = ["GPT", "MLP", "build_model", "loss_function"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x MLP, each with a residual."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over characters; the output head shares the token embedding."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(_init_weights)
        # GPT-2: scale the residual projections by the depth
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time), time <= block_size."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ConfigError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class MLP(nn.Module):
    """``mlp_layers`` linear layers (``mlp_in -> mlp_hidden ... -> mlp_out``) with GELU between."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.mlp_layers < 1:
            raise ConfigError(f"model.mlp_layers must be >= 1, got {cfg.mlp_layers}")
        widths = [cfg.mlp_in] + [cfg.mlp_hidden] * (cfg.mlp_layers - 1) + [cfg.mlp_out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if i:
                layers += [nn.GELU(), nn.Dropout(cfg.dropout)]
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> nn.Module:
    """The model ``cfg.kind`` names ("gpt" needs ``vocab_size``), initialised from torch's RNG."""
    if cfg.kind == "gpt":
        if vocab_size is None:
            raise ConfigError("model.kind 'gpt' needs token data (data.kind 'arithmetic')")
        return GPT(cfg, vocab_size)
    if cfg.kind == "mlp":
        return MLP(cfg)
    raise ConfigError(f"model.kind must be 'gpt' or 'mlp', got {cfg.kind!r}")


def loss_function(cfg: ModelConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy over tokens for "gpt", mean squared error for "mlp"."""
    if cfg.kind == "gpt":
        return lambda logits, targets: F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
    if cfg.kind == "mlp":
        return F.mse_loss
    raise ConfigError(f"model.kind must be 'gpt' or 'mlp', got {cfg.kind!r}")
