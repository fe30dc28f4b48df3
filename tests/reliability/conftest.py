"""Print how many inputs each fuzz target received (``-m slow``: 1000 per target)."""


def pytest_terminal_summary(terminalreporter):
    from tests.reliability._fuzz import COUNTS

    if COUNTS:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(COUNTS.items()))
        terminalreporter.write_line(f"fuzz inputs per target (calls): {counts}")
