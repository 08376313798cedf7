"""Command-line overrides, YAML merges and plain-dict conversion for typed config dataclasses.

A run's config is built in three layers, later ones winning (``build_config``):

1. a recipe: a zero-argument function returning the config dataclass;
2. a YAML file merged on top (``merge_yaml``);
3. command-line overrides in Hydra's grammar (``apply_overrides``):

   =============  ============================================================
   ``a.b=v``      set an existing key
   ``+a.b=v``     add a key that does not exist yet (error if it does). Fields
                  of a dataclass are fixed, so only keys inside dict-typed
                  fields can be added (``+logger.tags.team=infra``)
   ``++a.b=v``    set a key, adding it to a dict-typed field if missing
   ``~a.b``       a dataclass field back to its default; a dict key removed.
                  ``~a.b=v`` does so only while the current value is ``v``
   =============  ============================================================

Values are YAML 1.2 scalars or flow collections: ``5``, ``3e-4``, ``true``, ``null``,
``[1, 2]``, ``{a: 1}``, ``"quoted"``; ``yes`` and ``on`` are strings, not booleans. An
unquoted scalar given to a ``str`` field keeps its text (``checkpoint.job_id=007`` is
``"007"``); an empty value (``a.b=``) is the empty string. A mapping given to a dataclass
or dict field updates only the keys it names, in YAML files and overrides alike.

Every value is checked against the field's annotation (``bool``, ``int``, ``float``,
``str``, ``None``, unions, ``Literal``, ``list``/``tuple``/``dict`` of those, nested
dataclasses): ``true`` is the only way to spell a bool, an int is accepted for a float
field, and unknown keys are errors with a did-you-mean. Every failure raises
``ConfigError`` whose message starts with where the value came from (``override
'train.steps=abc'``, ``run.yaml:3``), then the full key path and what was expected.

YAML files may use OmegaConf interpolations (``min_lr: ${optimizer.lr}``,
``${oc.env:USER}``); they resolve when the file is merged, against the recipe plus that
file. PyYAML and OmegaConf (the ``recipes`` extra) are imported only when needed, so
``import memckpt`` works without them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from memckpt.errors import ConfigError
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.recipes import get_recipe

__all__ = [
    "Override",
    "apply_overrides",
    "build_config",
    "from_dict",
    "from_yaml",
    "merge_dict",
    "merge_yaml",
    "parse_override",
    "parse_value",
    "to_dict",
    "to_yaml",
    "type_name",
]

T = TypeVar("T")

_EXTRA_HINT = "install the recipes extra: pip install 'memckpt[recipes]'"
_MISSING: Any = dataclasses.MISSING
_NONE_TYPE = type(None)
_UNION_ORIGINS = (Union, types.UnionType)

# A source turns a key path into the label that error messages start with.
_Source = Callable[[str], str]


# ---------------------------------------------------------------------------
# Override grammar
# ---------------------------------------------------------------------------

_PREFIX_OPS: dict[str, str] = {"": "set", "+": "add", "++": "force", "~": "delete"}
_OVERRIDE_RE = re.compile(r"(?P<prefix>\+\+|\+|~)?(?P<key>[^=]*)(?:=(?P<value>.*))?", re.DOTALL)
# The first segment names a field; later ones may also be dict keys such as "run-1" or "0".
_KEY_RE = re.compile(r"[A-Za-z_]\w*(?:\.[\w-]+)*")
_FORMS = "key=value, +key=value, ++key=value or ~key"


@dataclass(frozen=True)
class Override:
    """One parsed command-line override such as ``++logger.tags.team=infra``."""

    op: Literal["set", "add", "force", "delete"]
    key: str
    value: Any = None
    has_value: bool = True
    # The text of an unquoted scalar value: what a str field receives, so "007" stays "007".
    raw: str | None = None
    text: str = ""

    @property
    def source(self) -> str:
        return f"override '{self.text}'"


def parse_override(text: str) -> Override:
    """Parse ``key=value``, ``+key=value``, ``++key=value``, ``~key`` or ``~key=value``."""
    src = f"override '{text}'"
    m = _OVERRIDE_RE.fullmatch(text)
    assert m is not None  # the pattern matches every string
    prefix, key, value_text = m.group("prefix") or "", m.group("key"), m.group("value")
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(
            f"{src}: {key!r} is not a key path (dot-separated names like train.steps); "
            f"expected {_FORMS}"
        )
    op = _PREFIX_OPS[prefix]
    if value_text is None:
        if op != "delete":
            raise ConfigError(f"{src}: no value; write {prefix}{key}=VALUE (or ~{key} to reset it)")
        return Override("delete", key, has_value=False, text=text)
    value, raw = parse_value(value_text, source=src)
    return Override(op, key, value, True, raw, text)  # type: ignore[arg-type]


def parse_value(text: str, *, source: str = "value") -> tuple[Any, str | None]:
    """Parse one override value as YAML 1.2; return ``(value, raw)``.

    ``raw`` is the stripped text when the value was an unquoted scalar (what a ``str``
    field receives), else ``None``. Flow collections and quoted strings are parsed as YAML;
    any other text is one plain scalar, so ``: ``, ``#`` and ``*`` inside it stay text.
    """
    yaml = _import_yaml()
    loader_cls, _ = _yaml_types()
    s = text.strip()
    if s == "":
        return "", ""
    if s[0] in "[{\"'":
        loader = loader_cls(s)
        try:
            return loader.get_single_data(), None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: cannot parse {s!r} as YAML: {_yaml_problem(e)}") from e
        finally:
            loader.dispose()
    loader = loader_cls("")
    try:
        tag = loader.resolve(yaml.ScalarNode, s, (True, False))
        return loader.construct_document(yaml.ScalarNode(tag, s)), s
    except yaml.YAMLError as e:  # pragma: no cover - plain scalars always construct
        raise ConfigError(f"{source}: cannot parse {s!r}: {_one_line(e)}") from e
    finally:
        loader.dispose()


def apply_overrides(cfg: T, overrides: Iterable[str | Override]) -> T:
    """A copy of ``cfg`` with ``overrides`` applied in order; ``cfg`` is left unchanged."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of strings, not the string {overrides!r}")
    result = copy.deepcopy(cfg)
    for item in overrides:
        ov = item if isinstance(item, Override) else parse_override(item)
        result = _apply_at(result, type(result), ov.key.split("."), "", ov)
    return result


