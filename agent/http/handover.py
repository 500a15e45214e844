"""What ``janitor-agent serve`` hands to the gunicorn master it becomes
(``agent.http.master``): the checked config and gunicorn's settings, as JSON, in the
environment variable ``HANDOVER``. Plain JSON and dataclasses only: the command makes
it before it replaces itself, the worker reads it back."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

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


__all__ = ["HANDOVER", "config_from_json", "config_to_json", "handover"]
