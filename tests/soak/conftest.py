"""Print every soak report's table at the end of the pytest run (also when its test passed)."""

from __future__ import annotations

from typing import Any

from tests.soak.report import SoakReport

REPORTS: list[SoakReport] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in REPORTS:
        terminalreporter.write_sep("=", f"Pollen soak ({report.mode})")
        terminalreporter.write_line(report.table())
