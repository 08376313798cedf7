"""Every check a training run makes of its config, runnable before anything is launched.

``check_config(cfg)`` raises one ``ConfigError`` that lists every problem (``"; "``
between them, so it stays one line): the loop's ranges, the model's construction
constraints (the model is built on the ``meta`` device, so nothing is allocated),
the data set's size, the log level, the job id, the replication spec and the
schedule. ``train()`` calls it on every rank; ``memckpt run`` calls it before it
starts torchrun, so a mistake costs one line and exit 2, not a launch.

``check_placement`` is the device check of ``dist.backend`` for ranks started on
this machine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from memckpt.errors import ConfigError, MemckptError
from memckpt.recipes.config import ConfigContainer

__all__ = ["BACKENDS", "check_config", "check_placement", "config_problems"]

BACKENDS = ("gloo", "nccl", "auto")
"""Values of ``dist.backend``: ``gloo`` trains on the CPU, ``nccl`` on GPUs, ``auto`` picks."""

_KINDS = {"gpt": "arithmetic", "mlp": "regression"}
# The shortest line of the arithmetic corpus, "0+0=0;": a corpus of n lines has >= 6n tokens.
_MIN_LINE_TOKENS = 6
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_config(cfg: ConfigContainer) -> None:
    """Raise ConfigError naming every problem of ``cfg`` (one line); see the module."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def config_problems(cfg: ConfigContainer) -> list[str]:
    """Every problem of ``cfg``, each a sentence naming its key; empty when it can run."""
    out: list[str] = []
    for check in (_loop, _model, _data, _checkpoint, _schedule, _logging_and_dist):
        out += check(cfg)
    return out


def _at_least(name: str, value: float, minimum: float) -> list[str]:
    return [] if value >= minimum else [f"{name} must be >= {minimum}, got {value}"]


def _loop(cfg: ConfigContainer) -> list[str]:
    t, o = cfg.train, cfg.optimizer
    out = _at_least("train.steps", t.steps, 0)
    out += _at_least("train.micro_batch_size", t.micro_batch_size, 1)
    out += _at_least("train.log_every", t.log_every, 1)
    if t.stop_after is not None and t.stop_after < 0:
        out.append(f"train.stop_after must be >= 0 or None, got {t.stop_after}")
    if not math.isfinite(t.grad_clip):
        out.append(f"train.grad_clip must be a finite number, got {t.grad_clip}")
    if not o.lr > 0:
        out.append(f"optimizer.lr must be > 0, got {o.lr}")
    out += _at_least("optimizer.warmup_steps", o.warmup_steps, 0)
    # AdamW's own checks, which it would raise on every rank
    for name, beta in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:
            out.append(f"{name} must be in [0, 1), got {beta}")
    out += _at_least("optimizer.weight_decay", o.weight_decay, 0.0)
    return out


def _model(cfg: ConfigContainer) -> list[str]:
    m = cfg.model
    if m.kind not in _KINDS:
        return [f"model.kind must be 'gpt' or 'mlp', got {m.kind!r}"]
    out = []
    if _KINDS[m.kind] != cfg.data.kind:
        out.append(
            f"model.kind {m.kind!r} does not fit data.kind {cfg.data.kind!r}; "
            "use gpt with arithmetic or mlp with regression"
        )
    if not 0.0 <= m.dropout <= 1.0:
        out.append(f"model.dropout must be in [0, 1], got {m.dropout}")
    if m.kind == "gpt":
        for name in ("n_head", "n_embd", "block_size"):
            out += _at_least(f"model.{name}", getattr(m, name), 1)
        out += _at_least("model.n_layer", m.n_layer, 0)
        if m.n_head >= 1 and m.n_embd >= 1 and m.n_embd % m.n_head:
            out.append(f"model.n_embd ({m.n_embd}) must be a multiple of n_head ({m.n_head})")
    else:
        for name in ("mlp_layers", "mlp_in", "mlp_hidden", "mlp_out"):
            out += _at_least(f"model.{name}", getattr(m, name), 1)
    if not out:
        out += _build_on_meta(cfg)
    return out


def _build_on_meta(cfg: ConfigContainer) -> list[str]:
    """Whatever else the model's constructors refuse, without allocating its weights."""
    import torch

    from memckpt.recipes.data import ARITHMETIC_VOCAB
    from memckpt.recipes.models import build_model

    vocab = len(ARITHMETIC_VOCAB) if cfg.model.kind == "gpt" else None
    try:
        with torch.device("meta"):
            build_model(cfg.model, vocab)
    except ConfigError as e:
        return [str(e)]
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return [f"model: cannot build {cfg.model.kind!r} from this config: {e}"]
    return []


