"""Rows of data in the command line's tables, printed as the data is.

rich reads every ``str`` cell as console markup: a ``[/b]`` in a patient's name of an HL7
feed, an attachment name or an exception text made the table raise ``MarkupError`` (the
command crashed), and a ``[one_for_one]`` vanished as an unknown tag. Cells that carry data
go through :func:`data_row` - plain text, with the row's style if one is given."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def plain(value: Any) -> Any:
    """A ``str`` as plain :class:`~rich.text.Text` (no markup, no emoji codes); other
    renderables (a ``Text`` with its own style) as they are; ``None`` as an empty cell."""
    if value is None:
        return Text("")
    if isinstance(value, str):
        return Text(value)
    return value


def data_row(table: Table, *cells: Any, **kw: Any) -> None:
    """``table.add_row`` with every cell taken literally (``style=`` etc. pass through)."""
    table.add_row(*(plain(c) for c in cells), **kw)
