import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from graftcore.cli import main  # noqa: E402


@pytest.fixture
def cli(capsys):
    """Run `graftcore ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A test file that cannot be imported runs none of its tests: say so last, in capitals, with the cause's last
    line, so a collection error (an import shadowed by a folder of ours, a missing dependency) cannot be read as
    a few errors beside many passes."""
    broken = [r for r in terminalreporter.stats.get("error", []) if isinstance(r, pytest.CollectReport) and r.failed]
    if broken:
        terminalreporter.section("COLLECTION FAILED", sep="!", red=True, bold=True)
        for report in broken:
            cause = str(report.longrepr).strip().splitlines()[-1] if report.longrepr else "?"
            terminalreporter.write_line(f"NOT RUN: {report.nodeid}: {cause}", red=True, bold=True)
