"""The TensorAwareStateDict protocol of NVRx local checkpointing, and its basic implementation.

Interfaces follow ``nvidia_resiliency_ext.checkpointing.local`` (``base_state_dict`` and
``basic_state_dict``), so code written against them runs unchanged. The manager in this
package never calls ``pop_tensors``: it stores the wrapped state as it is (tensors
anywhere in it, CPU or CUDA) and leaves the caller's object untouched. The methods exist
so that code written for NVRx (and custom implementations) keeps working.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence, ValuesView
from typing import Any

import torch

from memckpt.errors import UnsupportedValueError

__all__ = [
    "BasicTensorAwareStateDict",
    "TensorAwareStateDict",
    "TensorPlaceholder",
    "is_tensor_aware",
]

_PROTOCOL = (
    "pop_tensors",
    "insert_tensors",
    "init_tensors",
    "copy_tensors_to_cpu",
    "restore_tensor_device",
    "tensors",
    "is_hollow",
)


class TensorAwareStateDict(ABC):
    """A state dict that can hand out its tensors apart from the rest (NVRx's interface).

    Subclass it (or NVRx's own base class) to checkpoint state that
    ``BasicTensorAwareStateDict`` does not cover. Its non-tensor part is stored through
    memckpt's restricted format: loading needs the class in ``safe_globals``.
    """

    @abstractmethod
    def pop_tensors(self) -> Sequence[torch.Tensor]:
        """Take the tensors out, leaving placeholders; the state dict is then hollow."""

    @property
    @abstractmethod
    def tensors(self) -> Iterable[torch.Tensor]:
        """The tensors of the wrapped state dict."""

    @property
    @abstractmethod
    def is_hollow(self) -> bool:
        """True after ``pop_tensors`` until tensors are inserted again."""

    @abstractmethod
    def insert_tensors(self, tensor_data: Iterable[torch.Tensor]) -> None:
        """Put tensors back in place of the placeholders (the reverse of ``pop_tensors``)."""

    @abstractmethod
    def init_tensors(self) -> None:
        """Replace placeholders with new empty tensors of the same shape, dtype and device."""

    @abstractmethod
    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        """Replace tensors by CPU copies, remembering their devices."""

    @abstractmethod
    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        """Move tensors back to the devices ``copy_tensors_to_cpu`` took them from."""

    def values(self) -> ValuesView[Any]:
        return vars(self).values()


def is_tensor_aware(obj: object) -> bool:
    """Whether ``obj`` follows the TensorAwareStateDict protocol (ours, NVRx's, or duck-typed)."""
    return isinstance(obj, TensorAwareStateDict) or all(hasattr(obj, m) for m in _PROTOCOL)


class TensorPlaceholder:
    """What ``pop_tensors`` leaves in place of a tensor: its shape, dtype and device."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device = tensor.device

    def init_tensor(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"TensorPlaceholder({self.shape}, {self.dtype}, {self.device})"


def _nested_values(x: dict[Any, Any] | list[Any]) -> Iterator[Any]:
    for v in x.values() if isinstance(x, dict) else x:
        if isinstance(v, (dict, list)):
            yield from _nested_values(v)
        else:
            yield v


def _map_in_place(f: Callable[[Any], Any], x: Any) -> Any:
    if isinstance(x, dict):
        for k, v in x.items():
            x[k] = _map_in_place(f, v)
        return x
    if isinstance(x, list):
        x[:] = [_map_in_place(f, v) for v in x]
        return x
    return f(x)


class BasicTensorAwareStateDict(TensorAwareStateDict):
    """A state dict of CPU or CUDA tensors nested in dicts and lists (NVRx's basic wrapper).

    ``.state_dict`` is the wrapped dict, as given. Unlike NVRx's version, CPU tensors are
    accepted, and ``restore_tensor_device`` returns each tensor to the device it came
    from rather than to the current CUDA device.
    """

    def __init__(self, state_dict: Any) -> None:
        if not isinstance(state_dict, (dict, list)):
            raise UnsupportedValueError(
                f"BasicTensorAwareStateDict wraps a dict or list, got {type(state_dict).__name__}"
            )
        for v in _nested_values(state_dict):
            if isinstance(v, torch.Tensor) and v.device.type not in ("cpu", "cuda"):
                raise UnsupportedValueError(
                    f"BasicTensorAwareStateDict holds a tensor on {v.device}; memckpt stores "
                    "CPU and CUDA tensors"
                )
        self.state_dict = state_dict
        self._is_hollow = False
        self._devices: list[torch.device] | None = None

    @property
    def is_hollow(self) -> bool:
        return self._is_hollow

    def _require_full(self, what: str) -> None:
        if self._is_hollow:
            raise UnsupportedValueError(
                f"BasicTensorAwareStateDict.{what}: its tensors were popped (it is hollow); "
                "insert_tensors() or init_tensors() first"
            )

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        self._require_full("tensors")
        return (v for v in _nested_values(self.state_dict) if isinstance(v, torch.Tensor))

    def pop_tensors(self) -> list[torch.Tensor]:
        result = list(self.tensors)
        _map_in_place(
            lambda x: TensorPlaceholder(x) if isinstance(x, torch.Tensor) else x, self.state_dict
        )
        self._is_hollow = True
        return result

    def insert_tensors(self, tensor_data: Iterable[torch.Tensor]) -> None:
        if not self._is_hollow:
            raise UnsupportedValueError("BasicTensorAwareStateDict.insert_tensors: not hollow")
        stack = list(tensor_data)[::-1]
        _map_in_place(lambda x: stack.pop() if isinstance(x, TensorPlaceholder) else x,
                      self.state_dict)  # fmt: skip
        self._is_hollow = False

    def init_tensors(self) -> None:
        if not self._is_hollow:
            raise UnsupportedValueError("BasicTensorAwareStateDict.init_tensors: not hollow")
        _map_in_place(
            lambda x: x.init_tensor() if isinstance(x, TensorPlaceholder) else x, self.state_dict
        )
        self._is_hollow = False

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        self._require_full("copy_tensors_to_cpu")
        devices: list[torch.device] = []

        def to_cpu(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            devices.append(x.device)
            return x.to("cpu", non_blocking=non_blocking)

        _map_in_place(to_cpu, self.state_dict)
        self._devices = devices

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        self._require_full("restore_tensor_device")
        if self._devices is None:
            return  # tensors never left their devices
        devices = iter(self._devices)

        def back(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            return x.to(next(devices, x.device), non_blocking=non_blocking)

        _map_in_place(back, self.state_dict)
        self._devices = None

    def __repr__(self) -> str:
        return f"BasicTensorAwareStateDict({'hollow' if self._is_hollow else 'full'})"
