"""Prints how many generated inputs each fuzzed reader saw, and their outcomes."""

from fuzzing import OUTCOMES


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    tr = terminalreporter
    tr.section("fuzz: generated inputs per reader")
    for reader in sorted(OUTCOMES):
        c = OUTCOMES[reader]
        parts = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        tr.write_line(f"{reader}: {sum(c.values())} inputs ({parts})")
