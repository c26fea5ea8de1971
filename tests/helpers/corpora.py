"""Local data for tests, so that every test runs in a bare clone (nothing downloaded, no ../shared).

- Text: a slice of the running interpreter's standard-library source (present on every machine,
  as for the trainer's default corpus), written to a file at test time; modules are separated
  by blank lines, so a single-file corpus splits into paragraphs.
- Labelled sentences: ``tests/data/sentiment/{train,dev}.tsv`` (256 and 72 rows, SST-2's
  format), made by ``tests/data/make_sentiment.py``.
"""

from __future__ import annotations

from pathlib import Path

from smoe_ds.data import stdlib_files

SENTIMENT = Path(__file__).resolve().parents[1] / "data" / "sentiment"


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of the standard library's sources, in sorted file order."""
    parts, total = [], 0
    for f in stdlib_files()[1]:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 2
        if total >= chars:
            break
    return "\n\n".join(parts)[:chars]


def write_stdlib_text(path: Path, chars: int) -> Path:
    path.write_text(stdlib_text(chars), encoding="utf-8")
    return path
