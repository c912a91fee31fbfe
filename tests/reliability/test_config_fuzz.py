"""Property-based fuzzing of the config loader: a bad config is a ``ConfigError`` naming the key.

Whatever a user writes in a preset or on the command line, :func:`pipeline.config.load_config`
must either return a config or raise :class:`ConfigError` whose message names the offending dotted
key -- never a raw pydantic ``ValidationError``, ``TypeError``, ``KeyError`` or any other
traceback (``pipeline.cli.main`` only turns ``ConfigError`` into ``error: ...`` and exit code 2).

The field table is derived from the pydantic models themselves (annotations and ``Ge``/``Gt``/
``Le``/``Lt``/``MinLen``/``MaxLen`` metadata), so new fields are fuzzed automatically; a field of
a kind this file does not know fails ``test_every_field_kind_is_understood`` loudly.

The bugs this file found in ``pipeline/config.py`` (PyYAML's plain ValueError for 2020-13-45,
falsy non-mapping documents taken as the defaults, non-UTF-8 files, NUL characters in paths, very
deep nesting) are pinned by the regression tests at the bottom.
"""

from __future__ import annotations

import copy
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline.config import ConfigError, PipelineConfig, SearchDim, load_config, to_dict

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ_SMALL = settings(FUZZ, max_examples=60)
#: the YAML-file properties parse a whole config with pure-Python PyYAML per example (~15 ms)
FUZZ_FILE = settings(FUZZ, max_examples=100)


# ----------------------------------------------------------------------------- the field table


@dataclass(frozen=True)
class Spec:
    """What one config field accepts, read off its pydantic annotation and constraints."""

    kind: str  # int | float | bool | str | literal | list | dict | section | any
    optional: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    choices: tuple = ()
    item: "Spec | None" = None
    model: type | None = None


def _spec_of(annotation: Any, metadata: list = ()) -> Spec:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"union {annotation} not understood by the fuzzer")
        annotation = rest[0]
        origin = typing.get_origin(annotation)
    bounds: dict[str, Any] = {}
    for m in metadata:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(at, name.capitalize())):
                bounds[name] = getattr(m, name)
        if isinstance(m, at.MinLen):
            bounds["min_len"] = m.min_length
        if isinstance(m, at.MaxLen):
            bounds["max_len"] = m.max_length
    if origin is Literal:
        return Spec("literal", optional, choices=typing.get_args(annotation), **bounds)
    if annotation is Any:
        return Spec("any", True)
    if annotation is bool:
        return Spec("bool", optional, **bounds)
    if annotation is int:
        return Spec("int", optional, **bounds)
    if annotation is float:
        return Spec("float", optional, **bounds)
    if annotation is str:
        return Spec("str", optional, **bounds)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return Spec("list", optional, item=_spec_of(item), **bounds)
    if origin is dict:
        key, value = typing.get_args(annotation)
        return Spec("dict", optional, item=_spec_of(value), **bounds)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Spec("section", optional, model=annotation)
    raise TypeError(f"annotation {annotation!r} not understood by the fuzzer: extend _spec_of")


def _walk(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, Spec]]:
    out: list[tuple[tuple, Spec]] = []
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        spec = _spec_of(field.annotation, field.metadata)
        out.append((path, spec))
        if spec.kind == "section":
            out.extend(_walk(spec.model, path))
    return out


DEFAULT_TREE: dict[str, Any] = to_dict(load_config())

#: every field of the tree, sections included, plus the fields of the default sweep dimensions
#: (``tune.space["distill.lr"].low`` has the path ("tune", "space", "distill.lr", "low")).
FIELDS: list[tuple[tuple, Spec]] = _walk(PipelineConfig)
for _dim in DEFAULT_TREE["tune"]["space"]:
    FIELDS += _walk(SearchDim, ("tune", "space", _dim))
