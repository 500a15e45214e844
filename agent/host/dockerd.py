"""The real ``agent.host.backend.Docker``: the Docker Engine API through the Docker SDK.

Only this module touches the SDK. Its errors are converted once, in ``_boundary``:

    requests ConnectionError / Timeout, DockerException  -> DockerUnavailable
    docker.errors.NotFound                               -> NotFound
    APIError 409 on a volume removal                     -> InUse (``extra["in_use_by"]``)
    any other APIError                                   -> ToolFailed (the daemon's message)

The SDK client is made on first use, not in the constructor: the agent must start (and
answer ``/readyz`` with ``docker_unavailable``) while the daemon is down, and the SDK asks
the daemon for its API version as soon as a client is made. A failed attempt is not
remembered; the next call tries again.

Every list is one request: ``GET /volumes`` and ``GET /containers/json?all=1`` (whose
answer already carries each container's ``Mounts``), never one request per object.

``layer_refs`` reads Docker's layer metadata from the local file system, not the API:
the Engine API does not say which btrfs subvolume belongs to which layer.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.errors import DockerUnavailable, InUse, NotFound, ToolFailed
from agent.host.boltdb import BoltError, BoltFile
from agent.host.records import (
    ContainerMount,
    ContainerRecord,
    DockerEvent,
    DockerInfo,
    LayerRefs,
    StoredVolume,
    VolumeRecord,
    VolumeStores,
)


def _without_charset_guessing() -> None:
    """``requests`` (the SDK's HTTP client) imports a character-set detector when it is
    first imported (``charset_normalizer``, about 2-3 MB resident: its tables and
    compiled modules), only to guess the encoding of a body whose ``Content-Type`` names
    none (``Response.apparent_encoding``). Without a detector it takes UTF-8, as it
    documents there, which is what dockerd writes. Every answer the SDK reads names its
    encoding anyway: ``application/json`` is UTF-8 to ``requests``, and dockerd's plain
    text says ``charset=utf-8``. So the detector is not imported: an entry of None in
    ``sys.modules`` makes its import fail (``ModuleNotFoundError``), which ``requests``
    handles, and its warning about the missing detector is not shown. Nothing else of
    the agent imports either detector; a process that imported ``requests`` before this
    module keeps what it has."""
    if "requests" in sys.modules:
        return
    for name in ("charset_normalizer", "chardet"):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unable to find acceptable character detection")
        import requests  # noqa: F401


_without_charset_guessing()

import docker  # noqa: E402
import docker.errors  # noqa: E402
import requests.exceptions  # noqa: E402

ANONYMOUS_LABEL = "com.docker.volume.anonymous"  # set by Docker 23 and later
_ANONYMOUS_NAME = re.compile(r"[0-9a-f]{64}")  # how Docker 20.10 names anonymous volumes
_RUNNING_STATES = frozenset({"running", "paused", "restarting"})
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})"
)
_CONTAINER_IDS = re.compile(r"\[([0-9a-f ,]*)\]")
# The events that change what the agent lists: a container's existence, name, state
# and mounts; a volume's existence and use; an image's layers; the daemon's settings.
# (Not exec_*, health_status, attach...: a health check runs every few seconds.)
EVENT_FILTERS = {
    "type": ["container", "image", "volume", "daemon"],
    "event": [
        "create", "destroy", "start", "die", "stop", "kill", "rename", "update",
        "mount", "unmount", "pull", "import", "load", "delete", "untag", "tag", "reload",
        "prune", "remove",
    ],
}  # fmt: skip


# for the second of two requests asked side by side
_ASIDE = ThreadPoolExecutor(max_workers=2, thread_name_prefix="docker")


class DockerClient:
    """``agent.host.backend.Docker`` over the Docker SDK, talking to ``base_url``
    (``unix:///var/run/docker.sock``, ``tcp://host:2375``) with ``timeout`` seconds
    for each request, ``remove_timeout`` for a volume removal (Docker deletes the
    volume's remaining files before it answers).

    A daemon that lets a request time out is taken as hung for ``hung_cooldown``
    seconds: every call meanwhile is ``DockerUnavailable`` at once instead of waiting
    its own timeout, so a few requests cannot hold every thread of the agent."""

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float,
        remove_timeout: float | None = None,
        hung_cooldown: float = 0.0,
        proc_root: str = "/proc",
    ) -> None:
        self.base_url = base_url
        self._proc_root = proc_root
        self.timeout = timeout
        self.remove_timeout = remove_timeout if remove_timeout is not None else timeout
        self.hung_cooldown = hung_cooldown
        self._client: Any = None  # docker.DockerClient, made by _api()
        self._remover: Any = None  # the same with remove_timeout
        self._lock = threading.Lock()
        self._hung_until = 0.0

    def __repr__(self) -> str:
        return f"DockerClient(base_url={self.base_url!r}, timeout={self.timeout!r})"

    def ping(self) -> None:
        api = self._api()
        with self._boundary("ping"):
            answered = api.ping()
        if answered is not True:
            raise DockerUnavailable(f"Docker at {self.base_url} did not answer OK to a ping")

    def daemon_identity(self) -> str | None:
        """Which daemon process answers at ``base_url`` right now: ``"PID:START"``,
        its pid and start time (``/proc/PID/stat``: never the same for two processes
        while the host is up). Told only for a ``unix://`` socket whose listener is a
        process named ``dockerd`` (``SO_PEERCRED`` of a new connection: the process
        that listens); None when it cannot be told: a ``tcp://`` daemon, a socket made
        by systemd (``fd://``) or a proxy, a pid this process cannot see or read.

        A daemon's data root, storage driver and versions change only when it
        restarts, and a restarted daemon is another process: ``agent.domain.snapshot``
        keeps ``info`` for as long as this stays the same."""
        if not self.base_url.startswith("unix://"):
            return None
        path = self.base_url.removeprefix("unix://")
        size = struct.calcsize("3i")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(min(self.timeout, 1.0))
                conn.connect(path)
                pid = struct.unpack(
                    "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
                )[0]
            if pid <= 0:
                return None  # a listener in a pid namespace this process cannot see
            exe = os.readlink(f"{self._proc_root}/{pid}/exe").removesuffix(" (deleted)")
            with open(f"{self._proc_root}/{pid}/stat", "rb") as f:
                line = f.read()
        except OSError:
            return None
        if os.path.basename(exe) != "dockerd":
            return None
        fields = line[line.rindex(b")") + 2 :].split()
        if len(fields) < 20 or not fields[19].isdigit():
            return None
        return f"{pid}:{fields[19].decode()}"  # field 22: start time since boot, in ticks

    def info(self) -> DockerInfo:
        """The daemon's versions, storage driver and data root: ``GET /info``, and the
        API version from the ``Api-Version`` header of ``GET /_ping`` (Engine API 1.25
        and later), asked side by side. ``GET /version`` answers the API version too,
        but the daemon runs ``runc --version`` and ``docker-init --version`` for it
        each time (about 6 ms of its CPU); it is asked only of a daemon whose ping
        names no API version."""
        api = self._api()
        with self._boundary("info"):
            asked = _ASIDE.submit(self._api_version, api)  # two requests, side by side
            info = api.info()
            api_version = asked.result()
        return DockerInfo(
            server_version=_text(info, "ServerVersion", "info"),
            api_version=api_version,
            storage_driver=_text(info, "Driver", "info"),
            data_root=_text(info, "DockerRootDir", "info"),
        )

    def _api_version(self, api: Any) -> str:
        answer = api.get(f"{api.base_url}/_ping", timeout=self.timeout)
        named = answer.headers.get("Api-Version")
        if answer.status_code == 200 and isinstance(named, str) and named:
            return named
        return _text(api.version(), "ApiVersion", "version")

    def volumes(self) -> list[VolumeRecord]:
        api = self._api()
        with self._boundary("list volumes"):
            answer = api.volumes()
        return [volume_record(item) for item in (answer or {}).get("Volumes") or []]

    def containers(self) -> list[ContainerRecord]:
        api = self._api()
        with self._boundary("list containers"):
            answer = api.containers(all=True)
        return [container_record(item) for item in answer or []]

    def layer_refs(self, data_root: str) -> LayerRefs:
        return read_layer_refs(data_root)

    def volume_stores(self, data_root: str) -> VolumeStores:
        return read_volume_stores(data_root)

    def remove_volume(self, name: str) -> None:
        api = self._api(remover=True)
        with self._boundary(f"remove volume {name}", conflict_is_in_use=True):
            api.remove_volume(name)

    def events(self) -> _Events:
        """Docker's event stream (``EVENT_FILTERS``) on a connection of its own, without
        a read timeout: it is quiet while nothing happens."""
        self._check_hung()
        with self._boundary("connect for events"):
            api = docker.APIClient(base_url=self.base_url, version="auto", timeout=self.timeout)
        try:
            with self._boundary("events"):
                stream = api.events(decode=True, filters=EVENT_FILTERS)
        except BaseException:
            api.close()
            raise
        return _Events(self, api, stream)

    def close(self) -> None:
        with self._lock:
            clients = (self._client, self._remover)
            self._client = self._remover = None
        for client in clients:
            if client is not None:
                client.close()

    def _api(self, *, remover: bool = False) -> Any:
        """The SDK's low-level ``APIClient``, made on first use (``remover``: the one
        with ``remove_timeout``).

        For a ``unix://`` daemon the socket must still be there: the SDK keeps idle
        connections open, and one made before the socket went away would otherwise go
        on answering for a daemon no new connection can reach."""
        if self.base_url.startswith("unix://"):
            path = self.base_url.removeprefix("unix://")
            try:
                os.stat(path)
            except OSError as exc:
                raise DockerUnavailable(
                    f"Docker at {self.base_url} is unreachable: {exc.strerror or exc}"
                ) from exc
        self._check_hung()
        with self._lock:
            self._check_hung()  # another thread may have waited out a timeout meanwhile
            if self._client is None:
                with self._boundary("connect"):
                    self._client = docker.DockerClient(base_url=self.base_url, timeout=self.timeout)
            if not remover:
                return self._client.api
            if self._remover is None:
                with self._boundary("connect"):
                    # the API version the first client learnt: no second GET /version
                    # (the daemon runs runc and docker-init for it)
                    self._remover = docker.DockerClient(
                        base_url=self.base_url,
                        timeout=self.remove_timeout,
                        version=self._client.api.api_version,
                    )
            return self._remover.api

    def _check_hung(self) -> None:
        left = self._hung_until - time.monotonic()
        if left > 0:
            raise DockerUnavailable(
                f"Docker at {self.base_url} did not answer within {self.timeout:g} s; "
                f"asking again in {left:.0f} s"
            )

    @contextmanager
    def _boundary(self, action: str, *, conflict_is_in_use: bool = False) -> Iterator[None]:
        """The one place where SDK and transport errors become agent errors."""
        try:
            yield
        except docker.errors.NotFound as exc:
            raise NotFound(_explanation(exc)) from exc
        except docker.errors.APIError as exc:
            message = _explanation(exc)
            if exc.status_code == 409 and conflict_is_in_use:
                match = _CONTAINER_IDS.search(message)
                users = [c.strip() for c in match.group(1).split(",")] if match else []
                raise InUse(message, extra={"in_use_by": [c for c in users if c]}) from exc
            raise ToolFailed(
                f"docker {action}: {message}", extra={"docker_status": exc.status_code}
            ) from exc
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            if _timed_out(exc) and self.hung_cooldown > 0:
                self._hung_until = time.monotonic() + self.hung_cooldown
            raise DockerUnavailable(
                f"Docker at {self.base_url} is unreachable ({action}): {exc}"
            ) from exc


class _Events:
    """``agent.host.backend.EventStream`` over the SDK's cancellable stream."""

    def __init__(self, owner: DockerClient, api: Any, stream: Any) -> None:
        self._owner, self._api, self._stream = owner, api, stream

    def __iter__(self) -> Iterator[DockerEvent]:
        try:
            with self._owner._boundary("events"):
                for item in self._stream:
                    if isinstance(item, dict):
                        yield event_record(item)
        finally:
            self.close()

    def close(self) -> None:
        with suppress(Exception):  # closing what may be gone already
            self._stream.close()
        self._api.close()


def event_record(item: Mapping[str, Any]) -> DockerEvent:
    """One entry of ``GET /events`` as a ``DockerEvent``."""
    actor = item.get("Actor") or {}
    nano = item.get("timeNano")
    return DockerEvent(
        type=str(item.get("Type") or ""),
        action=str(item.get("Action") or item.get("status") or ""),
        actor=str(actor.get("ID") or item.get("id") or ""),
        time_nano=nano if isinstance(nano, int) else 0,
    )


def _timed_out(exc: BaseException) -> bool:
    """A request that waited its whole timeout (the daemon took the connection and did
    not answer), as the SDK reports it (requests' Timeout, or a DockerException raised
    from one while the client was made)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, requests.exceptions.Timeout | TimeoutError):
            return True
        if "timed out" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def volume_record(item: Mapping[str, Any]) -> VolumeRecord:
    """One entry of ``GET /volumes`` as a ``VolumeRecord``."""
    name = str(item["Name"])
    labels = {str(k): str(v) for k, v in (item.get("Labels") or {}).items()}
    return VolumeRecord(
        name=name,
        driver=str(item.get("Driver") or ""),
        mountpoint=str(item.get("Mountpoint") or ""),
        labels=labels,
        created_at=parse_timestamp(item.get("CreatedAt")),
        anonymous=is_anonymous(name, labels),
    )


def is_anonymous(name: str, labels: Mapping[str, str]) -> bool:
    """Docker 23+ labels anonymous volumes; Docker 20.10 only names them with 64 hex
    digits, so that is the test when the label is absent."""
    if ANONYMOUS_LABEL in labels:
        return True
    return _ANONYMOUS_NAME.fullmatch(name) is not None


def container_record(item: Mapping[str, Any]) -> ContainerRecord:
    """One entry of ``GET /containers/json?all=1`` as a ``ContainerRecord``."""
    if "Mounts" not in item:
        # Without Mounts we cannot tell which volumes the container uses; saying "none"
        # would make its volumes look dangling.
        raise ToolFailed(f"Docker listed container {item.get('Id')} without its Mounts")
    names = item.get("Names") or []
    state = item.get("State")
    status = str(item.get("Status") or "")
    running = state in _RUNNING_STATES if state else status.startswith("Up")
    mounts = tuple(
        ContainerMount(
            type=str(m.get("Type")),
            source=str(m.get("Source") or ""),
            destination=str(m.get("Destination") or ""),
            name=str(m["Name"]) if m.get("Name") else None,
            rw=bool(m.get("RW", True)),
        )
        for m in item.get("Mounts") or []
        if m.get("Type") in ("volume", "bind")
    )
    return ContainerRecord(
        id=str(item["Id"]),
        name=str(names[0]).lstrip("/") if names else "",
        running=running,
        status=status,
        image_id=str(item.get("ImageID") or ""),
        volume_names=tuple(m.name for m in mounts if m.type == "volume" and m.name),
        mounts=mounts,
    )


def parse_timestamp(value: object) -> datetime | None:
    """An RFC 3339 time as Docker writes it (``2026-11-28T00:30:49Z``,
    ``2024-05-01T10:20:30.123456789+02:00``) as an aware UTC datetime; None when
    absent, unparsable, or Go's zero time. Digits past microseconds are dropped."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset in ("Z", "z"):
        tz = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    try:
        when = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None
    if when.year == 1:  # Go's zero time: "unknown"
        return None
    return when.astimezone(UTC)


def read_layer_refs(data_root: str) -> LayerRefs:
    """The subvolume names Docker's own layer store references, read from the local
    directory ``data_root``:

    - ``image/btrfs/layerdb/sha256/<chain id>/cache-id``: each image layer's subvolume;
    - ``image/btrfs/layerdb/mounts/<container id>/mount-id`` and ``init-id``: each
      container's layer and ``-init`` layer.

    A missing ``layerdb`` folder means no images or no containers: empty sets. A missing
    data root is an error (``DockerUnavailable``), never "nothing referenced": that
    answer would make every layer subvolume look orphaned.
    """
    root = Path(data_root)
    if not root.is_absolute() or not root.is_dir():
        raise DockerUnavailable(f"Docker's data root {data_root} is not a folder visible here")
    layerdb = root / "image" / "btrfs" / "layerdb"
    return LayerRefs(
        image_cache_ids=_read_ids(layerdb / "sha256", "cache-id"),
        container_mount_ids=_read_ids(layerdb / "mounts", "mount-id"),
        container_init_ids=_read_ids(layerdb / "mounts", "init-id"),
    )


STORE_MAX_BYTES = 64 * 1024 * 1024  # a volume store larger than this is not read
STORE_MAX_DEPTH = 3  # docker-in-docker in docker-in-docker in docker-in-docker
_STORED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # what Docker allows


def read_volume_stores(data_root: str, *, depth: int = STORE_MAX_DEPTH) -> VolumeStores:
    """The volumes recorded in ``<data_root>/volumes/metadata.db`` (Docker's volume
    store, a bolt file: bucket ``volumes``, each value ``{"Name", "Labels", ...}``), and
    in the stores of those volumes' own data (``volumes/<name>/_data``), ``depth``
    levels deep. No store there: nothing. A store that exists but cannot be read (not a
    regular file, over ``STORE_MAX_BYTES``, not a bolt file, a value that is not the
    JSON Docker writes), or one nested deeper than ``depth``: listed as unreadable,
    never as "no volumes". Read only; a FIFO or a device in its place is not opened for
    reading."""
    found: list[StoredVolume] = []
    unreadable: list[tuple[str, str]] = []
    pending = [(data_root, 0)]
    while pending:
        root, level = pending.pop()
        store = os.path.join(root, "volumes", "metadata.db")
        try:
            data = _read_store(store)
        except FileNotFoundError:
            continue
        except OSError as exc:
            unreadable.append((store, exc.strerror or type(exc).__name__))
            continue
        except ValueError as exc:
            unreadable.append((store, str(exc)))
            continue
        if level >= depth:
            unreadable.append((store, f"a volume store nested more than {depth} levels deep"))
            continue
        try:
            entries = BoltFile(data).bucket(b"volumes")
        except KeyError:
            continue  # a store with no volume ever created
        except BoltError as exc:
            unreadable.append((store, f"not a volume store this agent can read: {exc}"))
            continue
        for key, value in entries.items():
            try:
                name = key.decode("utf-8")
                meta = json.loads(value)
                labels = meta.get("Labels") or {}
                if not isinstance(labels, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
                ):
                    raise ValueError("labels that are not strings")
            except (UnicodeDecodeError, ValueError, AttributeError) as exc:
                unreadable.append((store, f"the record of volume {key!r}: {exc}"))
                continue
            found.append(StoredVolume(name=name, labels=dict(labels), store=store))
            if _STORED_NAME.fullmatch(name):
                pending.append((os.path.join(root, "volumes", name, "_data"), level + 1))
            else:
                unreadable.append((store, f"a volume named {name!r}, which Docker never makes"))
    return VolumeStores(volumes=tuple(found), unreadable=tuple(unreadable))


def _read_store(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > STORE_MAX_BYTES:
            raise ValueError(f"{st.st_size} bytes, over {STORE_MAX_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(st.st_size)
    finally:
        os.close(fd)


def _read_ids(folder: Path, filename: str) -> frozenset[str]:
    ids: set[str] = set()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise DockerUnavailable(f"cannot read Docker's layer records in {folder}: {exc}") from exc
    for entry in entries:
        try:
            text = (Path(entry.path) / filename).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a layer folder, or one Docker is creating or removing right now
        except (OSError, UnicodeDecodeError) as exc:
            raise DockerUnavailable(
                f"cannot read Docker's layer record {entry.path}/{filename}: {exc}"
            ) from exc
        if text:
            ids.add(text)
    return frozenset(ids)


def _text(payload: Mapping[str, Any] | None, key: str, what: str) -> str:
    value = (payload or {}).get(key)
    if not isinstance(value, str) or not value:
        raise ToolFailed(f"Docker's {what} answer has no {key}")
    return value


def _explanation(exc: docker.errors.APIError) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation) if explanation else str(exc)
