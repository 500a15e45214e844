"""The agent's Flask app factory (gunicorn runs ``agent.app:create_app()``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from flask import Flask

from agent import __version__
from agent.clean.cleaner import Cleaner
from agent.config import AgentConfig, load_config
from agent.domain.inventory import Clock, JanitorService, utcnow
from agent.errors import Unavailable
from agent.host.backend import Btrfs, Docker
from agent.http.api import Api, require_json_bodies
from agent.http.auth import TokenRegistry
from agent.http.metrics import Metrics
from agent.store.audit import AuditLog
from agent.store.continuity import check_continuity
from agent.store.state import StateStore

log = logging.getLogger("nas_janitor.agent")


@dataclass(frozen=True)
class Backends:
    btrfs: Btrfs
    docker: Docker


@dataclass
class AgentContext:
    """What the views reach through ``current_app.extensions["nas_janitor"]``."""

    config: AgentConfig
    service: JanitorService
    tokens: TokenRegistry
    metrics: Metrics
    extra: dict[str, Any]


# Docker: a few seconds for a read or a ping (a healthy daemon answers in well under
# one); a volume removal may delete many files first. A daemon that let a request time
# out is not asked again for DOCKER_HUNG_COOLDOWN seconds: calls fail at once (503).
DOCKER_TIMEOUT = 5.0
DOCKER_REMOVE_TIMEOUT = 120.0
DOCKER_HUNG_COOLDOWN = 10.0


def real_backends(config: AgentConfig) -> Backends:
    from agent.host.btrfs import BtrfsTool
    from agent.host.dockerd import DockerClient

    return Backends(
        btrfs=BtrfsTool(binary=config.btrfs_binary),
        docker=DockerClient(
            base_url=config.docker_host,
            timeout=DOCKER_TIMEOUT,
            remove_timeout=DOCKER_REMOVE_TIMEOUT,
            hung_cooldown=DOCKER_HUNG_COOLDOWN,
        ),
    )


def create_app(
    config: AgentConfig | None = None,
    *,
    backend: Backends | None = None,
    clock: Clock = utcnow,
) -> Flask:
    config = config or load_config()
    backend = backend or real_backends(config)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)

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

    service = JanitorService(config, btrfs=backend.btrfs, docker=backend.docker, clock=clock)
    metrics = Metrics()
    metrics.init_app(app)
    metrics.watch_findings(lambda: service.findings())
    audit = AuditLog(os.path.join(config.state_dir, "audit.db"))
    state = StateStore(os.path.join(config.state_dir, "state.db"))
    broken = check_continuity(audit, state)
    if broken is not None:
        log.error("audit log refused, no mutation until it is back: %s", broken)
    cleaner = Cleaner(service, audit=audit, state=state, on_action=metrics.count_action)
    try:
        cleaner.recover()
    except Unavailable as exc:
        # jobs a crash cut short are marked interrupted (the state store); their audit
        # entries cannot be written now: /readyz and every mutation say why
        log.error("start-up recovery could not be audited: %s: %s", exc.code, exc.detail)
    ctx = AgentContext(
        config=config,
        service=service,
        tokens=TokenRegistry(config.tokens),
        metrics=metrics,
        extra={"audit": audit, "state": state, "cleaner": cleaner},
    )
    app.extensions["nas_janitor"] = ctx

    from agent.http.views import audit as audit_views
    from agent.http.views import clean, health, inventory
    from agent.http.views import metrics as metrics_views

    api.register_blueprint(health.blp)
    api.register_blueprint(inventory.blp)
    api.register_blueprint(clean.blp)
    api.register_blueprint(audit_views.blp)
    api.register_blueprint(metrics_views.blp)
    return app
