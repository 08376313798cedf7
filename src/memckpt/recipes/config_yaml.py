"""YAML files merged onto typed config dataclasses, and configs written back as YAML.

Files are YAML 1.2 (``yes`` and ``on`` are strings, ``1e-3`` is a float); every key
is checked against the dataclass (``memckpt.recipes.config_types``), and every error
names the file and line of the key (``run.yaml:3``). Files may use OmegaConf
interpolations (``min_lr: ${optimizer.lr}``, ``${oc.env:USER}``); they resolve when the
file is merged, against the config it is merged onto plus that file.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from memckpt.errors import ConfigError
from memckpt.recipes.config_types import (
    Source,
    describe,
    fixed_source,
    instantiate,
    join_path,
    merge_into,
    to_dict,
)

__all__ = ["from_yaml", "merge_yaml", "to_yaml"]

T = TypeVar("T")

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


@functools.lru_cache(maxsize=1)
def _yaml_types() -> tuple[Any, Any]:
    """A loader reading YAML 1.2 core scalars, and a dumper that quotes any string a
    YAML 1.1 or 1.2 reader would take for something else."""
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
    loader_cls, _ = _yaml_types()
    loader = loader_cls(text)
    loader.name = name
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        _collect_lines(node, "", lines, name)
        return loader.construct_document(node), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(e)}") from e
    finally:
        loader.dispose()


def _collect_lines(node: Any, prefix: str, lines: dict[str, int], name: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        path = join_path(prefix, key_node.value)
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            raise ConfigError(
                f"{name}:{line}: duplicate key '{path}' (first at line {seen[key_node.value]})"
            )
        seen[key_node.value] = line
        lines.setdefault(path, line)
        _collect_lines(value_node, path, lines, name)


def _yaml_source(name: str, lines: dict[str, int]) -> Source:
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
            f"(train:, model:, ...), got {describe(data)}"
        )
    src = _yaml_source(name, lines)
    if _has_interpolation(data):
        data = _resolve_interpolations(cfg, data, name, src)
    return merge_into(copy.deepcopy(cfg), data, "", src)


def from_yaml(cls: type[T], path: str | os.PathLike[str], *, text: str | None = None) -> T:
    """``cls()`` with the YAML file at ``path`` (or ``text``) merged on top."""
    return merge_yaml(instantiate(cls, "", fixed_source(os.fspath(path))), path, text=text)


def to_yaml(cfg: Any) -> str:
    """``cfg`` as a YAML document that ``merge_yaml``/``from_yaml`` read back unchanged."""
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
    cfg: Any, data: Mapping[str, Any], name: str, src: Source
) -> Mapping[str, Any]:
    """``data`` with its ``${...}`` resolved by OmegaConf against ``cfg`` plus ``data``."""
    # imported here: OmegaConf takes longer to import than most configs take to merge
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.create(dict(data)))
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, InterpolationResolutionError):
            # The file does not fit the config's shape (a scalar where a section belongs);
            # our own check names the key and the expected type.
            merge_into(copy.deepcopy(cfg), data, "", src)
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
