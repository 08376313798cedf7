"""This process's random number generators as one checkpointable dict, and back.

Every API that checkpoints RNG states (``memckpt.State``, the Lightning callback, the
recipes) stores the dict ``capture_rng_state`` returns. It holds only tensors, ints,
floats, strings, None and lists, so ``torch.load(weights_only=True)``, memckpt's
restricted loader and DCP all read it back, and it loads where numpy is missing::

    "python": [version, [625 ints], gauss_next]       random.getstate()
    "numpy":  {"kind", "keys": [624 ints], "pos",      numpy's global generator
               "has_gauss", "gauss"}                   (when numpy imports)
    "torch":  uint8 tensor                             torch's CPU generator
    "cuda":   [uint8 tensor, one per device]           once CUDA is initialised

``restore_rng_state`` sets the generators a dict holds and skips the rest; it also
reads the layouts the three APIs stored before this module (tuples, numpy arrays, a
single GPU's state).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, Final

import torch

from memckpt.errors import CorruptCheckpointError

__all__ = ["RNG_ENTRIES", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

RNG_ENTRIES: Final = ("python", "numpy", "torch", "cuda")
"""The keys of an RNG state dict (each optional on restore)."""


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy (if importable), torch CPU, every GPU's.

    GPU states are taken only once CUDA is initialised, so capturing never starts CUDA.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached),
        }
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators ``state`` (from ``capture_rng_state``) holds; skip what is absent.

    GPU states are set for the devices this process sees; states of devices it lacks
    are left out (a debug line says so). A malformed entry raises CorruptCheckpointError.
    """
    if not isinstance(state, Mapping) or not any(k in state for k in RNG_ENTRIES):
        raise CorruptCheckpointError(
            f"not an RNG state: expected a dict with some of {', '.join(RNG_ENTRIES)}, got "
            f"{_describe(state)}"
        )
    for key, restore in (
        ("python", _restore_python),
        ("numpy", _restore_numpy),
        ("torch", _restore_torch),
        ("cuda", _restore_cuda),
    ):
        if state.get(key) is None:
            continue
        try:
            restore(state[key])
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:
            raise CorruptCheckpointError(
                f"RNG state entry {key!r} cannot be restored ({type(e).__name__}: {e}); the "
                "checkpoint holding it is damaged or was not written by memckpt"
            ) from e


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    return f"a {type(value).__name__}"


def _restore_python(saved: Any) -> None:
    version, internal, gauss = saved  # a list, or random.getstate()'s tuple
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))


def _restore_numpy(saved: Any) -> None:
    np = _numpy()
    if np is None:
        log.debug("RNG state holds numpy's generator; numpy does not import here: not restored")
        return
    if isinstance(saved, Mapping):
        kind, keys = saved["kind"], saved["keys"]
        pos, has_gauss, gauss = saved["pos"], saved["has_gauss"], saved["gauss"]
    else:  # np.random.get_state()'s tuple, as State and Lightning stored it before
        kind, keys, pos, has_gauss, gauss = saved
    if isinstance(keys, torch.Tensor):  # the recipes stored them as an int64 tensor before
        keys = keys.tolist()
    np.random.set_state(
        (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))
    )


def _restore_torch(saved: Any) -> None:
    torch.set_rng_state(saved.cpu())


def _restore_cuda(saved: Any) -> None:
    single = isinstance(saved, torch.Tensor)  # the recipes stored their GPU's state alone before
    states = [saved] if single else list(saved)
    if not torch.cuda.is_available():
        log.debug("RNG state holds %d CUDA generator state(s); torch sees no GPU here: "
                  "not restored", len(states))  # fmt: skip
        return
    if single:
        torch.cuda.set_rng_state(saved.cpu(), torch.cuda.current_device())
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        log.debug("RNG state holds %d CUDA generator states, this process sees %d GPUs: "
                  "restoring %d", len(states), count, min(len(states), count))  # fmt: skip
    for index, device_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), index)
