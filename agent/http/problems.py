"""RFC 9457 problem details: the one place their bodies are built, with the one table of
stable codes for HTTP statuses that no ``AgentError`` names.

``agent.http.api`` renders every error the app meets with ``problem_body``;
``agent.http.gunicorn`` renders what gunicorn answers itself (a request line or headers
over their limits, a malformed or too slow request) with the same function, so both
carry the same ``type``, ``title``, ``status``, ``detail`` and ``code`` members.
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from typing import Any

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://nas-janitor.dev/problems/"

# The code of a problem that only has a status (an ``AgentError`` carries its own).
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "validation_failed",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
    503: "unavailable",
}


def status_code(status: int) -> str:
    """The stable code of a bare status."""
    return STATUS_CODES.get(status, "bad_request" if status < 500 else "internal")


def status_title(status: int, fallback: str = "Error") -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return fallback


def problem_body(
    status: int,
    code: str | None = None,
    detail: str | None = None,
    *,
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object of a problem: ``code`` defaults to the status's, ``title`` to the
    status's phrase, ``detail`` to the title. ``extra`` adds members (RFC 9457 3.2)."""
    code = code or status_code(status)
    title = title or status_title(status)
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail or title,
        "code": code,
    }
    if extra:
        body.update(extra)
    return body
