"""The fleet file: which agents the controller drives, how, and with what policy.

    # fleet.yaml
    concurrency: 4              # agents talked to at the same time (default 4)
    retries: 2                  # retries of safe requests (GETs, apply) (default 2)
    timeouts:                   # seconds
      connect: 5                # TCP + TLS connect (default 5)
      request: 30               # one request, its whole answer included (default 30)
      job: 3600                 # waiting for one agent's job to finish (default 3600)
      agent: 4500               # all a command does with one agent (default job + 900)
      poll: 2                   # between two looks at a running job (default 2)
      freed: 300                # after a job, waiting for the kernel to free what it
                                # deleted (0: do not wait; default 300)
      notify: 10                # one notification, whole (default 10)
    limits:
      answer_bytes: 16777216    # the largest answer read from an agent (default 16 MiB)
      audit_entries: 10000      # audit entries pulled per agent per command (default 10000)
    store: controller.db        # SQLite file (default: see default_store_path)
    policy:                     # the body of POST /v1/plans; defaults are the API's
      kinds: [dind-volume, orphan-layer]
      min_age_seconds: 86400
      protect_labels: [keep, nas-janitor.keep]
    agents:
      - name: nas1              # unique; letters, digits, ".", "_", "-"
        url: https://nas1.lan:8443
        token_file: tokens/nas1 # or token_env: NAS1_TOKEN (exactly one of the two)
        ca: ca.pem              # https only: trust only this CA (default: the system's)
        client_cert: ctl.pem    # https only: mutual TLS
        client_key: ctl.key     # when the key is not in client_cert
        labels: {site: home}    # free-form; select agents with --label site=home
    notify:                     # after `run`: the summary to each of these
      - url: https://ntfy.sh/my-nas-janitor
        format: ntfy            # json (default) or ntfy
        on: failure             # always (default) or failure

Relative paths (token_file, ca, client_cert, client_key, store) are relative to the
fleet file's folder. Every error names the bad field's path (``agents[1].url``) and
is a ``ConfigError`` (the CLI's exit code 2). Tokens and TLS files are read when the
clients are made (``Fleet.client``), before any agent is called; token files and client
keys are refused when others may change them or anyone may read them
(``shared.secretfile``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from controller.client import (
    DEFAULT_MAX_ANSWER_BYTES,
    AgentClient,
    token_from_env,
    token_from_file,
)
from controller.errors import ConfigError
from shared.models import Policy
from shared.secretfile import SecretFileRefused, check_secret_file

# libyaml's safe loader when PyYAML was built with it: several times faster on big fleets
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ENV_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
FLEET_ENV = "NAS_JANITOR_FLEET"
AGENT_TIME_OVER_JOB = 900.0  # timeouts.agent's default: the job's time plus this
NOTIFY_FORMATS = ("json", "ntfy")
NOTIFY_ON = ("always", "failure")


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    request: float = 30.0
    job: float = 3600.0
    agent: float = 3600.0 + AGENT_TIME_OVER_JOB
    poll: float = 2.0
    notify: float = 10.0
    freed: float = 300.0


@dataclass(frozen=True)
class Limits:
    answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    audit_entries: int = 10_000


@dataclass(frozen=True)
class NotifyTarget:
    """Where ``run`` sends its summary, in which format, and when."""

    url: str
    format: str = "json"
    on: str = "always"

    @property
    def shown(self) -> str:
        """The URL without its path and query, which often carry a secret (a webhook's
        key, an ntfy topic): what reports show."""
        url = httpx.URL(self.url)
        port = f":{url.port}" if url.port else ""
        return f"{url.scheme}://{url.host}{port}/…"


@dataclass(frozen=True)
class AgentSpec:
    name: str
    url: str
    token_file: Path | None = None
    token_env: str | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def token(self, environ: Mapping[str, str] | None = None) -> str:
        where = f"agent {self.name}"
        try:
            if self.token_file is not None:
                return token_from_file(self.token_file)
            assert self.token_env is not None  # the schema asks for exactly one
            return token_from_env(self.token_env, environ)
        except ConfigError as exc:
            raise ConfigError(exc.message, where=f"{where}: {exc.where}") from exc


@dataclass(frozen=True)
class Fleet:
    agents: tuple[AgentSpec, ...]
    policy: Policy = field(default_factory=Policy)
    concurrency: int = 4
    retries: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    notify: tuple[NotifyTarget, ...] = ()
    store: Path | None = None
    source: Path | None = None

    def select(
        self, names: Iterable[str] = (), labels: Iterable[str] = ()
    ) -> tuple[AgentSpec, ...]:
        """The agents named (all when none), then only those carrying every
        ``key=value`` label. An unknown name or a malformed label is a ConfigError."""
        names = list(names)
        by_name = {a.name: a for a in self.agents}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"no such agent in the fleet: {', '.join(unknown)}", where="--agent")
        chosen = [by_name[n] for n in dict.fromkeys(names)] if names else list(self.agents)
        for label in labels:
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected key=value, got {label!r}", where="--label")
            chosen = [a for a in chosen if a.labels.get(key) == value]
        return tuple(chosen)

    def client(
        self,
        agent: AgentSpec,
        *,
        environ: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AgentClient:
        """A client for one agent, with its token and TLS files read now."""
        key = agent.client_key or agent.client_cert  # without client_key, the cert holds it
        if key is not None:
            try:
                check_secret_file(key)
            except SecretFileRefused as exc:
                raise ConfigError(
                    f"client key refused: {exc.strerror}", where=f"agent {agent.name}: {key}"
                ) from exc
            except OSError:
                pass  # not readable: loading the TLS files says so
        return AgentClient(
            agent.url,
            name=agent.name,
            token=agent.token(environ),
            ca=agent.ca,
            client_cert=agent.client_cert,
            client_key=agent.client_key,
            timeout=self.timeouts.request,
            connect_timeout=self.timeouts.connect,
            retries=self.retries,
            max_answer_bytes=self.limits.answer_bytes,
            transport=transport,
            sleep=sleep,
        )


def default_store_path(
    environ: Mapping[str, str] | None = None, *, euid: int | None = None
) -> Path:
    """``/var/lib/nas-janitor/controller.db`` for root (a CronJob, a system timer),
    else ``$XDG_STATE_HOME/nas-janitor/controller.db`` (``~/.local/state`` by default)."""
    env = os.environ if environ is None else environ
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/nas-janitor/controller.db")
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/state")
    return Path(state) / "nas-janitor" / "controller.db"


# -- schema ------------------------------------------------------------------------------


class _Strict(Schema):
    class Meta:
        unknown = RAISE


def _positive(what: str) -> validate.Range:
    return validate.Range(min=0, min_inclusive=False, error=f"{what} must be > 0")


class _TimeoutsSchema(_Strict):
    connect = fields.Float(load_default=Timeouts.connect, validate=_positive("connect"))
    request = fields.Float(load_default=Timeouts.request, validate=_positive("request"))
    job = fields.Float(load_default=Timeouts.job, validate=_positive("job"))
    agent = fields.Float(validate=_positive("agent"))  # default: job + AGENT_TIME_OVER_JOB
    poll = fields.Float(load_default=Timeouts.poll, validate=_positive("poll"))
    notify = fields.Float(load_default=Timeouts.notify, validate=_positive("notify"))
    freed = fields.Float(
        load_default=Timeouts.freed,
        validate=validate.Range(min=0, error="freed must be >= 0"),
    )


class _LimitsSchema(_Strict):
    answer_bytes = fields.Integer(
        load_default=Limits.answer_bytes,
        strict=True,
        validate=validate.Range(min=4096, max=1 << 30, error="from 4096 to 1 GiB"),
    )
    audit_entries = fields.Integer(
        load_default=Limits.audit_entries,
        strict=True,
        validate=validate.Range(min=1, max=10_000_000),
    )


def _http_url(value: str) -> str | None:
    """What is wrong with an agent's or a webhook's URL (None: nothing)."""
    try:
        parsed = httpx.URL(value)
    except httpx.InvalidURL as exc:
        return f"not a URL: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "must be http://host[:port] or https://host[:port]"
    return None


class _NotifySchema(_Strict):
    url = fields.String(required=True)
    format = fields.String(load_default="json", validate=validate.OneOf(NOTIFY_FORMATS))
    on = fields.String(load_default="always", validate=validate.OneOf(NOTIFY_ON))

    @validates_schema
    def _check(self, data: dict[str, Any], **_: Any) -> None:
        problem = _http_url(data.get("url", "http://x"))
        if problem:
            raise ValidationError({"url": [problem]})


class _AgentSchema(_Strict):
    name = fields.String(
        required=True,
        validate=validate.Regexp(NAME_RE, error="letters, digits, '.', '_', '-' (1-63)"),
    )
    url = fields.String(required=True)
    token_file = fields.String(validate=validate.Length(min=1))
    token_env = fields.String(validate=validate.Regexp(ENV_RE, error="not a variable name"))
    ca = fields.String(validate=validate.Length(min=1))
    client_cert = fields.String(validate=validate.Length(min=1))
    client_key = fields.String(validate=validate.Length(min=1))
    labels = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)

    @validates_schema
    def _check(self, data: dict[str, Any], **_: Any) -> None:
        errors: dict[str, str] = {}
        url = data.get("url")
        https = False
        if url is not None:
            problem = _http_url(url)
            if problem:
                errors["url"] = problem
            else:
                parsed = httpx.URL(url)
                https = parsed.scheme == "https"
                if parsed.query or parsed.fragment:
                    errors["url"] = "must not carry a query or fragment"
        if ("token_file" in data) == ("token_env" in data):
            errors["token_file"] = "give exactly one of token_file and token_env"  # noqa: S105
        for key in ("ca", "client_cert"):
            if key in data and url is not None and not https and "url" not in errors:
                errors[key] = "only for an https url"
        if "client_key" in data and "client_cert" not in data:
            errors["client_key"] = "needs client_cert"
        if errors:
            raise ValidationError(errors)


class _FleetSchema(_Strict):
    agents = fields.List(
        fields.Nested(_AgentSchema),
        required=True,
        validate=validate.Length(min=1, error="name at least one agent"),
    )
    policy = fields.Raw(allow_none=True)  # validated by Policy.parse
    concurrency = fields.Integer(
        load_default=4, strict=True, validate=validate.Range(min=1, max=256)
    )
    retries = fields.Integer(load_default=2, strict=True, validate=validate.Range(min=0, max=10))
    timeouts = fields.Nested(_TimeoutsSchema, load_default=lambda: _TimeoutsSchema().load({}))
    limits = fields.Nested(_LimitsSchema, load_default=lambda: _LimitsSchema().load({}))
    notify = fields.List(fields.Nested(_NotifySchema), load_default=list)
    store = fields.String(validate=validate.Length(min=1))

    @validates_schema
    def _unique_names(self, data: dict[str, Any], **_: Any) -> None:
        seen: set[str] = set()
        for i, agent in enumerate(data.get("agents", [])):
            if agent["name"] in seen:
                raise ValidationError({"agents": {i: {"name": [f"duplicate {agent['name']!r}"]}}})
            seen.add(agent["name"])


# -- loading ---------------------------------------------------------------------------


def load_fleet(path: str | os.PathLike[str]) -> Fleet:
    """Read and validate a fleet file (``ConfigError`` on any problem)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read fleet file: {exc.strerror or exc}", where=str(source)
        ) from exc
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=str(source)) from exc
    return parse_fleet(data, base=source.parent, source=source)


