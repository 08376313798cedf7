"""The engine every API drives: runtime, save and load transactions, sources, tiers, drain.

Framework APIs (``memckpt.manager``, ``memckpt.adapters``) are thin clients of the seams
exported here; nothing below this layer (storage, transport, replication) imports it.
"""

from memckpt.collectives import Collectives, LocalCollectives, TorchCollectives
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.engine.recovery_plan import RecoveryPlan, plan_recovery
from memckpt.engine.runtime import NodeRuntime, RuntimeOptions
from memckpt.engine.save_engine import SaveEngine
from memckpt.engine.save_transaction import (
    Ballot,
    SaveTransaction,
    Vote,
    collective_vote,
    single_rank_vote,
)
from memckpt.engine.sources import ObjectLocator, ObjectSource
from memckpt.storage.inventory import Inventory, ManifestInfo, StepHoldings
from memckpt.storage.manifest import ObjectDigest, StepManifest
from memckpt.storage.reader import ObjectReader, load_object
from memckpt.storage.retention import RetentionPlan, plan_retention

__all__ = [
    "Ballot",
    "Collectives",
    "Inventory",
    "LocalCollectives",
    "ManifestInfo",
    "NodeRuntime",
    "ObjectDigest",
    "ObjectLocator",
    "ObjectReader",
    "ObjectSource",
    "RecoveryPlan",
    "RetentionPlan",
    "RuntimeOptions",
    "SaveEngine",
    "SaveHandle",
    "SaveResult",
    "SaveTransaction",
    "StepHoldings",
    "StepManifest",
    "TorchCollectives",
    "Vote",
    "collective_vote",
    "load_object",
    "plan_recovery",
    "plan_retention",
    "single_rank_vote",
]
