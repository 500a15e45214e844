"""The agent's Flask app factory (gunicorn runs ``agent.app:create_app()``)."""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask

from agent import __version__
from agent.config import AgentConfig, load_config
from agent.domain.inventory import Clock, utcnow
from agent.errors import AgentError
from agent.http.api import Api, require_json_bodies
from agent.http.auth import TokenRegistry
from agent.http.context import EXTENSION, HttpContext
from agent.http.metrics import Metrics
from agent.runtime import Backends, build_runtime
from agent.store.continuity import check_continuity

log = logging.getLogger("nas_janitor.agent")


def create_app(
    config: AgentConfig | None = None,
    *,
    backend: Backends | None = None,
    clock: Clock = utcnow,
) -> Flask:
    config = config or load_config()

    app = Flask("nas_janitor.agent")
    # No 308 from "/v1/volumes//x" to "/v1/volumes/x": a redirect keeps the method, and
    # an empty path segment must not end up naming another target.
    app.url_map.merge_slashes = False
    app.config.update(
        API_TITLE="nas-janitor agent",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        JSON_SORT_KEYS=False,
        MAX_CONTENT_LENGTH=1 << 20,
        PROPAGATE_EXCEPTIONS=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.before_request(require_json_bodies)
    api = Api(
        app,
        spec_kwargs={
            "info": {
                "description": "Finds and safely removes btrfs subvolumes that Docker "
                "leaks on NAS boxes. Contract: agent API version 1."
            }
        },
    )
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "description": "agent token"}
    )

    metrics = Metrics()
    metrics.init_app(app)
    rt = build_runtime(
        config,
        backends=backend,
        clock=clock,
        on_action=metrics.count_action,
        on_job_end=metrics.count_job,
    )
    # what the scrape shows of each finding; from the kept scan, never waiting for one
    metrics.watch_findings(
        lambda: [
            {
                "kind": f.kind,
                "reclaimable_bytes": f.reclaimable_bytes,
                "fs_uuid": f.fs_uuid,
                "qgroups": len(f.qgroup_ids),
            }
            for f in rt.inventory.kept_findings()
        ]
    )
    metrics.watch_pending(rt.pending.bytes_by_filesystem)
    broken = check_continuity(rt.audit, rt.state)
    if broken is not None:
        log.error("audit log refused, no mutation until it is back: %s", broken)
    try:  # the chain's state for /metrics from the start; a broken log still starts
        metrics.verify_audit(rt.audit)
    except Exception:
        log.exception("the audit log could not be verified at start-up")
    app.extensions[EXTENSION] = HttpContext(
        runtime=rt, tokens=TokenRegistry(config.tokens), metrics=metrics
    )

    from agent.http.views import audit as audit_views
    from agent.http.views import clean, docs, health, inventory
    from agent.http.views import metrics as metrics_views

    api.register_blueprint(health.blp)
    api.register_blueprint(inventory.blp)
    api.register_blueprint(clean.blp)
    api.register_blueprint(audit_views.blp)
    api.register_blueprint(metrics_views.blp)
    app.register_blueprint(docs.blp)  # not an API operation: outside the OpenAPI document
    return app


START_WATCH_SECONDS = 5.0


def scan_at_start(app: Flask) -> threading.Thread:
    """The kept scan made (``Inventory.prime``) in a thread of its own as soon as the
    serving worker has its app: the first read, the first ``/metrics`` scrape and the
    first delete then find it, the filesystems and Docker's info known, instead of
    paying for them (with cold caches: btrfs-progs and runc read from disk). A scan that
    fails is logged; the next read tries again."""
    inventory = app.extensions[EXTENSION].runtime.inventory

    def scan() -> None:
        started = time.monotonic()
        try:
            found = inventory.prime(START_WATCH_SECONDS)
        except AgentError as exc:
            log.warning("start-up scan failed: %s: %s", exc.code, exc.detail)
            return
        log.info("start-up scan: %d finding(s) in %.2f s", len(found), time.monotonic() - started)

    thread = threading.Thread(target=scan, name="start-up-scan", daemon=True)
    thread.start()
    return thread
