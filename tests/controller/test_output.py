"""Sizes and ages in words; progress lines when not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from controller.output import JobProgress, table
from shared.humanize import bytes_exact, human_age, human_bytes
from shared.models import Job, load
from tests.shared.test_models import JOB


def test_sizes() -> None:
    assert human_bytes(None) == "?"
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_bytes(5 << 60) == "5120.0 PiB"
    assert bytes_exact(1610612736) == "1.5 GiB (1610612736)"
    assert bytes_exact(12) == "12 B"
    assert bytes_exact(None) == "?"


def test_ages() -> None:
    assert [human_age(s) for s in (None, 5, 60, 7200, 3 * 86400)] == ["?", "5s", "1m", "2h", "3d"]


def test_progress_prints_one_line_per_change_when_not_a_terminal() -> None:
    buf = io.StringIO()
    progress = JobProgress(Console(file=buf, force_terminal=False))
    running = load(Job, {**JOB, "state": "running", "progress": {"done": 1, "total": 2}})
    done = load(Job, JOB)
    with progress.shown():
        update = progress.for_agent("nas1")
        for job in (running, running, done):
            update(job)
    assert buf.getvalue().splitlines() == ["nas1: job j1 running 1/2", "nas1: job j1 partial 2/2"]


def test_table_cells_are_text_not_markup() -> None:
    buf = io.StringIO()
    Console(file=buf, width=120).print(table(None, ("A",), [("[bold]x[/bold]",)]))
    assert "[bold]x[/bold]" in buf.getvalue()


def test_progress_bars_on_a_terminal() -> None:
    buf = io.StringIO()
    progress = JobProgress(Console(file=buf, force_terminal=True, width=100))
    with progress.shown():
        progress.for_agent("nas1")(load(Job, JOB))
    text = buf.getvalue()
    assert "nas1" in text and "2/2" in text and "partial" in text
