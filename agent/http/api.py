"""The HTTP skeleton: flask-smorest's ``Api`` with RFC 9457 problems everywhere, and
the bearer-token guard every ``/v1`` view wears.

Every error a client can see goes through ``problem_response``: ``AgentError``s
raised by the domain, HTTP errors (404 of an unknown path, 405, webargs' 422), and
anything unexpected (a 500 problem with no stack trace; the trace goes to the log).
"""

from __future__ import annotations

import functools
import http
import json as stdjson
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Response, current_app, g, json, request
from flask_smorest import Api as SmorestApi
from flask_smorest import Blueprint
from flask_smorest.utils import prepare_response
from werkzeug.exceptions import HTTPException

from agent.errors import AgentError, Unauthorized, Unavailable
from agent.http.context import http as http_context
from agent.http.problems import PROBLEM_JSON, problem_body, status_code
from shared.schemas import ProblemSchema

log = logging.getLogger("nas_janitor.agent")
F = TypeVar("F", bound=Callable[..., Any])

_LOCATIONS = frozenset({"query", "json", "view_args", "headers"})


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = problem_body(status, code, detail, title=title, extra=extra)
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="nas-janitor"'
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


class Api(SmorestApi):  # type: ignore[misc]
    ERROR_SCHEMA = ProblemSchema

    def _register_responses(self) -> None:
        for status in http.HTTPStatus:
            response: dict[str, Any] = {"description": status.phrase}
            if not (100 <= status < 200) and status not in (204, 304):
                response["schema"] = self.ERROR_SCHEMA
            prepare_response(response, self.spec, PROBLEM_JSON)
            self.spec.components.response(status.name, response, lazy=True)
        response = {"description": "Default error response", "schema": self.ERROR_SCHEMA}
        prepare_response(response, self.spec, PROBLEM_JSON)
        self.spec.components.response("DEFAULT_ERROR", response, lazy=True)

    def _register_error_handlers(self) -> None:
        self._app.register_error_handler(HTTPException, self.handle_http_exception)
        self._app.register_error_handler(AgentError, handle_agent_error)
        self._app.register_error_handler(Exception, handle_unexpected)

    def handle_http_exception(self, error: HTTPException) -> Response:
        status = error.code or 500
        if status >= 500:
            log.error("internal error: %s", error, exc_info=error.__cause__ or error)
            return problem_response(500, "internal", "internal error; see the agent's log")
        data = getattr(error, "data", None) or {}
        extra: dict[str, Any] = {}
        errors = data.get("errors") or data.get("messages")
        detail = data.get("message") or error.description or http.HTTPStatus(status).phrase
        if errors:
            # webargs nests messages under the location ("query", "json"); flatten that.
            if isinstance(errors, dict) and set(errors) <= _LOCATIONS:
                flat: dict[str, Any] = {}
                for where, part in errors.items():
                    if isinstance(part, dict):
                        flat.update(part)
                    else:  # a message about the whole body, e.g. "Invalid JSON body."
                        flat[where] = part
                errors = flat
            extra["errors"] = errors
            detail = "the request did not validate: see errors"
        if status == 400 and request.mimetype != "application/json" and request.data:
            status = 415
            detail = "send JSON with Content-Type: application/json"
        # RFC 9110: a 405 names the methods the resource allows.
        allow = {k: v for k, v in error.get_headers() if k.lower() == "allow"}
        return problem_response(
            status,
            status_code(status),
            str(detail),
            extra=extra or None,
            headers=allow if status == 405 else None,
        )


def require_json_bodies() -> Response | None:
    """A request that carries a body must carry JSON (415 otherwise) that the agent can
    store: no lone UTF-16 surrogate escape in a string (``"\\ud800"`` parses in Python
    but cannot be encoded as UTF-8 for the state and audit databases) and no nesting
    deeper than the parser's recursion limit (400 for either)."""
    if request.method in ("POST", "PUT", "PATCH") and request.content_length:
        if request.mimetype != "application/json":
            return problem_response(
                415, "unsupported_media_type", "send JSON with Content-Type: application/json"
            )
        why = _unstorable_json(request.get_data(cache=True))
        if why is not None:
            return problem_response(400, "bad_request", why, extra={"errors": {"json": [why]}})
    return None


class _NumberTooLarge(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NumberTooLarge(f"a number in the JSON body is out of range: {text[:20]}...")
    return value


def _no_constant(text: str) -> Any:
    raise _NumberTooLarge(f"{text} is not JSON")


def _unstorable_json(data: bytes) -> str | None:
    """Why a JSON body parses but cannot be used, or None. A body that does not parse
    at all is left to the argument parser, which answers 400 with its own message.

    Numbers: an integer of more digits than Python converts (4,300: ``ValueError``
    inside the JSON parser, which the argument parser does not expect), a float that
    overflows to infinity, and the ``NaN`` / ``Infinity`` extensions are refused here;
    every integer field then has its own range in its schema."""
    try:
        value = stdjson.loads(
            data.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant
        )
    except _NumberTooLarge as exc:
        return str(exc)
    except stdjson.JSONDecodeError:
        return None
    except UnicodeDecodeError:
        return None
    except ValueError as exc:  # the int-from-string limit
        return f"a number in the JSON body is too large: {str(exc)[:80]}"
    except RecursionError:
        return "the JSON body is nested too deeply"
    try:
        stdjson.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "a string in the JSON body holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
    except RecursionError:
        return "the JSON body is nested too deeply"
    return None


def handle_agent_error(error: AgentError) -> Response:
    """An ``AgentError`` as its problem; a dependency that is down (``Unavailable``,
    503) adds ``Retry-After``."""
    if error.status >= 500 and error.status != 503:
        log.warning("%s: %s", error.code, error.detail)
    headers = None
    if isinstance(error, Unavailable):
        headers = {"Retry-After": str(error.retry_after)}
        log.warning("%s: %s", error.code, error.detail)
    return problem_response(
        error.status,
        error.code,
        error.detail,
        title=error.title,
        extra=error.extra or None,
        headers=headers,
    )


def handle_unexpected(error: Exception) -> Response:
    if isinstance(error, HTTPException):  # pragma: no cover - routed above
        return cast(Response, current_app.handle_http_exception(error))
    log.exception("unexpected error")
    return problem_response(500, "internal", "internal error; see the agent's log")


def needs(blp: Blueprint, scope: str) -> Callable[[F], F]:
    """Guard a view with a bearer token holding ``scope``; document 401/403. A
    ``clean`` view is also refused (503 ``audit_unavailable``) while the audit log is
    not the file the agent opened.

    Put it above ``@blp.arguments`` so the token is checked before the input."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = http_context()
            tokens = ctx.tokens
            principal = tokens.authenticate(request.headers.get("Authorization"))
            tokens.require(principal, scope)
            g.principal = principal
            if scope == "clean":
                # no mutation (and no dry run: it is audited too) without a sound audit log
                ctx.runtime.audit.check_file()
            return fn(*args, **kwargs)

        wrapped: Any = wrapper
        wrapped = blp.alt_response(401, response="UNAUTHORIZED")(wrapped)
        wrapped = blp.alt_response(403, response="FORBIDDEN")(wrapped)
        wrapped = blp.doc(security=[{"bearerAuth": []}])(wrapped)
        return cast(F, wrapped)

    return decorator


def actor() -> str:
    principal = g.get("principal")
    if principal is None:
        raise Unauthorized("no principal")
    return str(principal.id)