def _data(cfg: ConfigContainer) -> list[str]:
    d = cfg.data
    if d.kind not in _KINDS.values():
        return [f"data.kind must be 'arithmetic' or 'regression', got {d.kind!r}"]
    out = _at_least("data.num_samples", d.num_samples, 1)
    if d.kind == "arithmetic":
        out += _at_least("data.max_operand", d.max_operand, 0)
        block = cfg.model.block_size
        if not out and d.num_samples * _MIN_LINE_TOKENS <= block:
            from memckpt.recipes.data import arithmetic_corpus

            tokens = len(arithmetic_corpus(d.seed, d.num_samples, d.max_operand))
            if tokens <= block:
                out.append(
                    f"the corpus has {tokens} tokens, too few for windows of {block} "
                    "(model.block_size); raise data.num_samples"
                )
    return out


def _checkpoint(cfg: ConfigContainer) -> list[str]:
    from memckpt.ids import validate_job_id
    from memckpt.replication import strategy_from_spec

    c = cfg.checkpoint
    out = []
    try:
        validate_job_id(c.job_id)
    except MemckptError as e:
        out.append(f"checkpoint.job_id: {e}")
    out += _at_least("checkpoint.memory.interval", c.memory.interval, 1)
    out += _at_least("checkpoint.memory.keep_last", c.memory.keep_last, 1)
    if c.memory.enabled:
        if not c.memory.timeout_s > 0:
            out.append(f"checkpoint.memory.timeout_s must be > 0, got {c.memory.timeout_s}")
        if not c.memory.base_dir:
            out.append("checkpoint.memory.base_dir is empty; name a tmpfs directory")
    if c.memory.persist_every is not None:
        out += _at_least("checkpoint.memory.persist_every", c.memory.persist_every, 1)
    if c.memory.persist_dir is not None:
        from memckpt.engine.drain import check_persist

        try:
            check_persist(None, c.memory.persist_dir)
        except MemckptError as e:
            out.append(f"checkpoint.memory.persist_dir: {e}")
    out += _at_least("checkpoint.persistent.interval", c.persistent.interval, 1)
    if c.persistent.keep_last is not None:
        out += _at_least("checkpoint.persistent.keep_last", c.persistent.keep_last, 1)
    if c.memory.enabled and c.replication.enabled:
        try:
            strategy_from_spec(c.replication.strategy)
        except MemckptError as e:
            out.append(f"checkpoint.replication.strategy: {e}")
    return out


def _schedule(cfg: ConfigContainer) -> list[str]:
    if not cfg.schedule.enabled:
        return []
    from memckpt.schedule import IterManager

    s = cfg.schedule
    try:  # the loop's own construction, without signal handlers
        IterManager(total_iters=max(cfg.train.steps, 0), redundant_time=s.redundant_time,
                    mtbf_s=s.mtbf_s, signals=()).close()  # fmt: skip
    except MemckptError as e:
        return [f"schedule: {e}"]
    return []


def _logging_and_dist(cfg: ConfigContainer) -> list[str]:
    out = []
    # what Logger.setLevel accepts: a level name maps to its number
    if not isinstance(logging.getLevelName(cfg.logger.level.upper()), int):
        out.append(f"logger.level must be one of {', '.join(_LEVELS)}, got {cfg.logger.level!r}")
    if cfg.dist.backend not in BACKENDS:
        out.append(
            f"dist.backend must be one of {', '.join(BACKENDS)}, got {cfg.dist.backend!r} "
            "(gloo: CPU, nccl: GPUs, auto: nccl where each rank has a GPU)"
        )
    if not cfg.dist.timeout_s > 0:
        out.append(f"dist.timeout_s must be > 0, got {cfg.dist.timeout_s}")
    return out


def check_placement(
    cfg: ConfigContainer,
    nproc_per_node: int,
    *,
    devices: Callable[[], tuple[bool, int]] | None = None,
) -> None:
    """Raise ConfigError when ``dist.backend`` cannot place ``nproc_per_node`` ranks here.

    For ranks that start on this machine (simulated nodes, NeMo-Run's local executor):
    the check each rank makes at start (``choose_placement``), for its highest local
    rank. ``devices`` returns (CUDA available, device count); default: torch's.
    """
    from memckpt.recipes.train import choose_placement

    if devices is None:
        import torch

        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    else:
        available, count = devices()
    choose_placement(cfg.dist.backend, cuda_available=available, device_count=count,
                     local_rank=nproc_per_node - 1)  # fmt: skip
