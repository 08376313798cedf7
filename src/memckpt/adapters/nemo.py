"""NeMo 2.0 on memckpt: memory checkpoints and an AutoResume that prefers the memory tier.

NeMo 2.0 trains through Lightning, so the Lightning adapter does the work; this module
adds the one call NeMo recipes make (the shape of ML Flashpoint's documented NeMo
integration)::

    from memckpt.adapters.lightning import MemoryCheckpointCallback
    from memckpt.adapters.nemo import wrap_trainer_and_auto_resume

    trainer = nl.Trainer(..., callbacks=[MemoryCheckpointCallback(JOB_DIR, every_n_steps=50,
                                                                  skip_every_n_steps=500)])
    resume = wrap_trainer_and_auto_resume(trainer, JOB_DIR, default_auto_resume=nl.AutoResume(
        resume_if_exists=True, resume_ignore_no_checkpoint=True))
    llm.train(model, data, trainer, resume=resume, ...)       # or resume.setup(trainer, model)

The returned AutoResume resolves the persistent checkpoint exactly as the user's one
does; at fit start, once the process group exists, every rank agrees on the newest
complete memory checkpoint and Lightning resumes from it when it is newer (see
``memckpt.adapters.lightning.wrap``). Needs ``nemo_toolkit[lightning]`` 2.x
(``pip install 'memckpt[nemo]'``); NeMo 3.0 dropped ``nemo.lightning``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from memckpt.adapters.lightning import MemoryTier, wrap_trainer
from memckpt.errors import ConfigTypeError

__all__ = ["MemoryAutoResume", "wrap_trainer_and_auto_resume"]  # noqa: F822 (built lazily)

_INSTALL_HINT = (
    "memckpt.adapters.nemo needs NeMo 2.x with nemo.lightning: pip install 'memckpt[nemo]' "
    "(nemo_toolkit[lightning]==2.7.3; NeMo 3.0 dropped nemo.lightning)"
)
_lock = threading.Lock()


def _auto_resume_base() -> type:
    try:
        from nemo.lightning import AutoResume
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return AutoResume


def _build_class() -> type:
    """MemoryAutoResume, a dataclass subclass of ``nemo.lightning.AutoResume``."""
    base = _auto_resume_base()

    @dataclasses.dataclass(kw_only=True)
    class MemoryAutoResume(base):  # type: ignore[misc, valid-type]
        """AutoResume that prefers memckpt's memory tier; otherwise the user's AutoResume decides.

        ``get_trainer_ckpt_path`` returns what ``default_auto_resume`` (or the copied
        AutoResume fields) resolve. When that is "no checkpoint, and one is required",
        the requirement moves to fit start, where the memory tier is known on every
        rank: a memory checkpoint satisfies it, otherwise the fit fails with
        CheckpointNotFoundError.
        """

        memory_tier: MemoryTier | None = None
        default_auto_resume: Any = None

        def get_trainer_ckpt_path(self, model: Any = None) -> Any:
            from nemo.utils.exp_manager import NotFoundError

            inner = self.default_auto_resume
            try:
                if inner is not None:
                    return inner.get_trainer_ckpt_path(model)
                return super().get_trainer_ckpt_path(model)
            except NotFoundError:
                if self.memory_tier is None or not self.memory_tier.enabled:
                    raise
                self.memory_tier.require_checkpoint = True
                return None

    MemoryAutoResume.__module__ = __name__
    MemoryAutoResume.__qualname__ = "MemoryAutoResume"
    return MemoryAutoResume


def __getattr__(name: str) -> Any:
    if name == "MemoryAutoResume":  # built on first use: importing NeMo takes seconds
        with _lock:
            if "MemoryAutoResume" not in globals():
                globals()["MemoryAutoResume"] = _build_class()
        return globals()["MemoryAutoResume"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wrap_trainer_and_auto_resume(
    trainer: Any,
    base_container: str | os.PathLike[str],
    async_save: bool = True,
    default_auto_resume: Any = None,
    **wrap_options: Any,
) -> Any:
    """Wrap ``trainer`` (``wrap_trainer``) and return an AutoResume preferring the memory tier.

    ``base_container``: the job's node-local directory ``<base_dir>/<job_id>``, the same
    across restarts. ``default_auto_resume``: your ``nemo.lightning.AutoResume`` (its
    fields are copied and its resolution of the persistent checkpoint is used), or
    None. ``wrap_options`` go to ``wrap_trainer`` (``every_n_steps``, ``replication``,
    ``node_id``, ``keep_last``, ``enabled``...). Call it on every rank before
    ``llm.train`` / ``resume.setup``; NeMo's MegatronStrategy is refused (see
    docs/nemo.md).
    """
    base = _auto_resume_base()
    if default_auto_resume is not None and not isinstance(default_auto_resume, base):
        raise ConfigTypeError(
            f"default_auto_resume must be a nemo.lightning.AutoResume, got "
            f"{type(default_auto_resume).__name__}"
        )
    cls = __getattr__("MemoryAutoResume")
    tier = wrap_trainer(trainer, base_container, async_save, **wrap_options)
    fields = {}
    if default_auto_resume is not None:
        fields = {f.name: getattr(default_auto_resume, f.name) for f in dataclasses.fields(base)}
    return cls(memory_tier=tier, default_auto_resume=default_auto_resume, **fields)