def _apply_at(node: Any, tp: Any, keys: list[str], prefix: str, ov: Override) -> Any:
    key, rest = keys[0], keys[1:]
    path = _join(prefix, key)
    src = _fixed(ov.source)
    if _is_instance_of_dataclass(node):
        hints = _field_types(type(node))
        if key not in hints:
            if ov.op == "add":
                raise _unknown_key(
                    type(node).__name__,
                    list(hints),
                    key,
                    prefix,
                    ov.source,
                    lead=f"cannot add '{path}': {type(node).__name__} has a fixed set of "
                    "fields, and '+' adds keys only inside dict-typed fields (like logger.tags)",
                )
            raise _unknown_key(type(node).__name__, list(hints), key, prefix, ov.source)
        ftype, current = hints[key], getattr(node, key)
        if rest:
            inner = _strip_none(ftype)
            if current is None:
                current = _empty_container(inner, path, ov)
            new = _apply_at(current, inner, rest, path, ov)
        elif ov.op == "add":
            raise ConfigError(
                f"{ov.source}: '{path}' already exists; set it with {path}=... "
                f"('+' only adds keys that are missing)"
            )
        elif ov.op == "delete":
            if ov.has_value:
                _check_current(current, ftype, path, ov)
            new = _field_default(type(node), key, path, ov.source)
        else:
            new = _convert(ov.value, ftype, path, src, raw=ov.raw, current=current)
        return _replace(node, {key: new}, prefix, src)

    if isinstance(node, dict):
        ktype, vtype = _dict_args(tp)
        k = _path_key(key, ktype, path, ov.source)
        if rest:
            if k in node:
                child = node[k]
            elif ov.op in ("add", "force"):
                child = _empty_container(_strip_none(vtype), path, ov)
            else:
                raise _missing_dict_key(node, key, path, prefix, ov)
            new_dict = dict(node)
            new_dict[k] = _apply_at(child, _strip_none(vtype), rest, path, ov)
            return new_dict
        exists = k in node
        if ov.op == "set" and not exists:
            raise _missing_dict_key(node, key, path, prefix, ov)
        if ov.op == "add" and exists:
            raise ConfigError(
                f"{ov.source}: '{path}' already exists (it is {node[k]!r}); "
                f"set it with {path}=... or ++{path}=..."
            )
        new_dict = dict(node)
        if ov.op == "delete":
            if not exists:
                raise _missing_dict_key(node, key, path, prefix, ov)
            if ov.has_value:
                _check_current(node[k], vtype, path, ov)
            del new_dict[k]
            return new_dict
        new_dict[k] = _convert(
            ov.value, vtype, path, src, raw=ov.raw, current=node.get(k, _MISSING)
        )
        return new_dict

    raise ConfigError(
        f"{ov.source}: cannot reach '{ov.key}': '{prefix}' holds {_describe(node)}, "
        "which has no keys; set it as a whole instead"
    )


