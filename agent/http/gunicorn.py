"""gunicorn's own error answers as RFC 9457 problems.

gunicorn answers some requests before the app sees them: a request line or headers
over its limits (414, 431), a malformed request (400), and so on. Its answer is an
HTML page; the agent's contract says every error is ``application/problem+json``.
``use_problem_pages`` (gunicorn's ``post_worker_init`` hook, so only in the worker
process) makes gunicorn write those answers as problems, with the same ``type``,
``title``, ``status``, ``detail`` and ``code`` members as the app's.
"""

from __future__ import annotations

import json
from typing import Any

from agent.http.problems import PROBLEM_JSON, problem_body, status_title


def problem_page(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer (the connection is closed after it). gunicorn's
    message says which limit or what was malformed; it never holds a stack trace (500
    comes with an empty one)."""
    body = json.dumps(
        problem_body(status, detail=message[:300] or None, title=status_title(status, reason))
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def use_problem_pages(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook."""
    from gunicorn import util

    def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, problem_page(int(status_int), str(reason), str(mesg)))

    util.write_error = write_error
