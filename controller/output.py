"""What the CLI shows: sizes and ages in words, tables, JSON, and job progress (rich bars
on a terminal, one plain line per change otherwise, e.g. in a CronJob's log)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from shared.models import Job


def make_console(*, stderr: bool = False) -> Console:
    """A console; when it is not a terminal (a log, a pipe), wide enough that tables
    are not folded into unreadable columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=max(console.width, 200))
    return console


def yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", expand=False)
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    return t


def print_json(console: Console, data: Any) -> None:
    """JSON on stdout, with no markup or wrapping (rich would wrap long lines)."""
    if console.is_terminal:
        text = json.dumps(data, indent=2, sort_keys=False, default=str)
    else:  # compact: the C encoder, for pipes and big fleets
        text = json.dumps(data, separators=(",", ":"), sort_keys=False, default=str)
    console.file.write(text + "\n")


class JobProgress:
    """Progress of the jobs of several agents at once; ``for_agent(name)`` gives the
    callback ``AgentClient.wait_job`` calls on each poll. Safe to call from workers."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._lock = threading.Lock()
        self._rich: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last: dict[str, tuple[str, int, int]] = {}

    @contextmanager
    def shown(self) -> Iterator[JobProgress]:
        if self._console.is_terminal:
            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[state]}"),
                console=self._console,
                transient=False,
            )
            with self._rich:
                yield self
            self._rich = None
        else:
            yield self

    def for_agent(self, agent: str) -> Callable[[Job], None]:
        def update(job: Job) -> None:
            self.update(agent, job)

        return update

    def update(self, agent: str, job: Job) -> None:
        done, total = job.progress.done, job.progress.total
        with self._lock:
            if self._last.get(agent) == (job.state, done, total):
                return
            self._last[agent] = (job.state, done, total)
            if self._rich is not None:
                if agent not in self._tasks:
                    self._tasks[agent] = self._rich.add_task(agent, total=total, state=job.state)
                self._rich.update(self._tasks[agent], completed=done, total=total, state=job.state)
            else:
                self._console.print(
                    f"{agent}: job {job.id} {job.state} {done}/{total}",
                    markup=False,
                    highlight=False,
                )


def agent_error(console: Console, agent: str, message: str) -> None:
    """``agent: message`` on the error console (the message is shown as is, not as markup)."""
    console.print(f"[bold red]{escape(agent)}[/]: {escape(message)}", highlight=False)
