"""Calling every agent at once, with a bound; a dead or slow agent stops no other."""

from __future__ import annotations

import threading
import time

import pytest

from controller.client import AgentClient
from controller.errors import AgentUnreachable, ControllerError, NotFound
from controller.fleetops import for_each
from tests.controller.conftest import client_for
from tests.controller.fake_agent import leaky_agent


def test_results_in_order_and_the_bound_is_kept() -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return i * i

    outcomes = for_each(list(range(12)), work, concurrency=3)
    assert [o.value for o in outcomes] == [i * i for i in range(12)]
    assert all(o.ok and o.error is None and o.message == "" for o in outcomes)
    assert most == 3


def test_a_failure_is_that_items_outcome_only() -> None:
    def work(i: int) -> int:
        if i == 1:
            raise NotFound("nas2", status=404, code="not_found", detail="gone")
        if i == 2:
            raise KeyError("a bug")
        return i

    outcomes = for_each([0, 1, 2, 3], work, concurrency=2)
    assert [o.ok for o in outcomes] == [True, False, False, True]
    assert outcomes[1].message == "404 not_found: gone"
    assert isinstance(outcomes[1].error, ControllerError)
    assert outcomes[2].message == "internal error: KeyError: 'a bug'"
    assert outcomes[3].value == 3


def test_bad_bound() -> None:
    with pytest.raises(ValueError):
        for_each([1], lambda i: i, concurrency=0)
    assert for_each([], lambda i: i, concurrency=1) == []


def test_a_dead_agent_and_a_slow_one_do_not_stop_the_others(closed_port: int) -> None:
    dead = AgentClient(
        f"http://127.0.0.1:{closed_port}", name="dead", token="t", retries=1, sleep=lambda s: None
    )
    slow_fake = leaky_agent("slow")
    slow_fake.delay = 0.4
    slow = client_for(slow_fake)
    quick = [client_for(leaky_agent(f"nas{i}")) for i in range(4)]
    start = time.monotonic()
    outcomes = for_each([dead, slow, *quick], lambda c: len(c.findings()), concurrency=2)
    took = time.monotonic() - start
    by_name = {o.item.name: o for o in outcomes}
    assert isinstance(by_name["dead"].error, AgentUnreachable)
    assert "Connection refused" in by_name["dead"].message or "refused" in by_name["dead"].message
    assert by_name["slow"].value == 4 and by_name["slow"].seconds >= 0.4
    assert all(by_name[f"nas{i}"].value == 4 for i in range(4))
    # the slow agent held one of the two slots; the other four went through the other
    assert took < 0.4 * 3
