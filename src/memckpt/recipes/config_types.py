"""Values checked and converted against the annotations of typed config dataclasses.

The layer below YAML files and command-line overrides: ``convert`` checks one value
against a field's annotation (``bool``, ``int``, ``float``, ``str``, ``None``, unions,
``Literal``, ``list``/``tuple``/``dict`` of those, nested dataclasses) and
``merge_into`` sets a mapping of fields on a dataclass, rejecting unknown keys with a
did-you-mean. Every error is a ``ConfigError`` whose message starts with the label a
``Source`` gives the key path (``override 'train.steps=abc'``, ``run.yaml:3``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from memckpt.errors import ConfigError

__all__ = [
    "MISSING",
    "Source",
    "convert",
    "dataclass_fields",
    "describe",
    "dict_args",
    "field_types",
    "fixed_source",
    "from_dict",
    "instantiate",
    "is_dataclass_instance",
    "is_dataclass_type",
    "join_path",
    "merge_dict",
    "merge_into",
    "replace_fields",
    "strip_none",
    "to_dict",
    "type_error",
    "type_name",
    "unknown_key_error",
]

T = TypeVar("T")

MISSING: Any = dataclasses.MISSING
_NONE_TYPE = type(None)
_UNION_ORIGINS = (Union, types.UnionType)

# A source turns a key path into the label that error messages start with.
Source = Callable[[str], str]


def type_name(tp: Any) -> str:
    """How a type annotation reads in error messages: ``int``, ``float | None``, ``list[str]``."""
    if tp is _NONE_TYPE or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION_ORIGINS:
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if not args:
            return name
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def convert(
    value: Any,
    tp: Any,
    path: str,
    src: Source,
    *,
    raw: str | None = None,
    current: Any = MISSING,
) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: int to float, list to tuple).

    A mapping given to a dataclass or dict merges into ``current`` when there is one.
    """
    if tp is Any or tp is object:
        return copy.deepcopy(value)
    origin = get_origin(tp)
    if origin in _UNION_ORIGINS:
        return _convert_union(value, tp, path, src, raw, current)
    if value is None:
        raise type_error(value, tp, path, src)
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return choice
            if isinstance(choice, str) and raw == choice:
                return choice
        choices = [str(c) for c in get_args(tp)]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        raise type_error(value, tp, path, src, hint=f"did you mean {close[0]!r}?" if close else "")
    if is_dataclass_type(tp):
        if isinstance(value, tp):
            return copy.deepcopy(value)
        if isinstance(value, Mapping):
            base = current if isinstance(current, tp) else instantiate(tp, path, src)
            return merge_into(base, value, path, src)
        raise type_error(value, tp, path, src, hint=f"give a mapping of {tp.__name__} fields")
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise type_error(value, tp, path, src)
        (elem,) = get_args(tp) or (Any,)
        return [convert(v, elem, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise type_error(value, tp, path, src)
        args = get_args(tp)
        if not args:
            return tuple(copy.deepcopy(value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{path}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise type_error(value, tp, path, src, hint=f"exactly {len(args)} items")
        return tuple(
            convert(v, a, f"{path}[{i}]", src) for i, (v, a) in enumerate(zip(value, args))
        )
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise type_error(value, tp, path, src)
        ktype, vtype = dict_args(tp)
        result = dict(current) if isinstance(current, dict) else {}
        for k, v in value.items():
            sub = join_path(path, str(k))
            key = convert(k, ktype, f"{sub} (the key)", src)
            result[key] = convert(v, vtype, sub, src, current=result.get(key, MISSING))
        return result
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise type_error(value, tp, path, src, hint="write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise type_error(value, tp, path, src)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise type_error(value, tp, path, src)
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and isinstance(value, (bool, int, float)):
            return raw
        hint = "quote it to make it a string" if isinstance(value, (bool, int, float)) else ""
        raise type_error(value, tp, path, src, hint=hint)
    if isinstance(tp, type) and isinstance(value, tp):
        return copy.deepcopy(value)
    raise ConfigError(
        f"{src(path)}: {path}: fields of type {type_name(tp)} cannot be set from a config "
        "(supported: bool, int, float, str, None, Literal, unions, list, tuple, dict, dataclasses)"
    )


def _convert_union(
    value: Any, tp: Any, path: str, src: Source, raw: str | None, current: Any
) -> Any:
    args = get_args(tp)
    members = [a for a in args if a is not _NONE_TYPE]
    if value is None:
        if len(members) < len(args):
            return None
        raise type_error(value, tp, path, src)
    if len(members) == 1 and _is_structured(members[0]):
        # "X | None" with X a container: X's own error names the exact nested key.
        return convert(value, members[0], path, src, raw=raw, current=current)
    for member in members:
        try:
            return convert(value, member, path, src, raw=raw, current=current)
        except ConfigError:
            continue
    raise type_error(value, tp, path, src)


def _is_structured(tp: Any) -> bool:
    origin = get_origin(tp)
    return is_dataclass_type(tp) or tp in (list, tuple, dict) or origin in (list, tuple, dict)


def type_error(value: Any, tp: Any, path: str, src: Source, *, hint: str = "") -> ConfigError:
    """The error for ``value`` not fitting ``tp`` at ``path``: source, key, expected, got."""
    expected = type_name(tp)
    if is_dataclass_type(tp):
        expected = f"{tp.__name__} (a mapping)"
    msg = f"{src(path)}: {path or 'config'}: expected {expected}, got {describe(value)}"
    return ConfigError(f"{msg} ({hint})" if hint else msg)


def describe(value: Any) -> str:
    """A value as error messages show it: ``int 5``, ``str 'abc'``, ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def merge_into(obj: T, data: Mapping[Any, Any], path: str, src: Source) -> T:
    """``obj`` (a dataclass instance) with the keys of ``data`` converted and set."""
    hints = field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in hints:
            raise unknown_key_error(
                type(obj).__name__, list(hints), str(key), path, src(join_path(path, str(key)))
            )
        sub = join_path(path, key)
        changes[key] = convert(value, hints[key], sub, src, current=getattr(obj, key))
    return replace_fields(obj, changes, path, src)


def unknown_key_error(
    owner: str, valid: list[str], key: str, prefix: str, where: str, *, lead: str = ""
) -> ConfigError:
    """The error for a key ``owner`` does not have: the closest valid keys, then all of them."""
    full = join_path(prefix, key)
    msg = f"{where}: {lead or f'unknown key {full!r}'}"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:
        close = [v for v in valid if v.lower() == key.lower()]
    if close:
        msg += "; did you mean " + " or ".join(repr(join_path(prefix, c)) for c in close) + "?"
    else:
        msg += "."
    level = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"{msg} Valid keys {level} ({owner}): {', '.join(valid)}.")


def replace_fields(obj: T, changes: dict[str, Any], path: str, src: Source) -> T:
    """A copy of dataclass ``obj`` with ``changes``; its ``__post_init__`` checks run again."""
    if not changes:
        return obj
    fields = dataclass_fields(type(obj))
    try:
        new = dataclasses.replace(obj, **{k: v for k, v in changes.items() if fields[k].init})  # type: ignore[type-var]
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{src(path)}: {path or 'config'}: {type(obj).__name__} rejects the new values: {e}"
        ) from e
    for k, v in changes.items():
        if not fields[k].init:
            object.__setattr__(new, k, v)
    return new


def instantiate(cls: type[T], path: str, src: Source) -> T:
    """``cls()``, or a ``ConfigError`` when some field has no default."""
    try:
        return cls()
    except TypeError as e:
        raise ConfigError(
            f"{src(path)}: {path or 'config'}: {cls.__name__} has fields without defaults, "
            f"so it cannot be built from a partial mapping ({e})"
        ) from e


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls``, in field order."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward references are the author's bug
        raise ConfigError(f"cannot read the field types of {cls.__name__}: {e}") from e
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def dataclass_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def dict_args(tp: Any) -> tuple[Any, Any]:
    """Key and value types of a ``dict[K, V]`` annotation (``Any`` when bare)."""
    args = get_args(tp)
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def strip_none(tp: Any) -> Any:
    """``X`` for ``X | None``; any other annotation unchanged."""
    if get_origin(tp) in _UNION_ORIGINS:
        members = [a for a in get_args(tp) if a is not _NONE_TYPE]
        if len(members) == 1:
            return members[0]
    return tp


def is_dataclass_type(tp: Any) -> bool:
    """Whether ``tp`` is a dataclass (the class, not an instance)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_dataclass_instance(value: Any) -> bool:
    """Whether ``value`` is an instance of a dataclass."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def join_path(prefix: str, key: str) -> str:
    """``prefix.key``, or ``key`` at the top level."""
    return f"{prefix}.{key}" if prefix else key


def fixed_source(label: str) -> Source:
    """A source that labels every key path with ``label`` (one override, one dict)."""
    return lambda _path: label


# ---------------------------------------------------------------------------
# Plain dicts
# ---------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` as nested plain dicts, lists and scalars (tuples become lists), for YAML or JSON."""
    if not is_dataclass_instance(cfg):
        raise ConfigError(f"to_dict needs a dataclass instance, got {describe(cfg)}")
    return _plain(cfg)  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if is_dataclass_instance(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "dict") -> T:
    """``cls()`` with ``data`` merged on top, checked like a YAML file; errors name ``source``."""
    return merge_dict(instantiate(cls, "", fixed_source(source)), data, source=source)


def merge_dict(cfg: T, data: Mapping[str, Any], *, source: str = "dict") -> T:
    """A copy of ``cfg`` with the keys of ``data`` (nested mappings) checked and set."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {describe(data)}")
    return merge_into(copy.deepcopy(cfg), data, "", fixed_source(source))
