"""Lightning fits run by the adapter's tests, in the test process or on spawned gloo ranks.

The data of step k on rank r is drawn from its own generator seeded by (k, r), so it
does not depend on where a restarted fit's data loader begins; the model's dropout
draws from the global RNG, so a resume is bit-exact only if the RNG states come back.
"""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAMESPACES = {
    "lightning": "lightning.pytorch",
    "pl": "pytorch_lightning",
    "nemo": "lightning.pytorch",
}


def classes(ns: str) -> dict[str, Any]:
    """The test's LightningModule and callbacks, built on namespace ``ns``."""
    pl = importlib.import_module(NAMESPACES[ns])

    class Net(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(1000 * self.global_step + self.global_rank)
            x = torch.randn(4, 8, generator=g)
            return nn.functional.mse_loss(self.net(x), x.sum(1, keepdim=True))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class BatchCounter(pl.Callback):
        """A stateful callback: counts the training batches of the whole run."""

        def __init__(self) -> None:
            self.batches = 0

        def on_train_batch_end(self, *args: Any) -> None:
            self.batches += 1

        def state_dict(self) -> dict[str, int]:
            return {"batches": self.batches}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.batches = state["batches"]

    class KillAt(pl.Callback):
        """SIGKILLs this process at the end of ``step`` once the memory save in flight is in."""

        def __init__(self, step: int, memory_callback: Any) -> None:
            self.step = step
            self.memory_callback = memory_callback

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.step:
                self.memory_callback.wait()
                os.kill(os.getpid(), signal.SIGKILL)

    return {"pl": pl, "Net": Net, "BatchCounter": BatchCounter, "KillAt": KillAt}


def fit(
    rank: int,
    world: int,
    base: str,
    *,
    ns: str = "lightning",
    max_steps: int = 8,
    every: int = 2,
    skip: int | None = None,
    persist_every: int | None = None,
    kill_at: int | None = None,
    ckpt_path: str | None = None,
    ranks_per_node: int = 1,
    replication: str | None = None,
    enabled: bool = True,
    keep: bool = True,
    saved_steps: list[int] | None = None,
    auto_resume: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    accumulate: int = 1,
    epoch_len: int = 64,
    job_dir: str | None = None,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """One fit of the test model; returns its final weights and what it resumed from.

    ``ns="nemo"``: a ``nemo.lightning.Trainer``, wrapped by ``wrap_trainer_and_auto_resume``
    with ``nemo.lightning.AutoResume(**auto_resume)``, set up before the fit. ``job_dir``:
    the job directory as written (default ``<base>/node<k>/job``); ``weights_only``: passed
    to ``Trainer.fit`` when given.
    """
    from memckpt.adapters.lightning import MemoryCheckpointCallback, wrap_trainer

    c = classes(ns)
    pl = c["pl"]
    node = rank // ranks_per_node
    job = job_dir if job_dir is not None else Path(base) / f"node{node}" / "job"
    torch.manual_seed(0)
    model = c["Net"]()
    counter = c["BatchCounter"]()
    memory = MemoryCheckpointCallback(job, every, skip_every_n_steps=skip, enabled=enabled,
                                      keep_on_train_end=keep)  # fmt: skip
    callbacks = [counter, memory]
    if persist_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=Path(base) / "persistent", every_n_train_steps=persist_every,
            save_top_k=-1, save_last=True))  # fmt: skip
    if kill_at is not None:
        callbacks.append(c["KillAt"](kill_at, memory))
    trainer_cls = pl.Trainer
    if ns == "nemo":
        import nemo.lightning as nl

        trainer_cls = nl.Trainer
    trainer = trainer_cls(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(persist_every),
        use_distributed_sampler=False,
        default_root_dir=str(Path(base) / "root"),
    )
    options = {"replication": replication, "node_id": f"node{node}", "timeout_s": 30,
               **(options or {})}  # fmt: skip
    if ns == "nemo":
        import nemo.lightning as nl

        from memckpt.adapters.nemo import wrap_trainer_and_auto_resume

        resume = wrap_trainer_and_auto_resume(
            trainer, job, default_auto_resume=nl.AutoResume(**(auto_resume or {})), **options
        )
        tier = resume.memory_tier
        resume.setup(trainer, model)
    else:
        tier = wrap_trainer(trainer, job, **options)
    if saved_steps is not None:
        save = tier.save
        tier.save = lambda step, ckpt: (saved_steps.append(step), save(step, ckpt))[1]  # type: ignore[method-assign]
    # a shuffled loader without its own generator draws from torch's global RNG whenever
    # an epoch's iterator is made (the batches' values come from the step, not the data)
    loader = torch.utils.data.DataLoader(list(range(epoch_len)), batch_size=1,
                                         shuffle=epoch_len != 64)  # fmt: skip
    fit_options = {} if weights_only is None else {"weights_only": weights_only}
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path, **fit_options)
    resumed = tier.resumed
    return {
        # bytes, not tensors: a tensor put on a multiprocessing queue is shared through a
        # file descriptor the parent must fetch before the child exits
        "weights": {k: v.detach().numpy().tobytes() for k, v in model.state_dict().items()},
        "source": resumed.source if resumed else None,
        "step": resumed.step if resumed else None,
        "memory_step": resumed.memory_step if resumed else None,
        "batches": counter.batches,
        "global_step": trainer.global_step,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "failed": tier.failed_steps,
        "fetched": tier.last_load.fetched if tier.last_load else None,
        "load_tier": tier.last_load.tier if tier.last_load else None,
        "io": type(trainer.strategy.checkpoint_io).__name__,
    }
