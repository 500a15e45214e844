"""The findings' encoded answers are kept for one scan, and only a few of them."""

from __future__ import annotations

from pathlib import Path

from agent.http.context import EXTENSION, AnswerCache, HttpContext
from tests.agent.http.test_app import build
from tests.fakes import make_leak_scenario


def test_answers_of_an_older_scan_go_when_a_newer_one_is_put() -> None:
    cache = AnswerCache()
    a, b = ["a"], ["b"]
    cache.put("x", a, b"A", epoch=1)
    cache.put("y", a, b"A2", epoch=1)
    assert cache.get("x", a) == b"A" and len(cache) == 2
    cache.put("x", b, b"B", epoch=2)
    assert cache.get("y", a) is None and cache.get("x", b) == b"B" and len(cache) == 1


def test_many_questions_keep_few_answers(tmp_path: Path) -> None:
    a = build(tmp_path, make_leak_scenario())
    for age in range(40):
        r = a.get(f"/v1/findings?min_age_seconds={age}")
        assert r.status_code == 200
    ctx: HttpContext = a.client.application.extensions[EXTENSION]
    assert 1 <= len(ctx.answers) <= AnswerCache.MAX
