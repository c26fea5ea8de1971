"""The experiment's corpus: the first ``max_bytes`` of any local text, written to one file.

The claims the paper makes are about over-parameterised models, so the CPU scale trains on a
small slice of the corpus and passes over it many times. The slice is the beginning of the
text cut at a paragraph break (a blank line) or, failing that, a line break, so that the
trainer's paragraph-level train/validation split sees whole paragraphs.
"""

from __future__ import annotations

from pathlib import Path

from smoe_ds.data import folder_files, stdlib_files


def source_files(data: str | None) -> list[Path]:
    """The files ``data`` names, in a fixed order: one file, a folder's text files, or (None) the
    embedded default corpus (the Python standard library's source)."""
    if data is None:
        return stdlib_files()[1]
    path = Path(data)
    if path.is_file():
        return [path]
    if path.is_dir():
        return folder_files(path)
    raise SystemExit(f"smoe-ds: error: --max-bytes needs local text; {data!r} is not a file or folder")


def cut_at_break(text: str, limit: int) -> str:
    """The longest prefix of ``text`` of at most ``limit`` characters that ends at a paragraph
    break, else at a line break in its second half, else ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for sep in ("\n\n", "\n"):
        at = head.rfind(sep)
        if at >= limit // 2:
            return head[: at + len(sep)]
    return head


def write_slice(data: str | None, max_bytes: int, out_file: Path) -> tuple[Path, int, int]:
    """Write the first ``max_bytes`` bytes of ``data`` (at a break) to ``out_file``.

    Returns (out_file, bytes written, bytes available). Folders are read file after file,
    separated by a blank line, until the limit is reached.
    """
    parts, size, available = [], 0, 0
    for f in source_files(data):
        text = f.read_bytes().decode("utf-8", errors="replace")
        available += len(text.encode())
        if size < max_bytes:
            part = cut_at_break(text, max_bytes - size)
            parts.append(part)
            size += len(part.encode())
    text = "\n\n".join(parts)
    # Multi-byte characters can make the bytes exceed the character count's limit: trim at a break.
    while len(text.encode()) > max_bytes:
        text = cut_at_break(text, len(text) - (len(text.encode()) - max_bytes) - 1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text, encoding="utf-8")
    return out_file, len(text.encode()), available
