"""gunicorn's own error answers as RFC 9457 problems.

gunicorn answers some requests before the app sees them: a request line or headers
over its limits (414, 431), a malformed request (400), and so on. Its answer is an
HTML page; the agent's contract says every error is ``application/problem+json``.
``use_problem_pages`` (gunicorn's ``post_worker_init`` hook, so only in the worker
process) makes gunicorn write those answers as problems, with the same ``type``,
``title``, ``status``, ``detail`` and ``code`` members as the app's.
"""

from __future__ import annotations

import http
import json
from typing import Any

_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
}


def problem_page(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer (the connection is closed after it)."""
    code = _CODES.get(status, "bad_request" if status < 500 else "internal")
    try:
        title = http.HTTPStatus(status).phrase
    except ValueError:
        title = reason
    body = json.dumps(
        {
            "type": f"https://nas-janitor.dev/problems/{code}",
            "title": title,
            "status": status,
            # gunicorn's message says which limit or what was malformed; it never holds
            # a stack trace (500 comes with an empty one)
            "detail": (message or title)[:300],
            "code": code,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def use_problem_pages(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook."""
    from gunicorn import util

    def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, problem_page(int(status_int), str(reason), str(mesg)))

    util.write_error = write_error