#: the paths an override can address (no component holds a dot)
OVERRIDABLE = [(p, s) for p, s in FIELDS if not any("." in part for part in p)]
#: places that take a fixed set of keys: () is the top level
SECTIONS: list[tuple[tuple, type[BaseModel]]] = [((), PipelineConfig)] + [
    (p, s.model) for p, s in FIELDS if s.kind == "section"
] + [(("tune", "space", d), SearchDim) for d in DEFAULT_TREE["tune"]["space"]]
#: the sections of the tree proper (the top level and every nested model field)
MODEL_SECTIONS = [s for s in SECTIONS if s[1] is not SearchDim]


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _finite_float(v: Any) -> bool:
    try:
        float(v)
    except OverflowError:
        return False
    return True


def _in_bounds(spec: Spec, v: Any) -> bool:
    ok = True
    if spec.ge is not None:
        ok &= v >= spec.ge
    if spec.gt is not None:
        ok &= v > spec.gt
    if spec.le is not None:
        ok &= v <= spec.le
    if spec.lt is not None:
        ok &= v < spec.lt
    return bool(ok)


def _len_ok(spec: Spec, v: Any) -> bool:
    return (spec.min_len is None or len(v) >= spec.min_len) and (spec.max_len is None or len(v) <= spec.max_len)


def field_accepts(spec: Spec, v: Any) -> bool:
    """The oracle: would a strict pydantic field of this spec take ``v`` (ignoring cross-field rules)?

    Errs on the side of "valid" where unsure (dicts for sections/dicts), so that a value the fuzzer
    calls invalid really is.
    """
    if v is None:
        return spec.optional or spec.kind == "any"
    kind = spec.kind
    if kind == "any":
        return True
    if kind == "bool":
        return type(v) is bool
    if kind == "int":
        return type(v) is int and _in_bounds(spec, v)
    if kind == "float":
        return type(v) in (int, float) and _finite_float(v) and _in_bounds(spec, v)
    if kind == "str":
        return type(v) is str and _len_ok(spec, v)
    if kind == "literal":
        return type(v) is str and v in spec.choices
    if kind == "list":
        return type(v) is list and _len_ok(spec, v) and all(field_accepts(spec.item, x) for x in v)
    if kind in ("dict", "section"):
        return isinstance(v, dict)  # a dict may or may not be valid: never generated as "invalid"
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- strategies

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,14}", fullmatch=True)
SMALL_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**300, 2**1024]),
    st.floats(allow_nan=True, allow_infinity=True),
    SMALL_TEXT,
    st.sampled_from(["", " ", "abc", "5", "0.5", "true", "null", "1e3", "[", "{}", "~", "NaN"]),
)
ANY_VALUE = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(IDENT, inner, max_size=3), max_leaves=6
)


def _out_of_range(spec: Spec) -> st.SearchStrategy:
    vals: list[Any] = []
    ints = spec.kind == "int"
    for b, below in ((spec.ge, True), (spec.gt, True), (spec.le, False), (spec.lt, False)):
        if b is None:
            continue
        step = -1 if below else 1
        vals += [b + step, b + 1000 * step, b + step * 10**30]
        if spec.gt is not None or spec.lt is not None:
            vals.append(b)
        if not ints:
            vals += [math.nextafter(float(b), -math.inf if below else math.inf), b + step * 0.5, float(b + step)]
            vals += [-math.inf if below else math.inf, math.nan]
    if not vals:
        return st.nothing()
    if ints:
        vals = [int(v) for v in vals]
    return st.sampled_from(vals)


def invalid_values(spec: Spec) -> st.SearchStrategy:
    """Values of the wrong type or out of range for ``spec`` (filtered through the oracle)."""
    parts = [ANY_VALUE]
    if spec.kind in ("int", "float"):
        parts.append(_out_of_range(spec))
    if spec.kind == "literal":
        c = spec.choices
        parts.append(st.sampled_from([x.upper() for x in c] + [x + "x" for x in c] + [" " + x for x in c] + ["", "none "]))
        parts.append(SMALL_TEXT)
    if spec.kind == "str" and spec.min_len:
        parts.append(st.just(""))
    if spec.kind == "list":
        parts.append(st.lists(st.floats(0, 1), max_size=5))
        parts.append(st.lists(st.one_of(st.floats(0, 1), st.booleans(), SMALL_TEXT, st.none()), min_size=1, max_size=3))
    return st.one_of(*parts).filter(lambda v: not field_accepts(spec, v))


