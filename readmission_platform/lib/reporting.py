"""Small renderings of frames for asset metadata and check messages."""

from __future__ import annotations

import re

import polars as pl


def markdown_table(frame: pl.DataFrame, limit: int = 20) -> str:
    """A markdown table of the first `limit` rows."""
    head = frame.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * head.width]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in head.iter_rows()]
    if frame.height > limit:
        lines.append(f"\n… {frame.height - limit} more rows")
    return "\n".join(lines)


def examples(values, limit: int = 5) -> str:
    """'a, b, c … (+12 more)'."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" … (+{len(values) - limit} more)" if len(values) > limit else "")


def masked(url: str) -> str:
    """A URL fit to print: any password replaced."""
    return re.sub(r"//[^@/]*@", "//***@", url)
