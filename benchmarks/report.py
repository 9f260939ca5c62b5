"""What the benchmark scripts share for their markdown results: a table, and writing the report."""

from __future__ import annotations

from pathlib import Path


def table(headers: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines (cells already formatted as text).

    >>> table(["a", "b"], [["1", "2"]])
    ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers), *(f"| {' | '.join(r)} |" for r in rows)]


def write_report(path: Path, lines: list[str]) -> None:
    """Write the report's lines to ``path`` (creating its folder) and print them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
