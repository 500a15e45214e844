"""gunicorn's master for ``janitor-agent serve``: the process the command becomes.

``janitor-agent serve`` reads and checks the config, prints its warnings, and then
replaces itself (``os.execv``: the same process id) with
``python -m agent.http.master SETTINGS``, ``SETTINGS`` being the gunicorn settings and
the config file's path as one JSON argument (``handover``). This module imports only
what gunicorn's arbiter and the worker class need, not click, PyYAML or the config's
code: the worker is forked from this process, so whatever the master holds is resident
in both. The worker reads the config itself (the same file, the same environment) when
it makes the app.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from gunicorn.app.base import BaseApplication

from agent.http.worker import buffering_worker

# the settings that arrive as JSON and are turned into objects here
_WORKER_TIMEOUT = "request_timeout"
_CONFIG_PATH = "config_path"


def handover(config_path: str | None, options: dict[str, Any], request_timeout: float) -> str:
    """The one argument ``main`` takes: the config file's path as ``serve`` got it
    (None: ``$NAS_JANITOR_CONFIG`` or the default path, as for ``serve``), gunicorn's
    settings (plain JSON values) and the worker's request deadline in seconds."""
    return json.dumps(
        {_CONFIG_PATH: config_path, "options": options, _WORKER_TIMEOUT: request_timeout}
    )


def problem_pages(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook: ``agent.http.gunicorn.use_problem_pages``,
    imported in the worker only."""
    from agent.http.gunicorn import use_problem_pages

    use_problem_pages(worker)


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn with the handed-over settings; its worker makes the app from the
    config file."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings["options"].items():
            self.cfg.set(key, value)
        self.cfg.set("worker_class", buffering_worker(float(self.settings[_WORKER_TIMEOUT])))
        # what gunicorn answers itself (request line or headers too large, malformed
        # requests) is a problem+json too, not an HTML page
        self.cfg.set("post_worker_init", problem_pages)

    def load(self) -> Any:
        from agent.config import load_config
        from agent.domain.keptscan import tune_collector
        from agent.http.app import create_app

        app = create_app(load_config(self.settings[_CONFIG_PATH]))
        tune_collector()  # in the worker, which serves: the app is made there
        return app


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: janitor-agent serve [--config FILE]", file=sys.stderr)
        return 2
    try:
        settings = json.loads(args[0])
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        print("agent.http.master: SETTINGS must be the JSON that serve hands over", file=sys.stderr)
        return 2
    # This process is gunicorn's master; it and its worker are the agent, whose own open
    # files never count as a use of a target.
    from agent.host import holders

    holders.serving(os.getpid())
    Server(settings).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
