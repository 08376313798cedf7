"""The engine every API drives: runtime, save and load transactions, sources, tiers, drain.

Framework APIs (``memckpt.manager``, ``memckpt.adapters``) are thin clients of the seams
exported here; nothing below this layer (storage, transport, replication) imports it.
"""

from memckpt.collectives import Collectives, LocalCollectives, TorchCollectives
from memckpt.engine.async_bridge import AsyncSaveBridge, bridge_async_save
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.engine.load_transaction import (
    LoadDecision,
    LoadInfo,
    LoadTransaction,
    RankOutcome,
    decide_after_vote,
)
from memckpt.engine.recovery_plan import RecoveryPlan, plan_recovery
from memckpt.engine.rng import capture_rng_state, restore_rng_state
from memckpt.engine.runtime import NodeRuntime, RuntimeOptions, RuntimeSettings
from memckpt.engine.save_engine import SaveEngine
from memckpt.engine.save_transaction import (
    Ballot,
    SaveTransaction,
    Vote,
    collective_vote,
    single_rank_vote,
)
from memckpt.engine.sources import ObjectLocator, ObjectSource
from memckpt.engine.tiers import ResumeChoice, choose_tier, release_memory_tier, resume_tiers
from memckpt.storage.inventory import Inventory, ManifestInfo, StepHoldings
from memckpt.storage.manifest import ObjectDigest, StepManifest
from memckpt.storage.reader import ObjectReader, load_object
from memckpt.storage.retention import RetentionPlan, plan_retention

__all__ = [
    "AsyncSaveBridge",
    "Ballot",
    "Collectives",
    "Inventory",
    "LoadDecision",
    "LoadInfo",
    "LoadTransaction",
    "LocalCollectives",
    "ManifestInfo",
    "NodeRuntime",
    "ObjectDigest",
    "ObjectLocator",
    "ObjectReader",
    "ObjectSource",
    "RankOutcome",
    "RecoveryPlan",
    "ResumeChoice",
    "RetentionPlan",
    "RuntimeOptions",
    "RuntimeSettings",
    "SaveEngine",
    "SaveHandle",
    "SaveResult",
    "SaveTransaction",
    "StepHoldings",
    "StepManifest",
    "TorchCollectives",
    "Vote",
    "bridge_async_save",
    "capture_rng_state",
    "choose_tier",
    "collective_vote",
    "decide_after_vote",
    "load_object",
    "plan_recovery",
    "plan_retention",
    "release_memory_tier",
    "restore_rng_state",
    "resume_tiers",
    "single_rank_vote",
]
