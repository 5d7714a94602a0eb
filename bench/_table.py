"""The ending every bench script shares: print its Markdown table and keep it under bench/results/."""

from __future__ import annotations

from qavtp.io import atomic_write_text


def emit_table(lines: list[str], out: str) -> None:
    """Print the table's ``lines`` and write them to ``out`` (written whole or not at all)."""
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(out, table)
