"""Command-line overrides on typed config dataclasses: the four forms, Hydra's value grammar,
type checks, unknown keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from memckpt.errors import ConfigError, MemckptError
from memckpt.recipes import ConfigContainer, apply_overrides, gpt_tiny, parse_override
from memckpt.recipes.overrides import parse_value, quote_value


@dataclass
class Inner:
    size: int = 3
    name: str = "inner"


@dataclass
class Sample:
    """Every kind of annotation the override layer supports."""

    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    label: str = "x"
    maybe: float | None = None
    either: int | str = 0
    mode: Literal["fast", "slow"] = "fast"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[int, str] = (1, "a")
    dims: tuple[int, ...] = (4, 4)
    table: dict[str, float] = field(default_factory=lambda: {"a": 1.0})
    free: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    opt_inner: Inner | None = None


def apply(*overrides: str, cfg: Any = None) -> Any:
    return apply_overrides(Sample() if cfg is None else cfg, list(overrides))


def error_of(*overrides: str, cfg: Any = None) -> str:
    with pytest.raises(ConfigError) as info:
        apply(*overrides, cfg=cfg)
    return str(info.value)


# --- the four forms ---------------------------------------------------------------------


def test_set_changes_an_existing_key_and_leaves_the_input_untouched() -> None:
    cfg = gpt_tiny()
    new = apply_overrides(cfg, ["train.steps=50", "checkpoint.memory.interval=5"])
    assert (new.train.steps, new.checkpoint.memory.interval) == (50, 5)
    assert (cfg.train.steps, cfg.checkpoint.memory.interval) == (300, 20)


def test_plus_adds_a_key_inside_a_dict_field() -> None:
    cfg = apply_overrides(ConfigContainer(), ["+logger.tags.team=infra"])
    assert cfg.logger.tags == {"team": "infra"}


def test_plus_on_an_existing_key_is_an_error_pointing_to_plain_set() -> None:
    msg = error_of("+table.a=2")
    assert "'table.a' already exists" in msg and "table.a=" in msg
    msg = error_of("+count=2")
    assert "'count' already exists" in msg and "set it with count=..." in msg


def test_plus_on_a_dataclass_explains_that_its_fields_are_fixed() -> None:
    msg = error_of("+inner.colour=red")
    assert "cannot add 'inner.colour'" in msg
    assert "Inner has a fixed set of fields" in msg
    assert "Valid keys under 'inner' (Inner): size, name" in msg


def test_plus_plus_sets_existing_keys_and_adds_missing_dict_keys() -> None:
    cfg = apply("++table.a=2", "++table.b=3", "++count=9")
    assert cfg.table == {"a": 2.0, "b": 3.0}
    assert cfg.count == 9


def test_plus_creates_missing_intermediate_mappings_in_free_dicts() -> None:
    cfg = apply("+free.a.b=1", "++free.x.y.z=[1, 2]")
    assert cfg.free == {"a": {"b": 1}, "x": {"y": {"z": [1, 2]}}}


def test_set_on_a_missing_dict_key_points_to_plus() -> None:
    msg = error_of("table.b=2")
    assert "'table.b' does not exist; add it with +table.b=... or ++table.b=..." in msg
    assert "Keys in 'table': a" in msg


def test_tilde_resets_a_field_to_its_default() -> None:
    cfg = apply("count=7", "inner.size=9", "sizes=[5]")
    reset = apply("~count", "~inner", "~sizes", cfg=cfg)
    assert (reset.count, reset.inner, reset.sizes) == (1, Inner(), [1, 2])


def test_tilde_resets_a_recipe_value_to_the_dataclass_default() -> None:
    cfg = apply_overrides(gpt_tiny(), ["~train.steps"])
    assert cfg.train.steps == ConfigContainer().train.steps


def test_tilde_removes_a_dict_key() -> None:
    assert apply("~table.a").table == {}


def test_tilde_with_a_value_removes_only_when_it_matches() -> None:
    assert apply("~count=1").count == 1
    assert apply("count=5", "~count=5").count == 1
    assert "'count' is 1, not 2; nothing was removed" in error_of("~count=2")


def test_tilde_on_a_missing_dict_key_is_an_error() -> None:
    assert "cannot remove 'table.zz': no such key" in error_of("~table.zz")


def test_overrides_apply_in_order() -> None:
    assert apply("count=2", "count=3").count == 3


# --- values and types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("-3", -3),
        ("1_000", 1000),
        ("3e-4", 3e-4),
        ("1.5", 1.5),
        (".5", 0.5),
        ("true", True),
        ("False", False),
        ("null", None),
        ("yes", "yes"),
        ("on", "on"),
        ("010", "010"),
        ("2024-01-01", "2024-01-01"),
        ("[1, 2.5, a]", [1, 2.5, "a"]),
        ("{a: 1, b: [x]}", {"a": 1, "b": ["x"]}),
        ('"5"', "5"),
        ("'true'", "true"),
        ("'a,b'", "a,b"),
        ("a: b", "a: b"),
        ("ring:2", "ring:2"),
        ("/dev/shm/x", "/dev/shm/x"),
        ("str(5)", "5"),
        ("int(3.0)", 3),
        ("", ""),
    ],
)
def test_values_parse_with_hydras_grammar(text: str, value: Any) -> None:
    assert parse_value(text)[0] == value
    assert type(parse_value(text)[0]) is type(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # where Hydra's grammar differs from the YAML 1.2 of config files (docs/recipes.md)
        ("0x10", "0x10"),
        ("inf", float("inf")),
        ("-inf", float("-inf")),
        (".inf", ".inf"),
        ("tRUE", True),
        ("Null", None),
        ("b\\,c", "b,c"),
    ],
)
def test_values_where_hydra_differs_from_yaml(text: str, value: Any) -> None:
    assert parse_value(text)[0] == value
    assert type(parse_value(text)[0]) is type(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: b # c", "unexpected character '#'"),
        ("~", "unexpected character '~'"),
        ("é", "unexpected character 'é'"),
        ("x=y", "mismatched input '='"),
    ],
)
def test_values_hydra_cannot_parse_are_errors_that_say_how_to_quote(
    text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_value(text, source="value")
    msg = str(info.value)
    assert msg.startswith(f"value: cannot parse the value {text!r} with Hydra's override grammar")
    assert message in msg and f"quote it: '{text}'" in msg


@pytest.mark.parametrize(
    "text", ["/My Project (copy)/run #1", "it's", "a\\", "a\\'b", "é=1,2", "", "~"]
)
def test_quote_value_round_trips_any_text(text: str) -> None:
    assert parse_value(quote_value(text)) == (text, None)
    assert apply(f"label={quote_value(text)}").label == text


def test_a_quoted_value_passes_any_text() -> None:
    cfg = apply("++free.note='a: b # c, x=y, é'")
    assert cfg.free == {"note": "a: b # c, x=y, é"}


@pytest.mark.parametrize("text", ["count=1,2", "count=choice(1,2)", "count=range(1,5)",
                                  "ratio=interval(0,1)", "label=glob(*)"])  # fmt: skip
def test_sweeps_are_refused_with_how_to_quote(text: str) -> None:
    msg = error_of(text)
    key, _, value = text.partition("=")
    assert f"'{value}' is a Hydra sweep" in msg
    assert f"quote it inside the argument: \"{key}='{value}'\"" in msg


def test_hydra_packages_and_config_groups_are_refused() -> None:
    assert "'count@pkg' names a Hydra package" in error_of("count@pkg=1")
    assert "'db/mysql' is not a key path" in error_of("db/mysql=1")


def test_a_cast_is_not_kept_as_text_for_a_str_field() -> None:
    assert apply("label=str(5)").label == "5"
    assert "label: expected str, got int 5" in error_of("label=int(5)")


def test_an_int_is_accepted_for_a_float_field() -> None:
    cfg = apply("ratio=2")
    assert cfg.ratio == 2.0 and isinstance(cfg.ratio, float)


def test_a_float_is_rejected_for_an_int_field() -> None:
    assert "count: expected int, got float 1.5" in error_of("count=1.5")


def test_type_error_names_source_key_type_and_value() -> None:
    msg = error_of("count=abc")
    assert msg == "override 'count=abc': count: expected int, got str 'abc'"


def test_type_error_in_the_real_config_names_the_full_path() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(ConfigContainer(), ["checkpoint.memory.interval=often"])
    assert str(info.value) == (
        "override 'checkpoint.memory.interval=often': checkpoint.memory.interval: "
        "expected int, got str 'often'"
    )


@pytest.mark.parametrize("text", ["1", "yes", "on", "0", "y"])
def test_bool_fields_take_only_true_or_false(text: str) -> None:
    msg = error_of(f"flag={text}")
    assert "flag: expected bool" in msg and "write true or false" in msg


def test_bool_fields_take_yaml_booleans() -> None:
    assert apply("flag=true").flag is True
    assert apply("flag=True", "flag=FALSE").flag is False


def test_str_fields_keep_the_text_of_unquoted_scalars() -> None:
    cfg = apply("label=007")
    assert cfg.label == "007"
    assert apply("label=1e-3").label == "1e-3"
    assert apply("label=true").label == "true"


def test_str_fields_reject_null() -> None:
    assert "label: expected str, got null" in error_of("label=null")


def test_optional_fields_take_null_or_their_type() -> None:
    assert apply("maybe=0.25").maybe == 0.25
    assert apply("maybe=0.25", "maybe=null").maybe is None
    assert "maybe: expected float | None, got str 'soon'" in error_of("maybe=soon")


def test_unions_try_members_in_order() -> None:
    assert apply("either=5").either == 5
    assert apply("either=five").either == "five"
    assert "either: expected int | str, got list" in error_of("either=[1]")


def test_literal_fields_name_the_choices_and_suggest_one() -> None:
    assert apply("mode=slow").mode == "slow"
    msg = error_of("mode=slwo")
    assert "mode: expected one of 'fast', 'slow', got str 'slwo'" in msg
    assert "did you mean 'slow'?" in msg


def test_list_elements_are_checked_with_their_index() -> None:
    assert apply("sizes=[3, 4, 5]").sizes == [3, 4, 5]
    assert "sizes[1]: expected int, got str 'x'" in error_of("sizes=[1, x]")
    assert "sizes: expected list[int], got int 3" in error_of("sizes=3")


def test_tuples_are_built_from_lists_and_checked_per_position() -> None:
    cfg = apply("pair=[2, b]", "dims=[1, 2, 3]")
    assert cfg.pair == (2, "b") and cfg.dims == (1, 2, 3)
    assert "pair: expected tuple[int, str]" in error_of("pair=[1]")
    assert "exactly 2 items" in error_of("pair=[1]")


def test_dict_values_are_checked() -> None:
    assert "table.b: expected float, got str 'x'" in error_of("+table.b=x")


def test_a_mapping_merges_into_a_nested_dataclass() -> None:
    cfg = apply("inner={size: 7}")
    assert cfg.inner == Inner(size=7, name="inner")


def test_a_mapping_into_a_dataclass_rejects_unknown_keys() -> None:
    msg = error_of("inner={sise: 7}")
    assert "unknown key 'inner.sise'; did you mean 'inner.size'?" in msg


def test_setting_a_key_under_a_null_optional_dataclass_builds_it_from_defaults() -> None:
    assert apply("opt_inner.size=5").opt_inner == Inner(size=5)
    assert apply("opt_inner={name: z}").opt_inner == Inner(name="z")


def test_keys_below_a_scalar_cannot_be_reached() -> None:
    msg = error_of("count.x=1")
    assert "cannot reach 'count.x': 'count' holds int 1, which has no keys" in msg


def test_config_error_is_a_memckpt_error_and_a_value_error() -> None:
    with pytest.raises(MemckptError):
        apply("count=abc")
    with pytest.raises(ValueError):
        apply("count=abc")


# --- unknown keys -----------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_and_lists_the_level() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(ConfigContainer(), ["train.stpes=5"])
    msg = str(info.value)
    assert msg.startswith("override 'train.stpes=5': unknown key 'train.stpes'; ")
    assert "did you mean 'train.steps'?" in msg
    assert "Valid keys under 'train' (TrainConfig): steps, micro_batch_size, seed" in msg


def test_unknown_top_level_key_suggests_a_section() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(ConfigContainer(), ["optimiser.lr=1"])
    msg = str(info.value)
    assert "unknown key 'optimiser'; did you mean 'optimizer'?" in msg
    assert "Valid keys at the top level (ConfigContainer): train, model, optimizer" in msg


def test_unknown_key_without_a_close_match_still_lists_valid_keys() -> None:
    msg = error_of("zzz=1")
    assert "unknown key 'zzz'. Valid keys at the top level (Sample): count, ratio" in msg


def test_plus_plus_cannot_add_a_dataclass_field() -> None:
    assert "unknown key 'inner.colour'" in error_of("++inner.colour=red")


# --- grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "op", "key", "value"),
    [
        ("a.b=1", "set", "a.b", 1),
        ("+a.b=x", "add", "a.b", "x"),
        ("++a.b=[1]", "force", "a.b", [1]),
        ("~a.b", "delete", "a.b", None),
        ("~a.b=2", "delete", "a.b", 2),
        ("a.b='x=y'", "set", "a.b", "x=y"),
        ("~a.b=", "delete", "a.b", ""),
        ("a.run-1.0=1", "set", "a.run-1.0", 1),
    ],
)
def test_override_grammar(text: str, op: str, key: str, value: Any) -> None:
    ov = parse_override(text)
    assert (ov.op, ov.key, ov.value) == (op, key, value)
    assert ov.has_value == ("=" in text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.steps", "no value; write train.steps=VALUE (or ~train.steps to reset it)"),
        ("+train.steps", "no value; write +train.steps=VALUE"),
        ("train..steps=1", "'train..steps' is not a key path"),
        ("=5", "'' is not a key path"),
        ("train steps=5", "'train steps' is not a key path"),
        ("+++a=1", "'+a' is not a key path"),
        ("a=[1, 2", "cannot parse the value '[1, 2' with Hydra's override grammar"),
        ("a=x=y", "cannot parse the value 'x=y'"),
        ("tags.é=1", "'tags.é' is not a key path"),
    ],
)
def test_malformed_overrides_are_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert str(info.value).startswith(f"override '{text}': ")
    assert message in str(info.value)


def test_a_string_instead_of_a_list_of_overrides_is_an_error() -> None:
    with pytest.raises(ConfigError, match="must be a list of strings"):
        apply_overrides(Sample(), "count=2")  # type: ignore[arg-type]


def test_str_fields_keep_text_only_as_a_whole_value_inside_a_mapping_quote_it() -> None:
    """docs/recipes.md: an unquoted number keeps its text only as the whole value."""
    cfg = apply_overrides(gpt_tiny(), ["+logger.tags.team=7", "++logger.tags.n=010"])
    assert cfg.logger.tags == {"team": "7", "n": "010"}
    with pytest.raises(ConfigError, match=r"logger\.tags\.team: expected str, got int 7.*quote"):
        apply_overrides(gpt_tiny(), ["logger.tags={team: 7}"])
    assert apply_overrides(gpt_tiny(), ["logger.tags={team: '7'}"]).logger.tags == {"team": "7"}


def test_demo_help_and_errors_name_defaults_and_what_to_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``memckpt demo --help`` says what the demo does and its defaults; a too-short run
    names the interval it was measured against."""
    from memckpt.tools.cli import main as cli_main
    from memckpt.tools.demo import choose_demo_placement, run_demo

    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "``" not in out and "Train gpt_tiny on 2 simulated nodes" in out
    assert "(default: memckpt-demo)" in out and "(default 10)" in out
    with pytest.raises(MemckptError, match=r"--steps 12 .*3 x --interval 5 = 15"):
        run_demo("unused", steps=12, memory_interval=5)
    with pytest.raises(MemckptError, match=r"--device cpu, or --device auto \(the GPUs"):
        choose_demo_placement("cuda", cuda_available=False, visible_gpus=[])
