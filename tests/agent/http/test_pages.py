"""The next page of a listing made ahead (``agent.http.pages``): the very page the
request would make, of the same snapshot and query only, once, bounded; and served, a
listing paged through reads what one page of it all gives, a change between two pages
included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.http.pages import Page, PagesAhead
from tests.agent.http.apphelpers import AgentUnderTest, build


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def made(body: bytes) -> Page:
    return body, None


def test_the_page_of_the_same_snapshot_and_key_once() -> None:
    ahead, snap = PagesAhead(), object()
    ahead.start(snap, ("fs", None, 2, 7), lambda: made(b"p2"))
    assert ahead.take(object(), ("fs", None, 2, 7)) is None  # another snapshot: not it
    ahead.start(snap, ("fs", None, 2, 7), lambda: made(b"p2"))
    assert ahead.take(snap, ("fs", None, 3, 7)) is None  # another query
    assert ahead.take(snap, ("fs", None, 2, 7)) == (b"p2", None)
    assert ahead.take(snap, ("fs", None, 2, 7)) is None  # taken once
    assert ahead.taken == 1


def test_a_failed_or_old_page_is_not_taken() -> None:
    clock = Clock()
    ahead, snap = PagesAhead(clock=clock), object()

    def fails() -> Page:
        raise RuntimeError("boom")

    ahead.start(snap, "k", fails)
    assert ahead.take(snap, "k") is None
    ahead.start(snap, "k", lambda: made(b"x"))
    clock.now += PagesAhead.MAX_AGE + 1
    assert ahead.take(snap, "k") is None
    assert ahead.taken == 0


def test_bounded() -> None:
    clock = Clock()
    ahead, snap = PagesAhead(clock=clock), object()
    for i in range(PagesAhead.MAX + 3):
        ahead.start(snap, i, lambda: made(b"x"))
    assert len(ahead) == PagesAhead.MAX
    assert ahead.take(snap, 0) is None  # the oldest went first
    clock.now += PagesAhead.MAX_AGE + 1
    ahead.start(snap, "new", lambda: made(b"y"))
    assert len(ahead) == 1  # the old ones went when a new one was started


def listing(a: AgentUnderTest, limit: int, **query: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    while True:
        url = f"/v1/filesystems/{a.sc.fs_uuid}/subvolumes?limit={limit}{extra}"
        body = a.get(url + (f"&cursor={cursor}" if cursor else "")).get_json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


@pytest.fixture
def agent(tmp_path: Path) -> AgentUnderTest:
    return build(tmp_path / "state")


def ahead_of(a: AgentUnderTest) -> PagesAhead:
    pages: PagesAhead = a.app.extensions["nas_janitor"].pages
    return pages


def test_paged_through_it_reads_what_one_page_gives(agent: AgentUnderTest) -> None:
    agent.get(f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?limit=2")
    assert len(ahead_of(agent)) == 0  # a first page alone makes nothing ahead
    whole = listing(agent, 5000)
    assert len(whole) == 1 and len(whole[0]) > 6
    pages = listing(agent, 2)
    assert [i for p in pages for i in p] == whole[0]
    # every page after the second came from what was made ahead (the first page alone
    # does not start it: many clients read only the first)
    assert len(pages) > 3
    assert ahead_of(agent).taken == len(pages) - 2
    assert len(ahead_of(agent)) == 0  # nothing left after the last page
    under = agent.sc.dind_mountpoint
    before = ahead_of(agent).taken
    inside = listing(agent, 1, under=under)
    assert len(inside) > 2
    assert ahead_of(agent).taken == before + len(inside) - 2  # the query's own pages
    assert [i for p in inside for i in p] == listing(agent, 5000, under=under)[0]


def test_a_page_after_a_change_is_not_the_one_made_before_it(agent: AgentUnderTest) -> None:
    first = listing(agent, 5000)[0]
    url = f"/v1/filesystems/{agent.sc.fs_uuid}/subvolumes?limit=2"
    page1 = agent.get(url).get_json()
    page2 = agent.get(url + f"&cursor={page1['next_cursor']}").get_json()
    assert len(ahead_of(agent)) == 1  # the third page is made ahead now
    gone = first[4]  # the third page's first subvolume
    (result,) = agent.sc.btrfs.delete([gone["path"]])
    assert result.ok, result
    agent.runtime.inventory.forget_kept()  # what a delete does: the listing starts over
    page3 = agent.get(url + f"&cursor={page2['next_cursor']}").get_json()
    assert gone["id"] not in {i["id"] for i in page3["items"]}
    assert page3["items"] == first[5:7]
