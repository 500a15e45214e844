"""``agent.collector.paused``: no cyclic collection while any thread is inside, the
collector as it was once the last one is out (also after an exception), never turned
on where it was off."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from agent import collector


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_paused_inside_and_on_again_after() -> None:
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # re-entrant
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_on_again_after_an_exception() -> None:
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_left_off_where_it_was_off() -> None:
    gc.disable()
    with collector.paused():
        pass
    assert not gc.isenabled()


def test_held_off_until_the_last_thread_is_out() -> None:
    first_in, second_in, first_out, second_may_leave = (threading.Event() for _ in range(4))
    seen: list[bool] = []

    def first() -> None:
        with collector.paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with collector.paused():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.isenabled())  # the first one has left: still held off
            second_may_leave.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_out.wait(5)
    second_in.wait(5)
    assert not gc.isenabled()
    second_may_leave.set()
    for t in threads:
        t.join(5)
    assert seen == [False]
    assert gc.isenabled()


def test_collections_run_again_once_the_pause_is_over() -> None:
    """However much is made inside, no collection runs there; made after it, the
    collector runs by itself again and frees the cycles made during the pause."""
    collected: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    class Node:
        def __init__(self) -> None:
            self.me = self

    threshold = gc.get_threshold()[0]
    gc.callbacks.append(note)
    try:
        with collector.paused():
            for _ in range(3 * threshold):
                Node()
            assert collected == []
        kept = [[i] for i in range(3 * threshold)]  # containers: they set one off
        assert collected, "no collection ran after the pause"
        del kept
        gc.collect()
        assert sum(collected) >= 3 * threshold
    finally:
        gc.callbacks.remove(note)
