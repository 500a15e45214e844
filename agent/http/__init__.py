"""The HTTP edge: the Flask app factory (``app``), problem+json and the token guard
(``api``), tokens (``auth``), Prometheus metrics (``metrics``), gunicorn's own pages
(``gunicorn``) and the thin views (``views``)."""
