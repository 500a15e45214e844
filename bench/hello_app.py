"""The baseline server of B4: a minimal Flask app, served by gunicorn the way the agent is
(one gthread worker, 4 threads, TLS), answering only ``/healthz``."""

from flask import Flask

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
