"""``docs/config.md``: every key of every command's config, generated from the config dataclasses.

Regenerate it after changing a config dataclass (a test fails while it is stale)::

    python -m smoe_ds.config.reference --write

``python -m smoe_ds.config.reference`` prints the page; ``--write [PATH]`` writes it (default
``docs/config.md``); ``--check [PATH]`` exits 1, in one line, when the file differs from what would
be written.

Each key's row is taken from the code: its type is the annotation as written, its default is the
dataclass's (a ``default_factory`` is called), and its description is the comment on the field's
line (a comment anywhere in the field's statement), else the comment lines right above the field.
A field with no comment is an error (``MissingComment``), so that every key is documented.

DeepSpeed's own top-level keys are not listed one by one: the installed DeepSpeed is the reference
for those (``smoe_ds.config.deepspeed_keys`` checks a config against it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoe_ds.config.deepspeed_keys import DOCS as DEEPSPEED_DOCS
from smoe_ds.config.schema import TrainConfig
from smoe_ds.finetuning.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / "docs" / "config.md"
COMMAND = "python -m smoe_ds.config.reference --write"
# Each command's config: (installed command, module it runs, config class).
COMMANDS = (
    ("smoe-train", "smoe_ds.train", TrainConfig),
    ("smoe-finetune", "smoe_ds.finetune", FinetuneConfig),
)


class MissingComment(ValueError):
    """A config field has no comment to document it with."""


@dataclass(frozen=True)
class Key:
    """One row of a table: a config key as a user writes it."""

    dotted: str  # e.g. moe.k_schedule.kind
    type: str  # the annotation as written in the source
    default: Any  # the dataclass's default (a default_factory called)
    description: str  # the field's comment, on one line
    section: bool = False  # a nested section (a dataclass): its keys have their own table


# -- comments from the source -------------------------------------------------------------


def _parsed(path: str) -> tuple[str, ast.Module, dict[int, tuple[str, bool]]]:
    """The file's text, its syntax tree, and its comments by line: (text without '#', alone on its line)."""
    text = Path(path).read_text(encoding="utf-8")
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            alone = tok.line.lstrip().startswith("#")
            comments[line] = (tok.string.lstrip("#").strip(), alone)
    return text, ast.parse(text, filename=path), comments


def _class_node(tree: ast.Module, cls: type, path: str) -> ast.ClassDef:
    """The ``class`` statement of ``cls`` in ``tree``, found by its qualified name."""
    node: ast.AST = tree
    for part in cls.__qualname__.split("."):
        if part == "<locals>":
            continue
        found = [
            n
            for n in ast.walk(node)
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.name == part and n is not node
        ]
        if not found:
            raise LookupError(f"{path}: no definition of {cls.__qualname__}")
        node = found[0]
    if not isinstance(node, ast.ClassDef):
        raise LookupError(f"{path}: {cls.__qualname__} is not a class statement")
    return node