def _empty_container(tp: Any, path: str, ov: Override) -> Any:
    """What to descend into when a key on the way is missing or None: a fresh dict or dataclass."""
    if _is_dataclass_type(tp):
        return _instantiate(tp, path, _fixed(ov.source))
    if tp is Any or tp is dict or get_origin(tp) in (dict, Mapping):
        return {}
    raise ConfigError(
        f"{ov.source}: cannot reach '{ov.key}': '{path}' is null and of type {type_name(tp)}, "
        "which has no keys"
    )


def _missing_dict_key(
    node: dict[Any, Any], key: str, path: str, prefix: str, ov: Override
) -> ConfigError:
    existing = [str(k) for k in node]
    close = difflib.get_close_matches(key, existing, n=1, cutoff=0.6)
    hint = f" Did you mean '{_join(prefix, close[0])}'?" if close else ""
    keys = ", ".join(existing) or "none"
    if ov.op == "delete":
        return ConfigError(
            f"{ov.source}: cannot remove '{path}': no such key.{hint} Keys in '{prefix}': {keys}."
        )
    return ConfigError(
        f"{ov.source}: '{path}' does not exist; add it with +{path}=... or ++{path}=...{hint} "
        f"Keys in '{prefix}': {keys}."
    )


def _check_current(current: Any, tp: Any, path: str, ov: Override) -> None:
    expected = _convert(ov.value, tp, path, _fixed(ov.source), raw=ov.raw)
    if expected != current:
        raise ConfigError(
            f"{ov.source}: '{path}' is {current!r}, not {expected!r}; nothing was removed"
        )


def _field_default(cls: type, name: str, path: str, where: str) -> Any:
    f = _fields(cls)[name]
    if f.default is not _MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not _MISSING:
        return f.default_factory()
    raise ConfigError(f"{where}: '{path}' has no default to reset to; set a value instead")


def _path_key(key: str, ktype: Any, path: str, where: str) -> Any:
    if _strip_none(ktype) is int:
        try:
            return int(key)
        except ValueError:
            raise ConfigError(f"{where}: {path}: keys here are int, got {key!r}") from None
    return key


# ---------------------------------------------------------------------------
# Type checking
# ---------------------------------------------------------------------------


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