def _fields_with_invalid_values(fields):
    return st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f[0]), st.just(f[1]), invalid_values(f[1])))


# ----------------------------------------------------------------------------- helpers


def yaml_value(v: Any) -> str:
    """``v`` as YAML text that reads back as ``v`` (for an override's right-hand side)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("...\n").strip()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def error_keys(message: str) -> list[str]:
    """The dotted keys that ``_format_errors`` put at the start of each ``  key: ...`` line."""
    keys = []
    for line in message.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   ") and ": " in line:
            keys.append(line[2:].split(": ", 1)[0])
    return keys


def assert_names(message: str, key: str) -> None:
    """The message has an error line for ``key`` itself or for something inside it."""
    keys = error_keys(message)
    assert any(k == key or k.startswith(key + ".") for k in keys), f"no error line names {key!r}:\n{message}"


def set_path(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def load_expecting_error(path=None, overrides=()) -> str:
    """``load_config`` must raise ``ConfigError`` (any other exception fails the test as-is)."""
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    text = str(err.value)
    assert text.strip(), "a ConfigError with an empty message"
    return text


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


def write_yaml(path: Path, tree: Any) -> Path:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: the fuzz runs write many files
    path.write_text(yaml.dump(tree, Dumper=dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sanity of the table


def test_every_field_kind_is_understood():
    kinds = {s.kind for _, s in FIELDS}
    assert kinds <= {"int", "float", "bool", "str", "literal", "list", "dict", "section", "any"}
    assert len(OVERRIDABLE) > 50 and len(SECTIONS) >= 9


def test_the_oracle_agrees_with_the_defaults():
    """Every default value is accepted by the oracle (else the oracle would invent invalid values)."""
    for path, spec in FIELDS:
        node: Any = DEFAULT_TREE
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            assert field_accepts(spec, node), (dotted(path), node)


# ----------------------------------------------------------------------------- 1. unknown keys


def _unknown_key_case(sections):
    def build(section):
        path, model = section
        return st.tuples(st.just(path), IDENT.filter(lambda k: k not in model.model_fields), ANY_VALUE)

    return st.sampled_from(sections).flatmap(build)


@FUZZ_FILE
@given(case=_unknown_key_case(SECTIONS))
def test_unknown_key_in_yaml_file_is_named(case, cfg_file):
    section, key, value = case
    tree = copy.deepcopy(DEFAULT_TREE)
    set_path(tree, section + (key,), value)
    text = load_expecting_error(write_yaml(cfg_file, tree))
    name = dotted(section + (key,))
    assert f"  {name}: unknown key" in text, text
    assert "allowed keys here:" in text


@FUZZ
@given(case=_unknown_key_case([s for s in SECTIONS if not any("." in p for p in s[0])]), nested=st.booleans())
def test_unknown_key_in_override_is_named(case, nested):
    section, key, value = case
    name = dotted(section + (key,))
    # nested: the unknown key is a whole new section, set through a deeper override
    override = f"{name}.inner=1" if nested else f"{name}={yaml_value(value)}"
    text = load_expecting_error(overrides=[override])
    assert f"  {name}: unknown key" in text, text


@FUZZ_SMALL
@given(section=st.sampled_from(MODEL_SECTIONS), typo=st.data())
def test_one_letter_typo_suggests_the_real_key(section, typo):
    path, model = section
    real = typo.draw(st.sampled_from(sorted(model.model_fields)))
    i = typo.draw(st.integers(0, len(real) - 1))
    wrong = real[:i] + real[i + 1 :]  # drop one letter
    assume(len(wrong) >= 3 and wrong not in model.model_fields)
    text = load_expecting_error(overrides=[f"{dotted(path + (wrong,))}=1"])
    assert f"  {dotted(path + (wrong,))}: unknown key" in text, text
    assert "did you mean" in text, text


# ----------------------------------------------------------------------------- 2. wrong types / ranges


@FUZZ_FILE
@given(case=_fields_with_invalid_values(FIELDS))
def test_invalid_value_in_yaml_file_is_named(case, cfg_file):
    path, spec, value = case
    tree = copy.deepcopy(DEFAULT_TREE)
    set_path(tree, path, value)
    text = load_expecting_error(write_yaml(cfg_file, tree))
    assert_names(text, dotted(path))


@FUZZ
@given(case=_fields_with_invalid_values(OVERRIDABLE))
def test_invalid_value_in_override_is_named(case):
    path, spec, value = case
    raw = yaml_value(value)
    assume(_same(yaml.safe_load(raw), value))  # the override must carry exactly this value
    text = load_expecting_error(overrides=[f"{dotted(path)}={raw}"])
    assert_names(text, dotted(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ("ray.num_workers=true", "ray.num_workers"),  # bool is not an int (strict)
        ("ray.cpus_per_worker=false", "ray.cpus_per_worker"),  # nor a float
        ("ray.use_gpu=1", "ray.use_gpu"),  # and an int is not a bool
        ("data.seed=5.0", "data.seed"),  # a float is not an int
        ("data.seed='5'", "data.seed"),  # a quoted number is a string
        ("distill.lr=" + "9" * 400, "distill.lr"),  # an int too big for a float
        ("distill.alpha=1.0000000000000002", "distill.alpha"),  # the next float above le=1
        ("data.val_fraction=.nan", "data.val_fraction"),
        ("data.image_size=" + "9" * 4000, "data.image_size"),  # huge, but still parseable
        ("tracking.experiment=''", "tracking.experiment"),  # min_length=1
        ("train.inception_scale=[0.1]", "train.inception_scale"),
        ("data.synthetic=[]", "data.synthetic"),
        ("tune.space=7", "tune.space"),
        ("data=null", "data"),
    ],
)
def test_hand_picked_invalid_values(override, key):
    assert_names(load_expecting_error(overrides=[override]), key)


@FUZZ_FILE
@given(
    name=IDENT,
    dim=st.dictionaries(
        st.sampled_from(["type", "low", "high", "values", "extra"]),
        st.one_of(st.sampled_from(["uniform", "loguniform", "randint", "choice", "bogus"]), ANY_VALUE),
        max_size=4,
    ),
)
def test_sweep_dimension_errors_name_the_dimension(name, dim, cfg_file):
    """Random ``tune.space`` entries: valid ones load, invalid ones name ``tune.space.<name>``."""
    tree = copy.deepcopy(DEFAULT_TREE)
    tree["tune"]["space"][name] = dim
    path = write_yaml(cfg_file, tree)
    try:
        load_config(path)
    except ConfigError as err:
        assert_names(str(err), f"tune.space.{name}")
    else:
        SearchDim.model_validate(dim)  # it loaded, so the entry must really be a valid dimension


# ----------------------------------------------------------------------------- 3. override syntax

KEY_PARTS = st.one_of(
    st.sampled_from([dotted(p) for p, _ in OVERRIDABLE]),
    st.sampled_from(["", " ", ".", "..", "data.", ".data", "data..seed", "data. seed", " data.seed ", "data seed",
                     "datta.seed", "output_dir.sub", "tune.space.x", "tune.space.x.type", "data.synthetic.x.y"]),
    st.lists(IDENT, min_size=1, max_size=4).map(".".join),
    SMALL_TEXT,
)
GARBAGE_VALUES = st.one_of(
    st.sampled_from(["", " ", "[", "]", "{", "}", "{a", "[1,", ": :", "a: b: c", "*x", "&a", "&a [*a]", "!!python/object:os.system",
                     "!!int abc", "!!float x", "'unterminated", '"\\q"', "\t", "- a\n- b", "---\na\n---\nb", "%YAML 1.1",
                     "? a", "|", ">", "#", "@", "`", "null", "~", "true", "yes", "0o17", "017", "0x1F", "1_000", "1:30",
                     ".inf", "-.inf", ".nan", "2020-01-01", "2020-01-01 10:00:00", "1e3", "1.0e+3", "=", "a=b", "[]", "{}",
                     "2020-13-45", "0x_", "0b_", "1" * 4400]),
    SMALL_TEXT,
    ANY_VALUE.map(yaml_value),
)
OVERRIDE_TEXT = st.one_of(
    st.tuples(KEY_PARTS, st.sampled_from(["=", "=", "=", "==", "", " = "]), GARBAGE_VALUES).map("".join),
    SMALL_TEXT,
)


@FUZZ
@given(overrides=st.lists(OVERRIDE_TEXT, min_size=1, max_size=3))
def test_random_overrides_never_escape_as_other_exceptions(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        assert str(err).strip()
    else:
        assert isinstance(cfg, PipelineConfig)


@FUZZ
@given(text=OVERRIDE_TEXT)
def test_a_rejected_override_names_its_key(text):
    key = text.partition("=")[0].strip()
    try:
        load_config(None, [text])
    except ConfigError as err:
        msg = str(err)
    else:
        return
    if "=" not in text or not key or any(not part for part in key.split(".")):
        assert "is not of the form dotted.key=value" in msg
        return
    if "is a value, not a section" in msg:
        assert f"override '{key}'" in msg
        return
    keys = error_keys(msg)
    # the key itself, something inside it, a section holding it (an unknown-key or cross-field
    # error one level up), or a cross-field error at the root that spells the key out
    assert f"  {key}: " in msg or any(
        k == key or k.startswith(key + ".") or key.startswith(k + ".") or (k == "<root>" and key in msg) for k in keys
    ), f"{text!r}:\n{msg}"


# ----------------------------------------------------------------------------- 4. random YAML documents

YAML_TOKENS = st.sampled_from(["[", "]", "{", "}", ":", ": ", "- ", "\n", "  ", "a", "data", "seed", "1", "0.5", "'", '"',
                               "&x ", "*x", "!!str ", "!!int ", "!!map ", "!!seq ", "---\n", "...\n", "# c", "? ", ",",
                               "|\n", ">\n", "%YAML 1.1\n", "\t", "null", "true", "~", "0x_", "2020-13-45", "\\0", "=", "é"])
RAW_YAML = st.one_of(
    st.lists(YAML_TOKENS, max_size=25).map("".join),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=60),
)


@FUZZ_FILE
@given(doc=ANY_VALUE.filter(lambda d: not isinstance(d, dict)))
def test_non_mapping_document_is_rejected(doc, cfg_file):
    write_yaml(cfg_file, doc)
    if doc is None:  # an empty file: the defaults, by design
        assert isinstance(load_config(cfg_file), PipelineConfig)
        return
    text = load_expecting_error(cfg_file)
    assert "must hold a mapping" in text and str(cfg_file) in text


@FUZZ_FILE
@given(doc=st.dictionaries(st.one_of(IDENT, st.integers(), st.booleans(), st.none(), SMALL_TEXT), ANY_VALUE, min_size=1, max_size=4))
def test_random_mapping_document_names_its_bad_keys(doc, cfg_file):
    write_yaml(cfg_file, doc)
    try:
        load_config(cfg_file)
    except ConfigError as err:
        msg = str(err)
    else:
        assert all(isinstance(k, str) and k in PipelineConfig.model_fields for k in doc)
        return
    for key in doc:
        if isinstance(key, str) and key not in PipelineConfig.model_fields:
            assert f"  {key or '<root>'}: unknown key" in msg, msg  # "" is shown as <root>
        elif not isinstance(key, str):
            assert "Keys should be strings" in msg, msg


@FUZZ
@given(text=RAW_YAML)
def test_random_yaml_text_never_escapes_as_other_exceptions(text, cfg_file):
    cfg_file.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(cfg_file)
    except ConfigError as err:
        assert str(err).strip()
    else:
        assert isinstance(cfg, PipelineConfig)


def test_missing_file_and_directory_are_config_errors(tmp_path):
    assert "not found" in load_expecting_error(tmp_path / "nope.yaml")
    assert "not found" in load_expecting_error(tmp_path)


# ----------------------------------------------------------------------------- end to end through the CLI


@pytest.fixture
def no_stage(monkeypatch):
    """``pipeline.cli`` with every stage function (and ``ray.init``, if Ray is loaded) made fatal.

    ``main`` calls ``load_config`` before the stage function, so an invalid config must never
    reach one -- and so can never start Ray. Nothing here imports Ray.
    """
    from pipeline import cli

    def forbidden(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a stage ran (or Ray started) although the config is invalid")

    for name in list(cli.STAGES):
        monkeypatch.setitem(cli.STAGES, name, (cli.STAGES[name][0], forbidden))
    if "ray" in sys.modules:  # e.g. a Ray test ran earlier in the session
        monkeypatch.setattr(sys.modules["ray"], "init", forbidden)
    return cli


@settings(FUZZ, max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(unknown=_unknown_key_case(MODEL_SECTIONS), bad=_fields_with_invalid_values(OVERRIDABLE))
def test_cli_exits_2_with_an_error_line_naming_the_key(unknown, bad, cfg_file, capsys, no_stage):
    tree = copy.deepcopy(DEFAULT_TREE)
    section, key, value = unknown
    set_path(tree, section + (key,), value)
    path, _, bad_value = bad
    assume(section[: len(path)] != path)  # the bad value must not overwrite the unknown key's section
    set_path(tree, path, bad_value)
    write_yaml(cfg_file, tree)
    capsys.readouterr()
    assert no_stage.main(["preprocess", "--config", str(cfg_file)]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: invalid configuration"), out.err
    assert f"  {dotted(section + (key,))}: unknown key" in out.err
    assert_names(out.err.removeprefix("error: "), dotted(path))


def test_cli_bad_override_exits_2(capsys, no_stage):
    assert no_stage.main(["teacher", "data.image_size=big", "ray.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.image_size" in err and "ray.num_workers" in err


# ----------------------------------------------------------------------------- regressions: bugs this file found


@pytest.mark.parametrize("value", ["2020-13-45", "2021-02-30", "0x_", "0b_", "1" * 4400])
def test_bug1_implicit_yaml_scalar_in_override(value):
    assert_names(load_expecting_error(overrides=[f"data.seed={value}"]), "data.seed")


def test_bug1_implicit_yaml_scalar_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seed: 2020-13-45\n")
    text = load_expecting_error(path)
    assert "not valid YAML" in text or "data.seed" in text


def test_bug1_through_the_cli(capsys, no_stage):
    assert no_stage.main(["preprocess", "data.seed=2020-13-45"]) == 2
    assert "data.seed" in capsys.readouterr().err


@pytest.mark.parametrize("doc", ["[]", "0", "false", "''", "0.0"])
def test_bug2_falsy_non_mapping_document(doc, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(doc + "\n")
    assert "must hold a mapping" in load_expecting_error(path)


def test_bug3_non_utf8_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  seed: \xff\xfe\n")
    load_expecting_error(path)


@pytest.mark.parametrize(
    "key", ["data.cache_dir", "data.path", "output_dir", "distill.teacher", "teacher.pretrained", "tracking.uri"]
)
def test_bug4_nul_in_home_path(key):
    assert key in load_expecting_error(overrides=[f'{key}="~\\0"'])


def test_bug5_deeply_nested_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: " + "[" * 3000 + "]" * 3000 + "\n")
    load_expecting_error(path)
