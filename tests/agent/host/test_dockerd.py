"""``agent.host.dockerd.DockerClient``.

The first part needs no daemon: payloads as dockerd 20.10 really sent them (captured from
a lab daemon), Docker's time format, its layer records in a folder, sockets where no
daemon answers. The second part (``lab``) runs against the real private dockerd of the
shared lab, on btrfs, with the leaked docker-in-docker volume it seeded.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DockerUnavailable, InUse, NotFound, ToolFailed
from agent.host.dockerd import (
    DockerClient,
    container_record,
    parse_timestamp,
    read_layer_refs,
    read_volume_stores,
    volume_record,
)

# --------------------------------------------------------------------------- payloads

# GET /v1.41/volumes and /containers/json?all=1 from dockerd 20.10.24 (NetworkSettings cut)
VOLUME_2010_ANONYMOUS = {
    "CreatedAt": "2026-11-28T00:30:49Z",
    "Driver": "local",
    "Labels": None,
    "Mountpoint": "/volume1/docker/volumes/"
    "ba01fb973bc96952281e6040b19e025ba7b80004626e54a0fa9789374db08bea/_data",
    "Name": "ba01fb973bc96952281e6040b19e025ba7b80004626e54a0fa9789374db08bea",
    "Options": None,
    "Scope": "local",
}
VOLUME_2010_LABELLED = {
    "CreatedAt": "2026-11-28T00:30:57Z",
    "Driver": "local",
    "Labels": {"keep": "true"},
    "Mountpoint": "/volume1/docker/volumes/keepme/_data",
    "Name": "keepme",
    "Options": None,
    "Scope": "local",
}
CONTAINER_2010_RUNNING = {
    "Id": "b8a22b880c6dbb73012e9d5329baf08b086869234a5f1c3be75693063019f386",
    "Names": ["/binder"],
    "Image": "bb",
    "ImageID": "sha256:dec7095ce4e094ee01fea4cd8b2e6c5cec2396e7b122da5199a6e1ad8de565f0",
    "Command": "sleep 100000",
    "Created": 1795826292,
    "Ports": [],
    "Labels": {},
    "State": "running",
    "Status": "Up Less than a second",
    "HostConfig": {"NetworkMode": "none"},
    "Mounts": [
        {
            "Type": "bind",
            "Source": "/tmp/dind",
            "Destination": "/x",
            "Mode": "",
            "RW": True,
            "Propagation": "rprivate",
        },
        {
            "Type": "volume",
            "Name": "used1",
            "Source": "/volume1/docker/volumes/used1/_data",
            "Destination": "/y",
            "Driver": "local",
            "Mode": "z",
            "RW": True,
            "Propagation": "",
        },
    ],
}
CREATED_VOLUME = "b95abadd0b4084bd38e9abf9bd0139cca7b37f1329bc0577bd65f40e04e502a4"
CONTAINER_2010_CREATED = {
    "Id": "6b432ac47cca2f3dd18b6351ab3fb54cd9c9d5f0b62c0c8e79cadbc475ca8b93",
    "Names": ["/created1"],
    "Image": "bb",
    "ImageID": "sha256:dec7095ce4e094ee01fea4cd8b2e6c5cec2396e7b122da5199a6e1ad8de565f0",
    "Command": "true",
    "Created": 1795825858,
    "Ports": [],
    "Labels": {},
    "State": "created",
    "Status": "Created",
    "HostConfig": {"NetworkMode": "default"},
    "Mounts": [
        {
            "Type": "volume",
            "Name": CREATED_VOLUME,
            "Source": "",
            "Destination": "/cdata",
            "Driver": "local",
            "Mode": "",
            "RW": True,
            "Propagation": "",
        }
    ],
}


def test_volume_of_docker_20_10() -> None:
    anon = volume_record(VOLUME_2010_ANONYMOUS)
    keep = volume_record(VOLUME_2010_LABELLED)

    assert anon.anonymous and anon.labels == {} and anon.driver == "local"
    assert anon.created_at == datetime(2026, 11, 28, 0, 30, 49, tzinfo=UTC)
    assert anon.mountpoint.endswith(f"/volumes/{anon.name}/_data")
    assert not keep.anonymous and keep.labels == {"keep": "true"}


def test_volume_anonymous_by_label_of_docker_23() -> None:
    labelled = {
        **VOLUME_2010_LABELLED,
        "Name": "not-hex",
        "Labels": {"com.docker.volume.anonymous": ""},
        "CreatedAt": "2024-05-01T10:20:30.123456789+02:00",
    }
    record = volume_record(labelled)
    assert record.anonymous
    assert record.created_at == datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    # 64 characters but not lowercase hex: a named volume
    assert not volume_record({**VOLUME_2010_LABELLED, "Name": "G" * 64}).anonymous
    assert not volume_record({**VOLUME_2010_LABELLED, "Name": "A" * 64}).anonymous


def test_containers_running_created_and_their_volume_users() -> None:
    running = container_record(CONTAINER_2010_RUNNING)
    created = container_record(CONTAINER_2010_CREATED)

    assert running.name == "binder" and running.running
    assert running.volume_names == ("used1",)  # the bind mount is not a volume
    assert running.image_id.startswith("sha256:")
    assert not created.running and created.status == "Created"
    assert created.volume_names == (CREATED_VOLUME,)
    paused = container_record({**CONTAINER_2010_RUNNING, "State": "paused"})
    assert paused.running


def test_a_container_listed_without_mounts_is_an_error_not_no_volumes() -> None:
    payload = {k: v for k, v in CONTAINER_2010_RUNNING.items() if k != "Mounts"}
    with pytest.raises(ToolFailed):
        container_record(payload)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T00:30:49Z", datetime(2026, 11, 28, 0, 30, 49, tzinfo=UTC)),
        (
            "2024-05-01T10:20:30.123456789+02:00",
            datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC),
        ),
        ("2024-05-01T10:20:30.5-01:30", datetime(2024, 5, 1, 11, 50, 30, 500000, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", None),  # Go's zero time
        ("", None),
        ("yesterday", None),
        ("2024-02-30T00:00:00Z", None),
        (None, None),
    ],
)
def test_timestamps(text: str | None, expected: datetime | None) -> None:
    got = parse_timestamp(text)
    assert got == expected
    if got is not None:
        assert got.tzinfo is UTC


def test_timestamps_keep_the_instant() -> None:
    got = parse_timestamp("2024-05-01T10:20:30+05:45")
    assert got == datetime(2024, 5, 1, 10, 20, 30, tzinfo=timezone(timedelta(hours=5, minutes=45)))


# --------------------------------------------------------------------------- layer records


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_layer_records_read_from_the_data_root(tmp_path: Path) -> None:
    db = tmp_path / "image" / "btrfs" / "layerdb"
    _write(db / "sha256" / "c1" / "cache-id", "aaa")  # dockerd writes no newline
    _write(db / "sha256" / "c2" / "cache-id", "bbb\n")
    _write(db / "sha256" / "c3" / "diff", "sha256:x")  # a layer folder being written
    _write(db / "mounts" / "ctr1" / "mount-id", " ccc ")
    _write(db / "mounts" / "ctr1" / "init-id", "ccc-init")
    _write(db / "mounts" / "ctr2" / "mount-id", "ddd")
    (db / "tmp").mkdir()

    refs = read_layer_refs(str(tmp_path))

    assert refs.image_cache_ids == {"aaa", "bbb"}
    assert refs.container_mount_ids == {"ccc", "ddd"}
    assert refs.container_init_ids == {"ccc-init"}


def test_layer_records_missing_folders_mean_nothing_referenced(tmp_path: Path) -> None:
    assert read_layer_refs(str(tmp_path)).all == frozenset()
    (tmp_path / "image" / "btrfs" / "layerdb" / "sha256").mkdir(parents=True)
    assert read_layer_refs(str(tmp_path)).all == frozenset()


def test_layer_records_of_an_invisible_data_root_are_an_error(tmp_path: Path) -> None:
    # "nothing referenced" here would make every layer look orphaned
    with pytest.raises(DockerUnavailable):
        read_layer_refs(str(tmp_path / "not-there"))
    with pytest.raises(DockerUnavailable):
        read_layer_refs("relative/docker")


# ------------------------------------------------------ volume stores (volumes/metadata.db)

STORES = Path(__file__).parent.parent / "captures" / "docker"


def _store(root: Path, capture: str = "metadata-three-volumes.db") -> Path:
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    db = root / "volumes" / "metadata.db"
    db.write_bytes((STORES / capture).read_bytes())
    return db


def _labels(root: Path) -> dict[str, dict[str, str]]:
    found = read_volume_stores(str(root))
    assert found.unreadable == ()
    return {f"{Path(v.store).relative_to(root)}:{v.name}": dict(v.labels) for v in found.volumes}


def test_the_volumes_a_daemon_recorded_and_those_of_its_own_inner_daemon(tmp_path: Path) -> None:
    assert read_volume_stores(str(tmp_path)).volumes == ()  # no store: nothing
    _store(tmp_path)
    _store(tmp_path / "volumes" / "inner-plain" / "_data", "metadata-400-volumes.db")
    labels = _labels(tmp_path)
    assert labels["volumes/metadata.db:inner-keep"] == {"keep": "true"}
    assert labels["volumes/metadata.db:inner-none"] == {}
    inner = "volumes/inner-plain/_data/volumes/metadata.db"
    assert labels[f"{inner}:inner-0250-" + "x" * 40] == {"keep": "true"}
    assert len(labels) == 3 + 400


def test_a_store_nested_deeper_than_the_limit_is_unreadable(tmp_path: Path) -> None:
    root = tmp_path
    for _ in range(4):
        _store(root)
        root = root / "volumes" / "inner-keep" / "_data"
    found = read_volume_stores(str(tmp_path), depth=3)
    assert len(found.volumes) == 9
    ((path, why),) = found.unreadable
    assert path.count("inner-keep") == 3 and "3 levels" in why


def test_a_store_that_is_not_a_plain_bolt_file_is_unreadable_never_empty(tmp_path: Path) -> None:
    cases: dict[str, str] = {}
    a = tmp_path / "fifo"
    (a / "volumes").mkdir(parents=True)
    os.mkfifo(a / "volumes" / "metadata.db")  # opened for reading, this would block
    cases["fifo"] = "not a regular file"
    b = tmp_path / "link"
    (b / "volumes").mkdir(parents=True)
    (b / "volumes" / "metadata.db").symlink_to(STORES / "metadata-three-volumes.db")
    cases["link"] = "Too many levels of symbolic links"
    c = tmp_path / "garbage"
    _store(c).write_bytes(b"SQLite format 3\x00" + bytes(8192))
    cases["garbage"] = "not a volume store this agent can read"
    d = tmp_path / "badjson"
    db = _store(d)
    db.write_bytes(db.read_bytes().replace(b'{"Name":"inner-keep"', b'x"Name":"inner-keep"'))
    cases["badjson"] = "the record of volume b'inner-keep'"
    e = tmp_path / "badname"
    db = _store(e)
    db.write_bytes(db.read_bytes().replace(b"inner-none{", b"inner/none{"))
    cases["badname"] = "a volume named 'inner/none'"
    for name, why in cases.items():
        found = read_volume_stores(str(tmp_path / name))
        assert found.unreadable, name
        assert why in found.unreadable[0][1], (name, found.unreadable)


def test_a_store_over_the_size_cap_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.host.dockerd as dockerd

    _store(tmp_path)
    monkeypatch.setattr(dockerd, "STORE_MAX_BYTES", 1000)
    ((_path, why),) = read_volume_stores(str(tmp_path)).unreadable
    assert "over 1000" in why


# --------------------------------------------------------------------------- no daemon


def test_a_socket_with_no_daemon_is_unavailable(tmp_path: Path) -> None:
    client = DockerClient(base_url=f"unix://{tmp_path}/missing.sock", timeout=5)
    for call in (client.ping, client.info, client.volumes, client.containers):
        with pytest.raises(DockerUnavailable):
            call()
    with pytest.raises(DockerUnavailable):
        client.remove_volume("x")


def test_a_dead_daemons_socket_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the file stays; nobody listens: ECONNREFUSED
    client = DockerClient(base_url=f"unix://{path}", timeout=5)
    with pytest.raises(DockerUnavailable) as caught:
        client.ping()
    assert str(path) in caught.value.detail


def test_a_daemon_that_does_not_answer_is_unavailable_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(8)  # connections queue, nothing ever answers
        client = DockerClient(base_url=f"unix://{path}", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(DockerUnavailable):
            client.volumes()
        assert time.monotonic() - started < 10


class _Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    paths: list[str]
    ping_names_api: bool


class _Answer(http.server.BaseHTTPRequestHandler):
    """A daemon of only ``/_ping``, ``/version`` and ``/info``; the ping has an
    ``Api-Version`` header unless the server says not (Engine API before 1.25)."""

    server: _Daemon
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.paths.append(re.sub(r"^/v[\d.]+", "", path))
        headers = {"Api-Version": "1.41"} if self.server.ping_names_api else {}
        if path.endswith("/_ping"):
            body = b"OK"
        elif path.endswith("/version"):
            body = json.dumps({"ApiVersion": "1.24", "Version": "1.12.6"}).encode()
        else:
            answer = {"ServerVersion": "1.12.6", "Driver": "btrfs", "DockerRootDir": "/d"}
            body = json.dumps(answer).encode()
        self._answer(200, body, headers)

    def do_DELETE(self) -> None:  # a volume removed
        self.server.paths.append(re.sub(r"^/v[\d.]+", "", self.path.split("?", 1)[0]))
        self._answer(204, b"", {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def _daemon(path: Path, *, ping_names_api: bool) -> Iterator[_Daemon]:
    server = _Daemon(str(path), _Answer)
    server.paths, server.ping_names_api = [], ping_names_api
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_client_for_removals_asks_the_api_version_no_second_time(tmp_path: Path) -> None:
    with _daemon(tmp_path / "d.sock", ping_names_api=True) as server:
        client = DockerClient(base_url=f"unix://{tmp_path}/d.sock", timeout=5)
        client.ping()
        client.remove_volume("gone")
    assert server.paths.count("/version") == 1, server.paths
    assert "/volumes/gone" in server.paths


@pytest.mark.parametrize("ping_names_api", [True, False])
def test_info_takes_the_api_version_from_the_ping_and_asks_version_only_without_it(
    tmp_path: Path, ping_names_api: bool
) -> None:
    with _daemon(tmp_path / "d.sock", ping_names_api=ping_names_api) as server:
        client = DockerClient(base_url=f"unix://{tmp_path}/d.sock", timeout=5)
        client.ping()  # the SDK asks /version once when its client is made
        server.paths.clear()
        info = client.info()
    assert (info.server_version, info.storage_driver, info.data_root) == ("1.12.6", "btrfs", "/d")
    if ping_names_api:
        assert info.api_version == "1.41"
        assert sorted(server.paths) == ["/_ping", "/info"]
    else:
        assert info.api_version == "1.24"
        assert sorted(server.paths) == ["/_ping", "/info", "/version"]


def test_no_character_set_detector_is_imported_and_bodies_are_read_as_utf8() -> None:
    # a fresh interpreter, warnings as errors: importing the module loads the SDK and
    # requests without charset_normalizer or chardet, and no warning about it is shown
    code = (
        "import sys\n"
        "import agent.host.dockerd\n"
        "import requests.models\n"
        "assert 'requests' in sys.modules and 'docker' in sys.modules\n"
        "assert sys.modules.get('charset_normalizer') is None\n"
        "assert sys.modules.get('chardet') is None\n"
        "r = requests.models.Response()\n"
        "r._content = 'd\u00e9j\u00e0 vu'.encode()\n"
        "r.headers['Content-Type'] = 'application/octet-stream'\n"
        "assert (r.apparent_encoding, r.text) == ('utf-8', 'd\u00e9j\u00e0 vu')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_daemon_is_told_by_the_process_that_listens(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    proc = tmp_path / "proc" / str(os.getpid())
    proc.mkdir(parents=True)
    (proc / "stat").write_bytes(Path("/proc/self/stat").read_bytes())
    start = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        s.listen(8)  # this process listens: SO_PEERCRED names it
        client = DockerClient(
            base_url=f"unix://{sock}", timeout=5, proc_root=str(tmp_path / "proc")
        )
        assert client.daemon_identity() is None  # no exe link: cannot be told
        (proc / "exe").symlink_to("/usr/local/bin/something-else")
        assert client.daemon_identity() is None  # not a dockerd (a proxy, systemd)
        (proc / "exe").unlink()
        (proc / "exe").symlink_to("/var/packages/ContainerManager/target/usr/bin/dockerd")
        assert client.daemon_identity() == f"{os.getpid()}:{start}"
        # by the real /proc this process is python: not a daemon to keep info for
        assert DockerClient(base_url=f"unix://{sock}", timeout=5).daemon_identity() is None
    assert client.daemon_identity() is None  # nobody listens
    assert DockerClient(base_url="tcp://127.0.0.1:1", timeout=1).daemon_identity() is None
    missing = DockerClient(base_url=f"unix://{tmp_path}/missing.sock", timeout=1)
    assert missing.daemon_identity() is None


# --------------------------------------------------------------------------- the real daemon


@pytest.fixture(scope="module")
def client(lab: Any) -> Iterator[DockerClient]:
    c = DockerClient(base_url=lab.docker_host, timeout=30)
    yield c
    c.close()


def _cli(lab: Any, *args: str) -> str:
    return str(lab.docker(*args).stdout).strip()


@contextmanager
def _requests_made(client: DockerClient) -> Iterator[list[str]]:
    """The path of every HTTP request the client sends inside the block."""
    seen: list[str] = []

    def hook(response: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(response.request.path_url)

    hooks = client._api().hooks["response"]  # the SDK's APIClient is a requests Session
    hooks.append(hook)
    try:
        yield seen
    finally:
        hooks.remove(hook)


@pytest.mark.lab
def test_lab_info(lab: Any, client: DockerClient) -> None:
    with _requests_made(client) as seen:
        info = client.info()
    version, api = _cli(
        lab, "version", "--format", "{{.Server.Version}} {{.Server.APIVersion}}"
    ).split()

    assert info.storage_driver == "btrfs"
    assert info.data_root == str(lab.data_root)
    assert (info.server_version, info.api_version) == (version, api)
    start = Path(f"/proc/{lab.dockerd_pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert client.daemon_identity() == f"{lab.dockerd_pid}:{start}"
    # the API version comes from the ping's header: /version runs runc in the daemon
    assert sorted(p.split("?")[0].rsplit("/", 1)[-1] for p in seen) == ["_ping", "info"], seen
    client.ping()


@pytest.mark.lab
def test_lab_volumes(lab: Any, client: DockerClient) -> None:
    seeded = lab.seeded
    keep = seeded.never_touch.keep_volume
    volumes = {v.name: v for v in client.volumes()}

    assert set(_cli(lab, "volume", "ls", "-q").split()) == set(volumes)
    dind = volumes[seeded.dind.volume]
    assert dind.anonymous and dind.mountpoint == str(seeded.dind.mountpoint)
    assert volumes[seeded.never_touch.stopped_anonymous_volume.name].anonymous
    assert not volumes[seeded.never_touch.named_volume.name].anonymous
    assert not volumes[seeded.never_touch.in_use_volume.name].anonymous
    assert volumes[keep.name].labels == {"keep": "true"} and not volumes[keep.name].anonymous
    assert volumes[seeded.never_touch.named_volume.name].labels == {}
    for name, record in volumes.items():
        created = _cli(lab, "volume", "inspect", "--format", "{{.CreatedAt}}", name)
        assert record.created_at == datetime.fromisoformat(created).astimezone(UTC), name
        assert record.driver == "local"


@pytest.mark.lab
def test_lab_containers_and_their_volumes(lab: Any, client: DockerClient) -> None:
    never = lab.seeded.never_touch
    containers = {c.id: c for c in client.containers()}

    assert set(_cli(lab, "ps", "-aq", "--no-trunc").split()) == set(containers)
    running = containers[never.running_container.id]
    stopped = containers[never.stopped_container.id]
    assert running.running and running.name == never.running_container.name
    assert running.volume_names == (never.in_use_volume.name,)
    assert not stopped.running and stopped.status.startswith("Exited")
    assert stopped.volume_names == (never.stopped_anonymous_volume.name,)
    users = {v for c in containers.values() for v in c.volume_names}
    assert lab.seeded.dind.volume not in users  # its container is gone: dangling
    assert never.keep_volume.name not in users


@pytest.mark.lab
def test_lab_one_request_per_list(lab: Any, client: DockerClient) -> None:
    assert len(client.containers()) >= 2  # one request per container would show
    with _requests_made(client) as seen:
        client.containers()
        client.volumes()
    assert len(seen) == 2, seen
    assert "/containers/json" in seen[0] and "/volumes" in seen[1]


@pytest.mark.lab
def test_lab_layer_refs_cover_every_layer_and_not_the_orphan(
    lab: Any, client: DockerClient
) -> None:
    seeded = lab.seeded
    refs = client.layer_refs(client.info().data_root)
    on_disk = set(os.listdir(lab.layer_dir))
    orphan = seeded.orphan.path.name

    assert orphan in on_disk and orphan not in refs.all
    assert refs.all == on_disk - {orphan}
    for path in seeded.never_touch.subvolumes:
        assert path.name in refs.all, path
    containers = set(_cli(lab, "ps", "-aq", "--no-trunc").split())
    assert len(refs.container_mount_ids) == len(containers)
    assert refs.container_init_ids == {m + "-init" for m in refs.container_mount_ids}
    assert not refs.image_cache_ids & refs.container_mount_ids


@pytest.mark.lab
def test_lab_layer_refs_of_the_leaked_inner_daemon(lab: Any, client: DockerClient) -> None:
    dind = lab.seeded.dind
    refs = client.layer_refs(str(dind.mountpoint))
    inner = {p.name for p in (*dind.inner_image_subvolumes, *dind.inner_container_subvolumes)}
    assert refs.all == inner
    assert dind.ro_parent.name not in refs.all


@pytest.mark.lab
def test_lab_remove_volume_in_use_is_refused(lab: Any, client: DockerClient) -> None:
    never = lab.seeded.never_touch
    with pytest.raises(InUse) as caught:
        client.remove_volume(never.in_use_volume.name)
    assert caught.value.extra["in_use_by"] == [never.running_container.id]
    with pytest.raises(InUse) as stopped:  # a stopped container is a user too
        client.remove_volume(never.stopped_anonymous_volume.name)
    assert stopped.value.extra["in_use_by"] == [never.stopped_container.id]
    names = set(_cli(lab, "volume", "ls", "-q").split())
    assert {never.in_use_volume.name, never.stopped_anonymous_volume.name} <= names


@pytest.mark.lab
def test_lab_remove_unknown_volume_is_not_found(client: DockerClient) -> None:
    with pytest.raises(NotFound) as caught:
        client.remove_volume("nas-janitor-no-such-volume")
    assert "no such volume" in caught.value.detail


@pytest.mark.lab
def test_lab_remove_volume(lab: Any, client: DockerClient) -> None:
    name = f"nas-janitor-test-{os.getpid()}"
    lab.docker("volume", "create", name)
    try:
        client.remove_volume(name)
        assert name not in _cli(lab, "volume", "ls", "-q").split()
    finally:
        lab.docker("volume", "rm", "-f", name, check=False)


@pytest.mark.lab
@pytest.mark.slow
def test_lab_docker_half_deletes_a_dind_volume_and_says_why(lab: Any, client: DockerClient) -> None:
    """What FakeDocker models: with a read-only nested subvolume, removal fails after
    deleting the writable ones; the volume stays listed. Then, children first with
    btrfs, it goes."""
    dind = lab.seed_dind_volume()
    try:
        with pytest.raises(ToolFailed) as caught:
            client.remove_volume(dind.volume)
        assert "read-only file system" in caught.value.detail
        assert caught.value.extra["docker_status"] == 500
        assert dind.volume in {v.name for v in client.volumes()}
        left = {p for p in dind.subvolumes if p.exists()}
        assert {dind.ro_leaf, dind.ro_parent, dind.ro_parent_child} <= left
        assert set(dind.writable) - left, "nothing writable was deleted"

        _destroy_dind(dind)
        client.remove_volume(dind.volume)
        assert dind.volume not in {v.name for v in client.volumes()}
    finally:
        _destroy_dind(dind)
        lab.docker("volume", "rm", "-f", dind.volume, check=False)


def _destroy_dind(dind: Any) -> None:
    """The right fix, by hand: clear read-only flags, delete children first."""
    for path in dind.read_only:
        if path.exists():
            subprocess.run(["btrfs", "property", "set", str(path), "ro", "false"], check=True)
    left = [p for p in reversed(dind.subvolumes) if p.exists()]
    if left:
        subprocess.run(["btrfs", "subvolume", "delete", *map(str, left)], check=True)


@pytest.mark.lab
def test_lab_a_daemon_that_dies_after_the_client_connected(lab_factory: Any) -> None:
    own = lab_factory(seed=False)  # a lab of its own: this test stops its daemon
    client = DockerClient(base_url=own.docker_host, timeout=10)
    client.ping()
    assert client.info().storage_driver == "btrfs"

    pid = own.dockerd_pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)

    for call in (client.ping, client.volumes, client.containers):
        with pytest.raises(DockerUnavailable):
            call()
    client.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
