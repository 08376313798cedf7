"""PyTorch Lightning on memckpt: memory checkpoints every few steps and auto-resume.

Add a callback and one wrap call; the Trainer's persistent checkpoints stay as they are::

    from memckpt.adapters.lightning import MemoryCheckpointCallback, wrap_trainer

    trainer = Trainer(..., callbacks=[ModelCheckpoint(every_n_train_steps=500, save_last=True),
                                      MemoryCheckpointCallback(JOB_DIR, every_n_steps=50,
                                                               skip_every_n_steps=500)])
    wrap_trainer(trainer, JOB_DIR, replication="pairwise")
    trainer.fit(model, ckpt_path="last")

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the classes derive from
both namespaces' bases), for the single-device and DDP strategies. See docs/lightning.md.
"""

from memckpt.adapters.lightning.callback import MemoryCheckpointCallback
from memckpt.adapters.lightning.checkpoint_dict import capture_rng, restore_rng, to_storable
from memckpt.adapters.lightning.checkpoint_io import EVERY_RANK, MemoryCheckpointIO
from memckpt.adapters.lightning.tier import MemoryTier, ResumeDecision, choose_resume
from memckpt.adapters.lightning.wrap import check_strategy, wrap_trainer

__all__ = [
    "EVERY_RANK",
    "MemoryCheckpointCallback",
    "MemoryCheckpointIO",
    "MemoryTier",
    "ResumeDecision",
    "capture_rng",
    "check_strategy",
    "choose_resume",
    "restore_rng",
    "to_storable",
    "wrap_trainer",
]
