"""gunicorn's master for ``janitor-agent serve``: the process the command becomes.

``janitor-agent serve`` reads and checks the config, prints its warnings, and then
replaces itself (``os.execv``: the same process id) with ``python -m agent.http.master``,
handing over the gunicorn settings and the checked config as JSON in the environment
variable ``HANDOVER`` names (``handover``), which the master removes from its own
environment at once: the programs the worker runs never get it (the process's first
environment, ``/proc/PID/environ``, readable by its own user only, still shows it).

This module imports only what gunicorn's arbiter and the worker class need, not click,
PyYAML or the config's code: the worker is forked from this process, so whatever the
master holds is resident in both. The worker makes its config from the handed-over
JSON (``config_from_json``): every worker gunicorn starts serves the config ``serve``
checked, as before, whatever happened to the file since.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, fields, is_dataclass
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

from gunicorn.app.base import BaseApplication

from agent.http.worker import buffering_worker

if TYPE_CHECKING:
    from agent.config import AgentConfig

HANDOVER = "JANITOR_AGENT_SERVE"


def handover(config: AgentConfig, options: dict[str, Any]) -> str:
    """What ``serve`` hands over (the value of ``HANDOVER``): the checked config and
    gunicorn's settings (plain JSON values)."""
    return json.dumps({"config": config_to_json(config), "options": options})


def config_to_json(config: AgentConfig) -> dict[str, Any]:
    """The config as JSON values (sets as sorted lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, frozenset | set):
            return sorted(value)
        return value

    return {k: plain(v) for k, v in asdict(config).items()}


def config_from_json(data: dict[str, Any]) -> AgentConfig:
    """The config ``config_to_json`` gave, as it was (``==``)."""
    from agent.config import AgentConfig

    return _build(AgentConfig, data)  # type: ignore[no-any-return]


def _build(cls: Any, data: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    return cls(**{f.name: _value(hints[f.name], data[f.name]) for f in fields(cls)})


def _value(kind: Any, value: Any) -> Any:
    if is_dataclass(kind):
        return _build(kind, value)
    origin = get_origin(kind)
    if origin is tuple:
        (item, *_) = get_args(kind)
        return tuple(_value(item, v) for v in value)
    if origin is frozenset:
        return frozenset(value)
    return value


def problem_pages(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook: ``agent.http.gunicorn.use_problem_pages``,
    imported in the worker only."""
    from agent.http.gunicorn import use_problem_pages

    use_problem_pages(worker)


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn with the handed-over settings; its worker makes the app of the
    handed-over config."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings["options"].items():
            self.cfg.set(key, value)
        timeout = float(self.settings["config"]["gunicorn"]["request_timeout"])
        self.cfg.set("worker_class", buffering_worker(timeout))
        # what gunicorn answers itself (request line or headers too large, malformed
        # requests) is a problem+json too, not an HTML page
        self.cfg.set("post_worker_init", problem_pages)

    def load(self) -> Any:
        from agent.domain.keptscan import tune_collector
        from agent.http.app import create_app

        app = create_app(config_from_json(self.settings["config"]))
        tune_collector()  # in the worker, which serves: the app is made there
        return app


def main() -> int:
    text = os.environ.pop(HANDOVER, None)
    try:
        settings = json.loads(text) if text is not None else None
    except ValueError:
        settings = None
    if not (isinstance(settings, dict) and {"config", "options"} <= settings.keys()):
        print("agent.http.master is started by `janitor-agent serve`", file=sys.stderr)
        return 2
    # This process is gunicorn's master; it and its worker are the agent, whose own open
    # files never count as a use of a target.
    from agent.host import holders

    holders.serving(os.getpid())
    Server(settings).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
