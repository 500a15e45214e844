"""The buffering worker's own liveness answer (agent/http/worker.py): which requests it
takes, and that its answer is the app's."""

from __future__ import annotations

from pathlib import Path

from agent.http.worker import HEALTHZ_BODY, healthz_page, is_plain_healthz
from tests.agent.http.apphelpers import build


def test_only_a_whole_plain_get_healthz_is_taken() -> None:
    assert is_plain_healthz(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert is_plain_healthz(b"GET /healthz HTTP/1.0\r\n\r\n")
    for other in (
        b"GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",  # a query: the app's
        b"GET /healthzz HTTP/1.1\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\n\r\n",
        b"HEAD /healthz HTTP/1.1\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",  # a body
        b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\nGET /v1/host HTTP/1.1\r\n\r\n",  # pipelined
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n",  # not whole
        b"get /healthz HTTP/1.1\r\n\r\n",
    ):
        assert not is_plain_healthz(other), other


def test_the_loops_answer_is_the_apps(tmp_path: Path) -> None:
    app_answer = build(tmp_path).client.get("/healthz")
    assert app_answer.data == HEALTHZ_BODY
    page = healthz_page()
    head, _, body = page.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Content-Type"].decode() == app_answer.headers["Content-Type"]
    assert int(headers[b"Content-Length"]) == len(body) == len(app_answer.data)
    assert headers[b"Connection"] == b"close"
    assert body == app_answer.data
