"""Markdown tables for reports and CLIs (torch-free, usable by every layer)."""

from __future__ import annotations


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub-style table, each column padded to its widest cell; `body` may be empty."""
    widths = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)])
