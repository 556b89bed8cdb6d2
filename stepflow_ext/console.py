"""What the commands, and the libraries they drive (eval/, demo.py), print and raise.

The bottom of the command-line stack: the standard library only (rich, when installed, for tables).
`stepflow_ext.cli` and the libraries below it all import from here, so none of them has to import
another for these.
"""
from __future__ import annotations

import codecs
import sys


class UsageError(Exception):
    """A problem with the command as a whole (exit status 2)."""


def err(*parts) -> None:
    """A message for the user, on stderr (stdout carries the results)."""
    print(*parts, file=sys.stderr, flush=True)


def escapes(text: str) -> str:
    """Options such as --step-delimiter '\\n\\n' take backslash escapes."""
    return codecs.decode(text, "unicode_escape")


def print_table(title, header, rows) -> None:
    """A table on stdout: rich's when installed (cells starting with YES in bold red), else plain columns."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich comes with transformers
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        print(title)
        for r in [header] + rows:
            print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        table.add_row(*[f"[bold red]{x}[/]" if str(x).startswith("YES") else str(x) for x in r])
    Console(width=max(100, min(200, 20 + 11 * len(header)))).print(table)


def span(layers) -> str:
    """Layer indices as text: 0-3 for a run, 0,2,5 otherwise, (none) for none."""
    layers = sorted(layers)
    if not layers:
        return "(none)"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))
