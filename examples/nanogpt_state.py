"""A nanoGPT-style character model trained with memckpt.State and IterManager.

The memckpt parts follow velastic's README in its order: ``get_extra_state``, the
``State`` and ``IterManager``, the resume, the loop. The text is generated (no download),
the model is tiny, and everything runs on CPU with gloo:

    python examples/nanogpt_state.py --base-dir /dev/shm/ckpt              # one process
    torchrun --standalone --nproc-per-node 2 examples/nanogpt_state.py --base-dir /dev/shm/ckpt

Under preemption (SIGTERM at the deadline; each run resumes where the last one saved):

    memckpt simulate-preemption --timeout 20 --restarts 2 --grace 5 --cmd 'torchrun \\
        --standalone --nproc-per-node 2 examples/nanogpt_state.py --base-dir /dev/shm/ckpt'

Batches are drawn with the global torch RNG and dropout uses it too, as in nanoGPT; the
RNG states, the prefetched batch and the optimizer are in the checkpoint, so a
preempted run ends with the same weights as an uninterrupted one (``--out`` writes
them from rank 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import memckpt
from memckpt.schedule import IterManager

log = logging.getLogger("nanogpt_state")


# -- data: generated text ------------------------------------------------------------------


def generate_text(n_sentences: int = 3000, seed: int = 0) -> str:
    """Sentences from a small grammar: the same text for the same arguments."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "every bird", "she", "he"]
    verbs = ["sees", "likes", "chases", "finds", "sings to", "waits for", "remembers"]
    objects = ["the moon", "a red ball", "the river", "her brother", "the quiet town", "bread"]
    tails = ["", " at night", " in the rain", " every day", " again", " slowly"]
    return " ".join(
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}."
        for _ in range(n_sentences)
    )


# -- model: nanoGPT's shape, small ------------------------------------------------------------


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.1


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd)
        )
        self.dropout = nn.Dropout(c.dropout)
        self.p = c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0
        )
        x = x + self.dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.shape[1])
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# -- training ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-dir", default=os.environ.get("MEMCKPT_BASE_DIR", "/dev/shm/memckpt"))
    p.add_argument("--job", default="nanogpt")
    p.add_argument("--max-iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--save-interval", type=int, default=50, help="IterManager save_interval")
    p.add_argument("--margin", type=float, default=3.0, help="IterManager redundant_time (s)")
    p.add_argument("--step-time", type=float, default=0.0, help="extra seconds per iteration")
    p.add_argument("--out", default=None, help="rank 0 writes the final weights here")
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(1)  # ranks share the machine's cores

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    master_process = rank == 0
    random.seed(1337 + rank)
    np.random.seed(1337 + rank)
    torch.manual_seed(1337 + rank)

    text = generate_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    config = GPTConfig(vocab_size=len(chars))

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - config.block_size, (args.batch_size,))
        x = torch.stack([d[i : i + config.block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + config.block_size] for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
        return args.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, ratio))))

    torch.manual_seed(0)  # the same initial weights on every rank
    model: nn.Module = GPT(config)
    torch.manual_seed(1337 + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95))
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    raw_model = model.module if ddp else model

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        raw_model.eval()
        out = {s: sum(raw_model(*get_batch(s))[1].item() for _ in range(5)) / 5 for s in splits}
        raw_model.train()
        return out

    iter_num = 0
    best_val_loss = 1e9
    X, Y = get_batch("train")  # fetch the very first batch

    # ======================== memckpt (velastic's structure) ========================
    def get_extra_state() -> dict:
        # velastic's example also keeps iter_num here; memckpt's State has the step itself
        return {"best_val_loss": best_val_loss, "X": X, "Y": Y}

    state = memckpt.State(
        model=model,
        optimizer=optimizer,
        framework="ddp" if ddp else "single",
        get_extra_fn=get_extra_state,
        include_rng=True,  # python, numpy, torch (and CUDA) RNG states, per rank
        base_dir=args.base_dir,
        job_id=args.job,
        timeout_s=60,
    )
    iter_mngr = IterManager(
        total_iters=args.max_iters,
        redundant_time=args.margin,
        save_ckpt_time=1.0,
        save_interval=args.save_interval,
        state=state,  # the step counter, and the saves to time and wait for
    )

    extra_state = state.maybe_resume_from_ckpt()  # errors propagate; None: nothing saved yet
    if extra_state is not None:
        iter_num = state.step
        best_val_loss = extra_state["best_val_loss"]
        X, Y = extra_state["X"], extra_state["Y"]
        log.info("rank %d: resumed at iteration %d", rank, iter_num)
    # ======================== memckpt ========================

    finished = False
    t0 = time.time()
    try:
        while True:
            iter_mngr.iter()  # first thing in every iteration; advances state.step
            iter_num = state.step
            if iter_mngr.should_save_ckpt():
                state.save(sync=False)
                if iter_mngr.exit_requested:  # saved for the deadline or a signal: leave
                    log.info("rank %d: %s; exiting", rank, iter_mngr.explain())
                    break
            if iter_num >= args.max_iters:
                finished = True
                break

            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if iter_num % args.eval_interval == 0 and master_process:
                losses = estimate_loss()
                best_val_loss = min(best_val_loss, losses["val"])
                log.info("step %d: train loss %.4f, val loss %.4f", iter_num, losses["train"],
                         losses["val"])  # fmt: skip

            _, loss = model(X, Y)
            X, Y = get_batch("train")  # prefetch the next batch, as nanoGPT does
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.step_time:
                time.sleep(args.step_time)
            if iter_num % 50 == 0 and master_process:
                log.info("iter %d: loss %.4f, %.1f ms/iter", iter_num, loss.item(),
                         1000 * iter_mngr.avg_iter_time)  # fmt: skip
        iter_mngr.finalize()  # waits for the save in flight; restores signal handlers
        if finished and master_process and args.out:
            torch.save(raw_model.state_dict(), args.out)
            log.info("finished %d iterations in %.1fs; weights in %s", args.max_iters,
                     time.time() - t0, args.out)  # fmt: skip
    finally:
        iter_mngr.close()
        state.close()
        if ddp:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
