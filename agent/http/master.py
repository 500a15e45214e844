"""gunicorn's master for ``janitor-agent serve``: the process the command becomes.

``janitor-agent serve`` reads and checks the config, prints its warnings, and then
replaces itself (``os.execve``: the same process id) with ``python -m agent.http.master``,
handing over the gunicorn settings and the checked config as JSON in an inherited
anonymous file (``agent.http.handover``), which the master reads and closes at once: the
config is in no process's environment, and the worker never holds the file.

This module imports only what gunicorn's arbiter and the worker class need, not click,
PyYAML or the config's code: the worker is forked from this process, so whatever the
master holds is resident in both. The worker makes its config from the handed-over
JSON (``agent.http.handover.config_from_json``): every worker gunicorn starts serves
the config ``serve`` checked, as before, whatever happened to the file since.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from agent.http.handover import HANDOVER, HandoverError, config_from_json, read_handover
from agent.http.worker import buffering_worker


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
        from agent.http.app import create_app, scan_at_start

        # the agent's own log lines (``nas_janitor.*``) go where gunicorn's go, from
        # info up: without a handler only warnings would reach stderr
        served = logging.getLogger("gunicorn.error")
        ours = logging.getLogger("nas_janitor")
        ours.handlers, ours.propagate = list(served.handlers), False
        ours.setLevel(logging.INFO)
        app = create_app(config_from_json(self.settings["config"]))
        tune_collector()  # in the worker, which serves: the app is made there
        scan_at_start(app)  # what the first requests would otherwise wait for
        return app


def main(text: str | None = None) -> int:
    """Serve what ``serve`` handed over: ``text``, else the file the descriptor in
    ``HANDOVER`` names (read and closed here, the variable dropped)."""
    named = os.environ.pop(HANDOVER, None)
    settings = None
    try:
        settings = json.loads(text if text is not None else read_handover(named))
    except (HandoverError, ValueError):
        pass
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
