"""Prints how many examples each parser was fed (and writes them as JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.unit.fuzz._fuzz import COUNTS, EXAMPLES, PROFILE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COUNTS:
        return
    tr = terminalreporter
    tr.section(f"fuzz: examples tried per parser (profile {PROFILE}, {EXAMPLES} per test)")
    for name, n in sorted(COUNTS.items()):
        tr.write_line(f"  {name:<44} {n:>9,}")
    tr.write_line(f"  {'total':<44} {sum(COUNTS.values()):>9,}")
    out = Path(os.environ.get("AUTOMAT_FUZZ_REPORT", Path(__file__).resolve().parents[3] / ".run" / "fuzz-counts.json"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"profile": PROFILE, "examples_per_test": EXAMPLES, "counts": dict(COUNTS)},
                                  indent=2, sort_keys=True))
    except OSError:
        pass
