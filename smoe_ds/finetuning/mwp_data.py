"""Math word problems in the SVAMP authors' CSV format (ASDiv-A, MAWPS, SVAMP): reading, checking,
and scoring prefix equations.

A row has ``Question`` (each number replaced by ``number0``, ``number1``, ... in order),
``Numbers`` (their values, space-separated), ``Equation`` (prefix notation over ``+ - * /``,
number slots and constants) and ``Answer``. Every row is checked as it is read: a missing
column, a non-numeric number or answer, or an equation that does not evaluate (an unknown token,
a slot beyond the row's numbers, too few or too many operands, a division by zero) is an error
naming the file and row, which the command line turns into one line and exit 2.

**Scoring.** A predicted equation is right when its value, with the problem's numbers, is within
1e-4 of the value of the problem's own equation (value accuracy). It is scored against the gold
equation rather than the ``Answer`` column because the two disagree on some rows: across every
file of ``../shared/data/mwp`` (19,828 rows, folds included), 42 answers are the equation's value
rounded to the answer's decimals (3.333 for 10/3), and 48 differ more (MAWPS rows such as
34 x 4 = 134), which the gold equation itself would fail. ``answer_check`` says which kind a
row is, and the reader counts them.
"""

from __future__ import annotations

import csv
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from smoe_ds.config.schema import ConfigError

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
REQUIRED_COLUMNS = ("Question", "Numbers", "Equation", "Answer")
VALUE_TOLERANCE = 1e-4
SLOT = re.compile(r"number(\d+)$")


class MalformedEquation(ValueError):
    """A prefix equation that cannot be evaluated; the message says why."""


def evaluate_prefix(tokens: list[str] | tuple[str, ...], numbers: list[float] | tuple[float, ...]) -> float:
    """The value of a prefix equation over ``+ - * /``, ``numberI`` slots and numeric constants."""
    position = 0

    def operand() -> float:
        nonlocal position
        if position >= len(tokens):
            raise MalformedEquation("an operator lacks an operand")
        token = tokens[position]
        position += 1
        if token in OPERATORS:
            left, right = operand(), operand()
            try:
                return OPERATORS[token](left, right)
            except ZeroDivisionError:
                raise MalformedEquation("division by zero") from None
        slot = SLOT.match(token)
        if slot:
            index = int(slot.group(1))
            if index >= len(numbers):
                raise MalformedEquation(f"{token} but the problem has {len(numbers)} number(s)")
            return numbers[index]
        try:
            return float(token)
        except ValueError:
            raise MalformedEquation(f"unknown token {token!r}") from None

    if not tokens:
        raise MalformedEquation("empty equation")
    value = operand()
    if position != len(tokens):
        raise MalformedEquation(f"{len(tokens) - position} token(s) left over")
    return value


def answer_check(value: float, answer_text: str) -> str:
    """How the ``Answer`` column relates to the equation's value: "exact" (within 1e-4), "rounded"
    (the value rounded to the answer's decimals) or "differs"."""
    answer = float(answer_text)
    if abs(value - answer) <= VALUE_TOLERANCE:
        return "exact"
    decimals = len(answer_text.split(".")[1]) if "." in answer_text else 0
    return "rounded" if math.isclose(round(value, decimals), answer, abs_tol=1e-12) else "differs"


@dataclass(frozen=True)
class Problem:
    question: str  # with number slots
    numbers: tuple[float, ...]
    equation: tuple[str, ...]  # prefix tokens
    value: float  # the equation's value: what predictions are scored against
    answer_check: str  # "exact", "rounded" or "differs" (see answer_check)
    source: str  # "FILE:ROW", the row as a spreadsheet numbers it (the header is row 1)


def read_problems(path: str | Path) -> list[Problem]:
    """Every row of one CSV file, checked (see the module's docstring); ConfigError names the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"math word problems: {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: no column {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})")
        problems = [_problem(row, f"{path}:{i}") for i, row in enumerate(reader, start=2)]
    if not problems:
        raise ConfigError(f"{path} has no problems")
    return problems


def _problem(row: dict, where: str) -> Problem:
    empty = [c for c in REQUIRED_COLUMNS if not (row.get(c) or "").strip()]
    if empty:
        raise ConfigError(f"{where}: empty {', '.join(empty)}")
    try:
        numbers = tuple(float(v) for v in row["Numbers"].split())
    except ValueError:
        raise ConfigError(f"{where}: Numbers must be space-separated numbers, got {row['Numbers']!r}") from None
    answer_text = row["Answer"].strip()
    try:
        float(answer_text)
    except ValueError:
        raise ConfigError(f"{where}: Answer must be a number, got {answer_text!r}") from None
    equation = tuple(row["Equation"].split())
    try:
        value = evaluate_prefix(equation, numbers)
    except MalformedEquation as e:
        raise ConfigError(f"{where}: malformed Equation {row['Equation']!r}: {e}") from None
    return Problem(row["Question"].strip(), numbers, equation, value, answer_check(value, answer_text), where)


def answer_report(problems: list[Problem]) -> Counter:
    """How many rows' answers are exact, rounded, or differ from their equation's value."""
    return Counter(p.answer_check for p in problems)


def is_correct(predicted: list[str] | tuple[str, ...], problem: Problem) -> bool:
    """Value accuracy: the predicted equation evaluates, with the problem's numbers, to within 1e-4
    of the gold equation's value. A malformed prediction is wrong."""
    try:
        return abs(evaluate_prefix(predicted, problem.numbers) - problem.value) <= VALUE_TOLERANCE
    except MalformedEquation:
        return False