def _convert(
    value: Any,
    tp: Any,
    path: str,
    src: _Source,
    *,
    raw: str | None = None,
    current: Any = _MISSING,
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
        raise _type_error(value, tp, path, src)
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return choice
            if isinstance(choice, str) and raw == choice:
                return choice
        choices = [str(c) for c in get_args(tp)]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        raise _type_error(value, tp, path, src, hint=f"did you mean {close[0]!r}?" if close else "")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return copy.deepcopy(value)
        if isinstance(value, Mapping):
            base = current if isinstance(current, tp) else _instantiate(tp, path, src)
            return _merge_into(base, value, path, src)
        raise _type_error(value, tp, path, src, hint=f"give a mapping of {tp.__name__} fields")
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, path, src)
        (elem,) = get_args(tp) or (Any,)
        return [_convert(v, elem, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, path, src)
        args = get_args(tp)
        if not args:
            return tuple(copy.deepcopy(value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(value, tp, path, src, hint=f"exactly {len(args)} items")
        return tuple(
            _convert(v, a, f"{path}[{i}]", src) for i, (v, a) in enumerate(zip(value, args))
        )
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(value, tp, path, src)
        ktype, vtype = _dict_args(tp)
        result = dict(current) if isinstance(current, dict) else {}
        for k, v in value.items():
            sub = _join(path, str(k))
            key = _convert(k, ktype, f"{sub} (the key)", src)
            result[key] = _convert(v, vtype, sub, src, current=result.get(key, _MISSING))
        return result
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, path, src, hint="write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, path, src)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(value, tp, path, src)
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and isinstance(value, (bool, int, float)):
            return raw
        hint = "quote it to make it a string" if isinstance(value, (bool, int, float)) else ""
        raise _type_error(value, tp, path, src, hint=hint)
    if isinstance(tp, type) and isinstance(value, tp):
        return copy.deepcopy(value)
    raise ConfigError(
        f"{src(path)}: {path}: fields of type {type_name(tp)} cannot be set from a config "
        "(supported: bool, int, float, str, None, Literal, unions, list, tuple, dict, dataclasses)"
    )


def _convert_union(
    value: Any, tp: Any, path: str, src: _Source, raw: str | None, current: Any
) -> Any:
    args = get_args(tp)
    members = [a for a in args if a is not _NONE_TYPE]
    if value is None:
        if len(members) < len(args):
            return None
        raise _type_error(value, tp, path, src)
    if len(members) == 1 and _is_structured(members[0]):
        # "X | None" with X a container: X's own error names the exact nested key.
        return _convert(value, members[0], path, src, raw=raw, current=current)
    for member in members:
        try:
            return _convert(value, member, path, src, raw=raw, current=current)
        except ConfigError:
            continue
    raise _type_error(value, tp, path, src)


def _is_structured(tp: Any) -> bool:
    origin = get_origin(tp)
    return _is_dataclass_type(tp) or tp in (list, tuple, dict) or origin in (list, tuple, dict)


def _type_error(value: Any, tp: Any, path: str, src: _Source, *, hint: str = "") -> ConfigError:
    expected = type_name(tp)
    if _is_dataclass_type(tp):
        expected = f"{tp.__name__} (a mapping)"
    msg = f"{src(path)}: {path or 'config'}: expected {expected}, got {_describe(value)}"
    return ConfigError(f"{msg} ({hint})" if hint else msg)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _merge_into(obj: T, data: Mapping[Any, Any], path: str, src: _Source) -> T:
    """``obj`` (a dataclass instance) with the keys of ``data`` converted and set."""
    hints = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(
                type(obj).__name__, list(hints), str(key), path, src(_join(path, str(key)))
            )
        sub = _join(path, key)
        changes[key] = _convert(value, hints[key], sub, src, current=getattr(obj, key))
    return _replace(obj, changes, path, src)


def _unknown_key(
    owner: str, valid: list[str], key: str, prefix: str, where: str, *, lead: str = ""
) -> ConfigError:
    full = _join(prefix, key)
    msg = f"{where}: {lead or f'unknown key {full!r}'}"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:
        close = [v for v in valid if v.lower() == key.lower()]
    if close:
        msg += "; did you mean " + " or ".join(repr(_join(prefix, c)) for c in close) + "?"
    else:
        msg += "."
    level = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"{msg} Valid keys {level} ({owner}): {', '.join(valid)}.")


def _replace(obj: T, changes: dict[str, Any], path: str, src: _Source) -> T:
    """A copy of dataclass ``obj`` with ``changes``; its ``__post_init__`` checks run again."""
    if not changes:
        return obj
    fields = _fields(type(obj))
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


def _instantiate(cls: type[T], path: str, src: _Source) -> T:
    try:
        return cls()
    except TypeError as e:
        raise ConfigError(
            f"{src(path)}: {path or 'config'}: {cls.__name__} has fields without defaults, "
            f"so it cannot be built from a partial mapping ({e})"
        ) from e


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward references are the author's bug
        raise ConfigError(f"cannot read the field types of {cls.__name__}: {e}") from e
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _dict_args(tp: Any) -> tuple[Any, Any]:
    args = get_args(tp)
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def _strip_none(tp: Any) -> Any:
    if get_origin(tp) in _UNION_ORIGINS:
        members = [a for a in get_args(tp) if a is not _NONE_TYPE]
        if len(members) == 1:
            return members[0]
    return tp


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_instance_of_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fixed(label: str) -> _Source:
    return lambda _path: label


# ---------------------------------------------------------------------------
# Plain dicts
# ---------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` as nested plain dicts, lists and scalars (tuples become lists), for YAML or JSON."""
    if not _is_instance_of_dataclass(cfg):
        raise ConfigError(f"to_dict needs a dataclass instance, got {_describe(cfg)}")
    return _plain(cfg)  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if _is_instance_of_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "dict") -> T:
    """``cls()`` with ``data`` merged on top, checked like a YAML file; errors name ``source``."""
    return merge_dict(_instantiate(cls, "", _fixed(source)), data, source=source)


def merge_dict(cfg: T, data: Mapping[str, Any], *, source: str = "dict") -> T:
    """A copy of ``cfg`` with the keys of ``data`` (nested mappings) checked and set."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {_describe(data)}")
    return _merge_into(copy.deepcopy(cfg), data, "", _fixed(source))


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------

# YAML 1.2 core schema scalars. PyYAML speaks YAML 1.1, where "yes"/"on" are booleans,
# "1e-3" is a string, "010" is octal and "2024-01-01" a date; none of that here.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_RESOLVERS: list[tuple[str, re.Pattern[str], list[str]]] = [
    (_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")),
    (
        _FLOAT_TAG,
        re.compile(
            r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*\.[0-9_]*)(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    ),
]


def _import_yaml() -> Any:
    try:
        import yaml
    except ImportError as e:
        raise ConfigError(f"config files and overrides need PyYAML; {_EXTRA_HINT}") from e
    return yaml


@functools.lru_cache(maxsize=1)
def _yaml_types() -> tuple[Any, Any]:
    """A loader reading YAML 1.2 core scalars, and a dumper that quotes any string a
    YAML 1.1 or 1.2 reader would take for something else."""
    yaml = _import_yaml()
    keep = {"tag:yaml.org,2002:null", "tag:yaml.org,2002:merge"}

    class Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        pass

    Loader.yaml_implicit_resolvers = {
        first: [r for r in rs if r[0] in keep]
        for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    class Dumper(yaml.SafeDumper):  # type: ignore[misc,name-defined]
        pass

    Dumper.yaml_implicit_resolvers = {
        first: list(rs) for first, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()
    }
    for tag, regexp, first in _RESOLVERS:
        Loader.add_implicit_resolver(tag, regexp, first)
        Dumper.add_implicit_resolver(tag, regexp, first)
    return Loader, Dumper


def _load_yaml_document(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse one document: ``(data, line of each key path)``; duplicate keys are errors."""
    yaml = _import_yaml()
    loader_cls, _ = _yaml_types()
    loader = loader_cls(text)
    loader.name = name
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        _collect_lines(yaml, node, "", lines, name)
        return loader.construct_document(node), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(e)}") from e
    finally:
        loader.dispose()


