"""nas-janitor controller: drives many agents (scan, plan, apply, audit) for a fleet."""

__version__ = "0.3.0"
