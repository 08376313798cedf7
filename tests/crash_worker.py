"""Saves steps into a memckpt tree until killed; content is a pure function of the step."""

from __future__ import annotations

import sys

import torch

import memckpt


def state_for(step: int, salt: int = 0) -> dict:
    g = torch.Generator().manual_seed(step * 1000 + salt)
    return {
        "w": torch.randn(1 << 20, generator=g),  # 4 MiB: a chunked tensor
        "b": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "step": step,
        "nested": {"k": torch.full((5,), step, dtype=torch.int32)},
    }


def main() -> None:
    base, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    salt = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # a re-save writes other content
    with memckpt.CheckpointManager(base, "job", keep_last=1) as m:
        for step in range(first, last + 1):
            m.save(step, state_for(step, salt)).wait()
            print(step, flush=True)


if __name__ == "__main__":
    main()
