"""One page lists every MEMCKPT_* variable, generated from memckpt.settings, and they agree."""

from __future__ import annotations

import re
from pathlib import Path

from memckpt import settings
from memckpt.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "environment.md"
# Python constants such as schedule's MEMCKPT_DEADLINE_ENV name a variable; they are not one
_NAME = re.compile(r"\bMEMCKPT_[A-Z0-9_]*[A-Z0-9](?<!_ENV)\b")


def _names_in_sources() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "memckpt").rglob("*.py")):
        for name in _NAME.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_environment_page_is_what_the_settings_module_generates():
    # Given the declarations in memckpt.settings
    # When the page is rendered
    # Then docs/environment.md is exactly that page (regenerate it from settings.markdown())
    assert PAGE.read_text(encoding="utf-8") == settings.markdown()


def test_every_memckpt_variable_in_the_sources_is_declared_and_documented():
    declared = {v.name for v in settings.VARIABLES}
    page = PAGE.read_text(encoding="utf-8")
    used = _names_in_sources()
    assert used, "the scan found no MEMCKPT_ names at all"
    undeclared = {n: files for n, files in used.items() if n not in declared}
    assert not undeclared, f"declare these in memckpt.settings: {undeclared}"
    assert not [n for n in declared if f"`{n}`" not in page]


def test_every_declaration_says_what_it_means_and_what_happens_when_unset():
    names = [v.name for v in settings.VARIABLES]
    assert len(names) == len(set(names))
    for v in settings.VARIABLES:
        assert v.name.startswith("MEMCKPT_") and v.meaning and v.default and v.set_by, v
    # the constants modules import are the declared names
    for attr in settings.__all__:
        if attr.endswith("_ENV"):
            assert getattr(settings, attr) in names, attr


def test_memckpt_help_points_to_the_environment_page():
    assert "docs/environment.md" in build_parser().format_help()