def _collect_lines(yaml: Any, node: Any, prefix: str, lines: dict[str, int], name: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        path = _join(prefix, key_node.value)
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            raise ConfigError(
                f"{name}:{line}: duplicate key '{path}' (first at line {seen[key_node.value]})"
            )
        seen[key_node.value] = line
        lines.setdefault(path, line)
        _collect_lines(yaml, value_node, path, lines, name)


def _yaml_source(name: str, lines: dict[str, int]) -> _Source:
    def at(path: str) -> str:
        while path:
            if path in lines:
                return f"{name}:{lines[path]}"
            path = re.sub(r"(?:\.[^.\[]*|\[\d+\]| \(the key\))$", "", path)
        return name

    return at


def _yaml_problem(e: Exception) -> str:
    """A PyYAML error as one line: what went wrong, and at which column."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None:
        return _one_line(e)
    context = getattr(e, "context", None)
    text = f"{context}: {problem}" if context else problem
    return f"{text} (column {mark.column + 1})" if mark is not None else text


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def merge_yaml(cfg: T, path: str | os.PathLike[str], *, text: str | None = None) -> T:
    """A copy of ``cfg`` with the YAML file at ``path`` merged on top.

    ``text``: the YAML itself, when it is not to be read from ``path`` (which then only
    names it in errors). Interpolations (``${optimizer.lr}``) resolve against ``cfg`` plus
    this file, at merge time.
    """
    name = os.fspath(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{name}: YAML file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: cannot read YAML file: {e}") from e
    data, lines = _load_yaml_document(text, name)
    if data is None:
        return copy.deepcopy(cfg)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{name}: the top level must be a mapping of config sections "
            f"(train:, model:, ...), got {_describe(data)}"
        )
    src = _yaml_source(name, lines)
    if _has_interpolation(data):
        data = _resolve_interpolations(cfg, data, name, src)
    return _merge_into(copy.deepcopy(cfg), data, "", src)


def from_yaml(cls: type[T], path: str | os.PathLike[str], *, text: str | None = None) -> T:
    """``cls()`` with the YAML file at ``path`` (or ``text``) merged on top."""
    return merge_yaml(_instantiate(cls, "", _fixed(os.fspath(path))), path, text=text)


def to_yaml(cfg: Any) -> str:
    """``cfg`` as a YAML document that ``merge_yaml``/``from_yaml`` read back unchanged."""
    yaml = _import_yaml()
    _, dumper = _yaml_types()
    return str(
        yaml.dump(
            to_dict(cfg),
            Dumper=dumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
        )
    )


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    return False


def _resolve_interpolations(
    cfg: Any, data: Mapping[str, Any], name: str, src: _Source
) -> Mapping[str, Any]:
    """``data`` with its ``${...}`` resolved by OmegaConf against ``cfg`` plus ``data``."""
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException
    except ImportError as e:
        raise ConfigError(f"{name}: interpolations (${{...}}) need OmegaConf; {_EXTRA_HINT}") from e
    try:
        merged = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.create(dict(data)))
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, InterpolationResolutionError):
            # The file does not fit the config's shape (a scalar where a section belongs);
            # our own check names the key and the expected type.
            _merge_into(copy.deepcopy(cfg), data, "", src)
        label = f"{src(key)}: {key}" if key else name
        raise ConfigError(f"{label}: cannot resolve interpolation: {reason}") from e
    assert isinstance(resolved, dict)
    return _project(resolved, data)


def _project(resolved: Mapping[Any, Any], data: Mapping[Any, Any]) -> dict[Any, Any]:
    """The values of ``resolved`` at the keys that ``data`` names."""
    out: dict[Any, Any] = {}
    for k, v in data.items():
        r = resolved.get(k)
        out[k] = _project(r, v) if isinstance(v, Mapping) and isinstance(r, Mapping) else r
    return out


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def build_config(
    recipe: str | Callable[[], ConfigContainer],
    yaml_file: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
) -> ConfigContainer:
    """The config of a run: ``recipe()``, then ``yaml_file`` merged on top, then ``overrides``.

    ``recipe``: a registered name (``memckpt.recipes.RECIPES``), ``"package.module:function"``,
    or the function itself.
    """
    make = get_recipe(recipe) if isinstance(recipe, str) else recipe
    cfg = make()
    if not isinstance(cfg, ConfigContainer):
        label = recipe if isinstance(recipe, str) else getattr(recipe, "__name__", repr(recipe))
        raise ConfigError(f"recipe {label!r} returned {type(cfg).__name__}, not a ConfigContainer")
    if yaml_file is not None:
        cfg = merge_yaml(cfg, yaml_file)
    return apply_overrides(cfg, overrides)