def parse_fleet(data: Any, *, base: Path, source: Path | None = None) -> Fleet:
    """Validate fleet data already parsed from YAML; relative paths are under ``base``."""
    where = str(source) if source is not None else "fleet"
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping with at least an 'agents' list", where=where)
    errors: dict[str, Any] = {}
    data = {**data, "notify": _yaml11_on(data.get("notify"))}
    if data["notify"] is None:
        del data["notify"]
    try:
        loaded = _FleetSchema().load(data)
    except ValidationError as exc:
        errors.update(exc.messages_dict)
    try:
        policy = Policy.parse(data.get("policy") or {})
    except ValidationError as exc:
        errors["policy"] = exc.messages
    if errors:
        raise ConfigError(_describe(errors), where=where)

    def rel(value: str | None) -> Path | None:
        return None if value is None else base / Path(value).expanduser()

    agents = tuple(
        AgentSpec(
            name=a["name"],
            url=a["url"].rstrip("/"),
            token_file=rel(a.get("token_file")),
            token_env=a.get("token_env"),
            ca=rel(a.get("ca")),
            client_cert=rel(a.get("client_cert")),
            client_key=rel(a.get("client_key")),
            labels=dict(a["labels"]),
        )
        for a in loaded["agents"]
    )
    times = dict(loaded["timeouts"])
    times.setdefault("agent", times["job"] + AGENT_TIME_OVER_JOB)
    return Fleet(
        agents=agents,
        policy=policy,
        concurrency=loaded["concurrency"],
        retries=loaded["retries"],
        timeouts=Timeouts(**times),
        limits=Limits(**loaded["limits"]),
        notify=tuple(NotifyTarget(**n) for n in loaded["notify"]),
        store=rel(loaded.get("store")),
        source=source,
    )


def _yaml11_on(entries: Any) -> Any:
    """YAML 1.1 (PyYAML) reads an unquoted ``on:`` key as the boolean true: in the
    ``notify`` entries, that key is ``on``."""
    if not isinstance(entries, list):
        return entries
    return [
        {("on" if k is True else k): v for k, v in e.items()}
        if isinstance(e, Mapping) and True in e and "on" not in e
        else e
        for e in entries
    ]


def _describe(messages: Any, prefix: str = "") -> str:
    """Marshmallow's nested messages as ``agents[1].url: message`` lines."""
    if isinstance(messages, Mapping):
        parts = []
        for key, value in messages.items():
            if isinstance(key, int):
                sub = f"{prefix}[{key}]"
            elif key == "_schema":
                sub = prefix
            else:
                sub = f"{prefix}.{key}" if prefix else str(key)
            parts.append(_describe(value, sub))
        return "; ".join(p for p in parts if p)
    if isinstance(messages, list | tuple):
        return "; ".join(_describe(m, prefix) for m in messages)
    return f"{prefix}: {messages}" if prefix else str(messages)
