"""``docs/config.md`` is what ``smoe_ds.config.reference`` generates from the config dataclasses: the
committed page is current, every field of every command's config is in it with its default and its
comment, and a field without a comment stops the generator."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smoe_ds.config import reference
from smoe_ds.config.reference import MissingComment
from smoe_ds.config.schema import TrainConfig
from smoe_ds.finetuning.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [config for _, _, config in reference.COMMANDS]


@dataclass
class Documented:
    # above the field,
    # on two lines
    a: int = 1
    b: str | None = None  # on its line

    c: int = 5  # inside its value
    d: list = field(default_factory=lambda: [1, 2])  # a factory's value


@dataclass
class Outer:
    inner: Documented = field(default_factory=Documented)  # a nested section
    z: float = 0.5  # after it


@dataclass
class Undocumented:
    a: int = 1  # documented
    # a comment, then a blank line: it documents no field

    b: int = 2


def test_committed_page_is_current():
    page = REPO / "docs" / "config.md"
    assert page == reference.DEFAULT_PATH
    committed = page.read_text(encoding="utf-8") if page.is_file() else ""
    generated = reference.render()
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm=""
        )
        pytest.fail(
            f"docs/config.md is stale: run `{reference.COMMAND}` and commit it. First differences:\n"
            + "\n".join(list(diff)[:30])
        )


def _expected_keys(config: type) -> dict[str, typing.Any]:
    """Every key of ``config``'s sections (nested sections too) -> its default, found without the generator."""
    out: dict[str, typing.Any] = {}

    def walk(value, prefix: str) -> None:
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            dotted, default = f"{prefix}.{f.name}", getattr(value, f.name)
            out[dotted] = default
            if dataclasses.is_dataclass(hints[f.name]):
                walk(default, dotted)

    instance = config()
    for section in config.SECTIONS:
        walk(getattr(instance, section), section)
    return out


def _command_part(config: type) -> str:
    """The part of the page about ``config``'s command."""
    page = reference.render()
    starts = [page.index(f"\n## {command}\n") for command, _, _ in reference.COMMANDS]
    i = CONFIGS.index(config)
    return page[starts[i] : starts[i + 1] if i + 1 < len(starts) else len(page)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented(config):
    expected = _expected_keys(config)
    for dotted in config.UNUSED_KEYS:  # refused by this command, so not its keys
        assert dotted in expected, f"UNUSED_KEYS names {dotted}, no field"
        del expected[dotted]
    keys = {k.dotted: k for k in reference.command_keys(config)}
    assert list(keys) and set(keys) == set(expected)
    part = _command_part(config)
    for dotted, default in expected.items():
        key = keys[dotted]
        assert key.description and "\n" not in key.description, dotted
        assert key.type and key.type != "None", dotted
        if dataclasses.is_dataclass(default):
            assert key.section and f"\n### `{dotted}`\n" in part, dotted
        else:
            assert key.default == default, dotted
            shown = key.type.replace("|", "\\|")  # escaped in a table cell
            assert f"| `{dotted}` | `{shown}` | `{json.dumps(default)}` |" in part, dotted
    rows = [line.split("`")[1] for line in part.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(expected), "each key has one row; DeepSpeed's keys and UNUSED_KEYS have none"
    for dotted in config.UNUSED_KEYS:
        assert f"- `{dotted}`: " in part  # said to be refused


def test_both_commands_and_deepspeed_are_covered():
    assert {TrainConfig, FinetuneConfig} <= set(CONFIGS)
    page = reference.render()
    assert "https://www.deepspeed.ai/docs/config-json/" in page and "smoe_ds/config/deepspeed_keys.py" in page
    assert page.startswith("# Config reference\n\n> Generated from the config dataclasses by ")
    assert reference.COMMAND in page.splitlines()[2] and "do not edit by hand" in page.splitlines()[2]


def test_comments_on_the_line_inside_the_value_or_above():
    keys = reference.section_keys(Outer, "outer")
    assert [(k.dotted, k.type, k.default, k.description, k.section) for k in keys] == [
        ("outer.inner", "Documented", None, "a nested section", True),
        ("outer.z", "float", 0.5, "after it", False),
        ("outer.inner.a", "int", 1, "above the field, on two lines", False),
        ("outer.inner.b", "str | None", None, "on its line", False),
        ("outer.inner.c", "int", 5, "inside its value", False),
        ("outer.inner.d", "list", [1, 2], "a factory's value", False),
    ]


def test_a_field_without_a_comment_stops_the_generator():
    with pytest.raises(MissingComment, match=r"test_reference\.py:\d+: Undocumented\.b has no comment"):
        reference.section_keys(Undocumented, "section")


def test_a_class_read_from_its_source_file(tmp_path, monkeypatch):
    """The generator takes a class and the file its statement is in."""
    source = tmp_path / "tmp_config.py"
    source.write_text(
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\nclass Section:\n    documented: int = 1  # has one\n    bare: str = 'x'\n",
        encoding="utf-8",
    )
    spec = importlib.util.spec_from_file_location("tmp_config", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tmp_config", module)
    spec.loader.exec_module(module)
    with pytest.raises(MissingComment, match=r"tmp_config\.py:7: Section\.bare has no comment"):
        reference.section_keys(module.Section, "section", source=source)
    source.write_text(source.read_text().replace("'x'\n", "'x'  # now documented\n"), encoding="utf-8")
    keys = reference.section_keys(module.Section, "section", source=source)
    assert [(k.dotted, k.description) for k in keys] == [
        ("section.documented", "has one"),
        ("section.bare", "now documented"),
    ]


def test_write_and_check(tmp_path, capsys):
    page = tmp_path / "config.md"
    assert reference.main(["--check", str(page)]) == 1
    assert reference.main(["--write", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == reference.render()
    assert reference.main(["--check", str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("| `run.max_steps` | `int` | `200`", "| x |"))
    assert reference.main(["--check", str(page)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"{page} is out of date with the config dataclasses: run `{reference.COMMAND} {page}`"
    assert err[0].endswith(f"is missing: run `{reference.COMMAND} {page}`")
