"""The lab's one error tree.

LabError                 anything the lab could not do
 +-- LabUnavailable      this host cannot run a lab at all (not root, no loop devices,
 |                       a tool missing): tests may skip on it outside CI
 +-- CommandError        a command exited non-zero or timed out; carries its output
 +-- TeardownError       ``down`` finished but left something behind; carries the report
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.teardown import TeardownReport


class LabError(Exception):
    """Base of every error the lab raises."""


class LabUnavailable(LabError):
    """The host lacks something a lab needs; ``problems`` says what."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class CommandError(LabError):
    """A command failed. The message holds the command and the tail of its stderr."""

    def __init__(
        self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str, note: str = ""
    ) -> None:
        self.cmd = tuple(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip())[-2000:]
        what = note or f"exit {returncode}"
        super().__init__(f"{' '.join(self.cmd)}: {what}: {tail}")


class TeardownError(LabError):
    """``down`` could not remove everything; ``report`` lists what it did and what is left."""

    def __init__(self, report: TeardownReport) -> None:
        self.report = report
        super().__init__("teardown left things behind: " + "; ".join(report.errors))
