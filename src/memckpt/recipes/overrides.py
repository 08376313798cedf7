"""Command-line overrides parsed by hydra-core, applied to typed config dataclasses.

A run's config is built in three layers, later ones winning (``build_config``):

1. a recipe: a zero-argument function returning the config dataclass;
2. a YAML file merged on top (``merge_yaml``, ``memckpt.recipes.config_yaml``);
3. command-line overrides (``apply_overrides``), parsed by hydra-core's own
   ``OverridesParser``, so their grammar is Hydra's:

   =============  ============================================================
   ``a.b=v``      set an existing key
   ``+a.b=v``     add a key that does not exist yet (error if it does). Fields
                  of a dataclass are fixed, so only keys inside dict-typed
                  fields can be added (``+logger.tags.team=infra``)
   ``++a.b=v``    set a key, adding it to a dict-typed field if missing
   ``~a.b``       a dataclass field back to its default; a dict key removed.
                  ``~a.b=v`` does so only while the current value is ``v``
   =============  ============================================================

Values are Hydra's: ``5``, ``3e-4``, ``true``, ``null``, ``[1, 2]``, ``{a: 1}``,
``'quoted'``, casts like ``str(5)``. Sweeps (``a=1,2``, ``choice()``, ``range()``),
``key@package`` and config groups (``a/b=x``) are errors: a command runs one job on
one config. An unquoted number or boolean given to a ``str`` field keeps its text
(``checkpoint.job_id=007`` is ``"007"``, ``logger.level=1e-3`` is ``"1e-3"``).

Hydra only parses; every value is then checked against the field's annotation
(``memckpt.recipes.config_types``), unknown keys are errors with a did-you-mean, and
every failure raises ``ConfigError`` starting with ``override '<text>'``.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_origin

from memckpt.errors import ConfigError
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.config_types import (
    MISSING,
    convert,
    dataclass_fields,
    describe,
    dict_args,
    field_types,
    fixed_source,
    from_dict,
    instantiate,
    is_dataclass_instance,
    is_dataclass_type,
    join_path,
    merge_dict,
    replace_fields,
    strip_none,
    to_dict,
    type_name,
    unknown_key_error,
)
from memckpt.recipes.config_yaml import from_yaml, merge_yaml, to_yaml
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
    "quote_value",
    "to_dict",
    "to_yaml",
    "type_name",
]

T = TypeVar("T")

# Hydra's OverrideType names; the values are what Override.op holds.
_OPS: dict[str, Literal["set", "add", "force", "delete"]] = {
    "CHANGE": "set",
    "ADD": "add",
    "FORCE_ADD": "force",
    "DEL": "delete",
}
# Our keys are dot paths into the config: the first segment names a field, later ones
# may also be dict keys such as "run-1" or "0". Hydra also accepts config groups
# ("a/b") and packages ("a@b"), which a dataclass config has no use for.
_KEY_RE = re.compile(r"[A-Za-z_]\w*(?:\.[\w-]+)*", re.ASCII)
_FORMS = "key=value, +key=value, ++key=value or ~key"
_LEXER_ERROR = "LexerNoViableAltException: "


@dataclass(frozen=True)
class Override:
    """One parsed command-line override such as ``++logger.tags.team=infra``."""

    op: Literal["set", "add", "force", "delete"]
    key: str
    value: Any = None
    has_value: bool = True
    # The text of an unquoted number or boolean: what a str field receives, so "007"
    # stays "007" and "1e-3" stays "1e-3".
    raw: str | None = None
    text: str = ""

    @property
    def source(self) -> str:
        return f"override '{self.text}'"


@functools.cache
def _parser() -> Any:
    # hydra-core takes most of a second to import: only commands with overrides pay it
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(text: str) -> Override:
    """Parse ``key=value``, ``+key=value``, ``++key=value``, ``~key`` or ``~key=value``.

    hydra-core parses the text; its sweeps, packages and config groups are refused.
    """
    return _parse(text, f"override '{text}'")


def _parse(text: str, src: str, *, key_in_hint: bool = True) -> Override:
    from hydra.errors import HydraException

    try:
        (parsed,) = _parser().parse_overrides([text])
    except HydraException as e:
        raise _parse_error(text, src, e, key_in_hint) from None
    key = parsed.key_or_group
    if parsed.package is not None:
        raise ConfigError(
            f"{src}: '{key}@{parsed.package}' names a Hydra package; memckpt configs have "
            f"none, write the key path alone ({key}=...)"
        )
    if not _KEY_RE.fullmatch(key):
        raise _key_error(key, src)
    if parsed.is_sweep_override():
        value_text = parsed.get_value_string().strip()
        hint = _quote_hint(parsed.get_key_element(), value_text, key_in_hint)
        raise ConfigError(
            f"{src}: '{value_text}' is a Hydra sweep; a memckpt command runs one job with "
            f"one value per key. To pass the text itself, {hint}"
        )
    op = _OPS[parsed.type.name]
    if parsed.value_type is None:  # "~key"
        return Override(op, key, has_value=False, text=text)
    value = parsed.value()
    raw = None
    if isinstance(value, (bool, int, float)):
        value_text = parsed.get_value_string().strip()
        if "(" not in value_text:  # not a cast such as int(3.0)
            raw = value_text
    return Override(op, key, value, True, raw, text)


def parse_value(text: str, *, source: str = "value") -> tuple[Any, str | None]:
    """Parse one override value with Hydra's grammar; return ``(value, raw)``.

    ``raw`` is the text of an unquoted number or boolean (what a ``str`` field
    receives), else ``None``. Errors start with ``source``.
    """
    ov = _parse(f"value={text}", source, key_in_hint=False)
    return ov.value, ov.raw


def quote_value(text: str) -> str:
    """``text`` as a quoted Hydra value that parses back to exactly ``text``.

    For overrides built by code from paths or other free text:
    ``f"train.final_weights={quote_value(path)}"``. Unquoted, Hydra refuses ``,``
    ``=`` ``(`` ``#`` ``!`` ``~`` non-ASCII and more.
    """
    from hydra.core.override_parser.types import Quote, QuotedString

    return str(QuotedString(text=text, quote=Quote.single).with_quotes())


def _parse_error(text: str, src: str, e: Exception, key_in_hint: bool) -> ConfigError:
    """Hydra's parse failure as our error: a bad key path, a missing value, or a bad value."""
    prefix = next((p for p in ("++", "+", "~") if text.startswith(p)), "")
    key, eq, value = text[len(prefix) :].partition("=")
    if not _KEY_RE.fullmatch(key):
        return _key_error(key, src)
    if not eq:
        return ConfigError(f"{src}: no value; write {prefix}{key}=VALUE (or ~{key} to reset it)")
    lines = [ln for ln in str(e).splitlines() if ln and not ln.startswith("See https://")]
    reason = lines[0] if lines else type(e).__name__
    if reason.startswith(_LEXER_ERROR) and len(lines) > 1 and "^" in lines[1]:
        # Hydra points at the character with a caret under "LexerNoViableAltException: <text>"
        at = lines[1].index("^") - len(_LEXER_ERROR)
        reason = f"unexpected character {text[at]!r}" if 0 <= at < len(text) else reason
    elif reason.startswith("Error parsing override") and len(lines) > 1:
        reason = lines[1]
    return ConfigError(
        f"{src}: cannot parse the value {value!r} with Hydra's override grammar ({reason}); "
        f"to pass it as text, {_quote_hint(prefix + key, value, key_in_hint)}"
    )


def _quote_hint(key: str, value: str, with_key: bool) -> str:
    # the shell removes one level of quotes: the single quotes must reach Hydra
    if not with_key:
        return f"quote it: '{value}'"
    return 'quote it inside the argument: "' + f"{key}='{value}'" + '"'


def _key_error(key: str, src: str) -> ConfigError:
    return ConfigError(
        f"{src}: {key!r} is not a key path (dot-separated names like train.steps); "
        f"expected {_FORMS}"
    )


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
    path = join_path(prefix, key)
    src = fixed_source(ov.source)
    if is_dataclass_instance(node):
        hints = field_types(type(node))
        if key not in hints:
            if ov.op == "add":
                raise unknown_key_error(
                    type(node).__name__,
                    list(hints),
                    key,
                    prefix,
                    ov.source,
                    lead=f"cannot add '{path}': {type(node).__name__} has a fixed set of "
                    "fields, and '+' adds keys only inside dict-typed fields (like logger.tags)",
                )
            raise unknown_key_error(type(node).__name__, list(hints), key, prefix, ov.source)
        ftype, current = hints[key], getattr(node, key)
        if rest:
            inner = strip_none(ftype)
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
            new = convert(ov.value, ftype, path, src, raw=ov.raw, current=current)
        return replace_fields(node, {key: new}, prefix, src)

    if isinstance(node, dict):
        ktype, vtype = dict_args(tp)
        k = _path_key(key, ktype, path, ov.source)
        if rest:
            if k in node:
                child = node[k]
            elif ov.op in ("add", "force"):
                child = _empty_container(strip_none(vtype), path, ov)
            else:
                raise _missing_dict_key(node, key, path, prefix, ov)
            new_dict = dict(node)
            new_dict[k] = _apply_at(child, strip_none(vtype), rest, path, ov)
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
        new_dict[k] = convert(ov.value, vtype, path, src, raw=ov.raw, current=node.get(k, MISSING))
        return new_dict

    raise ConfigError(
        f"{ov.source}: cannot reach '{ov.key}': '{prefix}' holds {describe(node)}, "
        "which has no keys; set it as a whole instead"
    )


def _empty_container(tp: Any, path: str, ov: Override) -> Any:
    """What to descend into when a key on the way is missing or None: a fresh dict or dataclass."""
    if is_dataclass_type(tp):
        return instantiate(tp, path, fixed_source(ov.source))
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
    hint = f" Did you mean '{join_path(prefix, close[0])}'?" if close else ""
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
    expected = convert(ov.value, tp, path, fixed_source(ov.source), raw=ov.raw)
    if expected != current:
        raise ConfigError(
            f"{ov.source}: '{path}' is {current!r}, not {expected!r}; nothing was removed"
        )


def _field_default(cls: type, name: str, path: str, where: str) -> Any:
    f = dataclass_fields(cls)[name]
    if f.default is not MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ConfigError(f"{where}: '{path}' has no default to reset to; set a value instead")


def _path_key(key: str, ktype: Any, path: str, where: str) -> Any:
    if strip_none(ktype) is int:
        try:
            return int(key)
        except ValueError:
            raise ConfigError(f"{where}: {path}: keys here are int, got {key!r}") from None
    return key


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