def _comment(stmt: ast.stmt, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment of a field's statement: the ones inside the statement, else the lines right above."""
    inside = [comments[n][0] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
    if inside:
        return " ".join(inside)
    above, line = [], stmt.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    return " ".join(above)


def declared_fields(cls: type, source: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """``{field: (annotation as written, comment)}`` for the dataclass fields ``cls`` itself declares,
    read from ``source`` (default: the file that defines ``cls``). Raises ``MissingComment`` naming the
    file and line of a field without a comment."""
    path = str(source if source is not None else inspect.getsourcefile(cls))
    text, tree, comments = _parsed(path)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for stmt in _class_node(tree, cls, path).body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        if name not in names:  # a ClassVar
            continue
        comment = _comment(stmt, comments)
        if not comment:
            raise MissingComment(
                f"{path}:{stmt.lineno}: {cls.__qualname__}.{name} has no comment; add one on its line "
                f"(it is the key's description in docs/config.md)"
            )
        out[name] = (ast.get_source_segment(text, stmt.annotation), comment)
    return out


def field_docs(cls: type, source: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """``declared_fields`` for every field of ``cls``, inherited ones from the class that declares them.
    ``source`` is the file of ``cls`` itself (its dataclass bases are read from their own files)."""
    out: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            out.update(declared_fields(klass, source if klass is cls else None))
    return out


def class_doc(cls: type) -> str:
    """The first paragraph of the docstring written in ``cls``'s class statement, on one line ("" if none:
    a dataclass's generated ``__doc__`` is not one)."""
    path = inspect.getsourcefile(cls)
    doc = ast.get_docstring(_class_node(_parsed(path)[1], cls, path)) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


# -- keys -----------------------------------------------------------------------------------


def section_keys(cls: type, prefix: str, value: Any = None, source: str | Path | None = None) -> list[Key]:
    """The keys of section ``cls`` under ``prefix``, each followed by the keys of its nested sections.
    ``value`` is the section's default instance (default: ``cls()``); ``source`` as in ``field_docs``."""
    value = cls() if value is None else value
    docs = field_docs(cls, source)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        annotation, comment = docs[f.name]
        default = getattr(value, f.name)
        dotted = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(default):
            keys.append(Key(dotted, annotation, None, comment, section=True))
            nested += section_keys(type(default), dotted, default)
        else:
            keys.append(Key(dotted, annotation, default, comment))
    return keys + nested


def section_default(config: type, name: str) -> Any:
    """The default instance of section ``name`` of command config ``config``."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def command_keys(config: type) -> list[Key]:
    """Every key of a command's config, section by section (``SECTIONS``), without the ``UNUSED_KEYS``
    that the command refuses. DeepSpeed's top-level keys are not among them."""
    keys = []
    for name in config.SECTIONS:
        default = section_default(config, name)
        keys += [k for k in section_keys(type(default), name, default) if k.dotted not in config.UNUSED_KEYS]
    return keys


# -- Markdown -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(key: Key) -> str:
    if key.section:
        return f"the `{key.dotted}` table"
    return f"`{json.dumps(key.default)}`"


def _tables(keys: list[Key], config: type) -> list[str]:
    lines: list[str] = []
    sections = [k.dotted.rsplit(".", 1)[0] for k in keys]
    for section in dict.fromkeys(sections):
        lines += ["", f"### `{section}`", ""]
        doc = class_doc(type(_section_value(config, section)))
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in keys:
            if k.dotted.rsplit(".", 1)[0] == section:
                lines.append(f"| `{k.dotted}` | `{_cell(k.type)}` | {_cell(_default(k))} | {_cell(k.description)} |")
    return lines


def _section_value(config: type, dotted: str) -> Any:
    first, *rest = dotted.split(".")
    value = section_default(config, first)
    for part in rest:
        value = getattr(value, part)
    return value


def render() -> str:
    """The whole of ``docs/config.md``."""
    lines = [
        "# Config reference",
        "",
        f"> Generated from the config dataclasses by `{COMMAND}`: do not edit by hand. "
        "A test fails when this page differs from the code.",
        "",
        "A config file is one JSON object: DeepSpeed's own top-level keys beside the sections that belong "
        "to smoe-ds. Each section is loaded strictly: an unknown key, or a value of the wrong type, is an "
        "error that names it, and any key can be overridden on the command line with "
        "`--set section.key=value`. Below, each command's keys, with their type as the code declares it, "
        "their default as JSON, and the code's own comment.",
        "",
        "## DeepSpeed's keys",
        "",
        "Every other top-level key (`train_batch_size`, `train_micro_batch_size_per_gpu`, "
        "`gradient_accumulation_steps`, `optimizer`, `scheduler`, `zero_optimization`, `bf16`, `fp16`, ...) "
        "is DeepSpeed's and goes to `deepspeed.initialize` as written, so it is not listed here: see "
        f"[DeepSpeed's config documentation]({DEEPSPEED_DOCS}). DeepSpeed ignores what it does not read, so "
        "when a config loads, these keys are checked against the installed DeepSpeed "
        "(`smoe_ds/config/deepspeed_keys.py` and `smoe_ds/config/deepspeed_params.py`): a key it does not "
        "read, a field it never asks for, a value not of the type of its default, or an optimizer or "
        "scheduler it cannot build is refused in one line. The same DeepSpeed keys apply to every command.",
    ]
    for command, module, config in COMMANDS:
        keys = command_keys(config)
        sections = ", ".join(f"`{s}`" for s in config.SECTIONS)
        lines += [
            "",
            f"## {command}",
            "",
            f"`{command}` (`python -m {module}`): sections {sections}, {sum(not k.section for k in keys)} keys.",
        ]
        if config.UNUSED_KEYS:
            lines += ["", "Keys of the trainer's sections that this command refuses (not ignores):", ""]
            lines += [f"- `{dotted}`: {why}" for dotted, why in config.UNUSED_KEYS.items()]
        lines += _tables(keys, config)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m smoe_ds.config.reference",
        description="Print docs/config.md, every config key generated from the config dataclasses.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--write", nargs="?", const=DEFAULT_PATH, type=Path, metavar="PATH", help="write it (default docs/config.md)"
    )
    mode.add_argument(
        "--check",
        nargs="?",
        const=DEFAULT_PATH,
        type=Path,
        metavar="PATH",
        help="exit 1 if the file (default docs/config.md) differs from what would be written",
    )
    args = p.parse_args(argv)
    text = render()
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text, encoding="utf-8")
    elif args.check is not None:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
        if current != text:
            state = "is missing" if current is None else "is out of date with the config dataclasses"
            shown = args.check.relative_to(REPO) if args.check.is_relative_to(REPO) else args.check
            fix = COMMAND if args.check == DEFAULT_PATH else f"{COMMAND} {args.check}"
            print(f"{shown} {state}: run `{fix}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
