"""Data in the command line's tables is printed as it is (``actors.runtime.textui``)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.errors import MarkupError
from rich.table import Table
from rich.text import Text

from actors.kim.cli import _slip_table
from actors.runtime.textui import data_row

TRICKY = "Anhang 'AU[/b].p7s' [eAU] :smile:"


def _render(table: Table) -> str:
    c = Console(file=io.StringIO(), width=200, color_system=None)
    c.print(table)
    return c.file.getvalue()


def test_markup_in_data_is_printed_literally():
    t = Table("name", "detail")
    data_row(t, "[one_for_one]", TRICKY)
    out = _render(t)
    assert "[one_for_one]" in out and TRICKY in out


def test_a_plain_add_row_would_have_crashed_on_it():
    """What the helper is for: the same cell through rich's markup."""
    t = Table("detail")
    t.add_row(TRICKY)
    with pytest.raises(MarkupError):
        _render(t)


def test_styles_and_renderables_pass_through():
    t = Table("a", "b", "c")
    data_row(t, Text("ok", style="green"), None, "x", style="red")
    assert "ok" in _render(t)


def test_a_slip_whose_reason_carries_brackets_is_listed():
    """Regression: ``automat mails parked`` crashed on a mail whose reason
    quoted an attachment name with ``[/...]`` in it."""
    rows = [{"mail_id": "m" * 32, "mailbox": "eau-01", "procedure": "eAU_Lieferung", "status": "parked",
             "step": "check_attachment_name", "attempt": 1, "outcome": "error", "error_code": "attachment_name",
             "updated_at": 1764000000.0, "reason": f"attachment name {TRICKY!r} does not match"}]
    out = _render(_slip_table(rows, "slips", reason=True))
    assert "[/b].p7s" in out and "parked" in out
