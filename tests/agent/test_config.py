from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.http.auth import hash_token

DIGEST = "a" * 64


def test_defaults_need_no_file_but_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(data={}, env={})
    assert err.value.problems == [
        "tls: required to listen on 0.0.0.0 (not a loopback address): set tls.cert and "
        "tls.key, or allow_plaintext: true to serve plain HTTP there on purpose"
    ]
    cfg = load_config(data={"allow_plaintext": True}, env={})
    assert cfg.listen == "0.0.0.0:8443" and cfg.allow_plaintext
    assert cfg.roots == ()
    assert cfg.gunicorn.workers == 1 and cfg.gunicorn.threads == 4
    assert cfg.gunicorn.request_timeout == 10
    assert not cfg.tls.enabled
    assert cfg.unreadable_pids_allowed == ()  # every process must be readable


def test_unreadable_pids_from_the_file_and_the_environment() -> None:
    base = {"allow_plaintext": True}
    assert load_config(
        data={**base, "unreadable_pids_allowed": [1]}, env={}
    ).unreadable_pids_allowed == (1,)
    env = {"NAS_JANITOR_UNREADABLE_PIDS_ALLOWED": "1,2"}
    assert load_config(data=base, env=env).unreadable_pids_allowed == (1, 2)


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ("127.0.0.1:8443", True),
        ("127.3.4.5:8443", True),
        ("[::1]:8443", True),
        ("localhost:8443", True),
        ("0.0.0.0:8443", False),
        ("[::]:8443", False),
        (":8443", False),
        ("192.168.1.10:8443", False),
        ("nas1.lan:8443", False),
    ],
)
def test_plain_http_only_on_loopback_unless_allowed(listen: str, ok: bool) -> None:
    if ok:
        assert load_config(data={"listen": listen}, env={}).listen == listen
    else:
        with pytest.raises(ConfigError, match="tls: required"):
            load_config(data={"listen": listen}, env={})
        env = {"NAS_JANITOR_ALLOW_PLAINTEXT": "true"}
        assert load_config(data={"listen": listen}, env=env).allow_plaintext


def _tls_pair(tmp_path: Path, key_mode: int) -> dict[str, str]:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    cert.chmod(0o644)
    key.chmod(key_mode)
    return {"cert": str(cert), "key": str(key)}


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o600, None),
        (0o400, None),
        (0o640, None),  # group-readable: a Kubernetes secret through fsGroup
        (0o644, "world-readable"),
        (0o604, "world-readable"),
        (0o660, "group-writable"),
        (0o602, "world-writable"),
        (0o666, "group-writable and world-writable and world-readable"),
    ],
)
def test_secret_files_refused_when_others_may_write_or_all_may_read(
    tmp_path: Path, mode: int, why: str | None
) -> None:
    tf = tmp_path / "tokens.yaml"
    tf.write_text(f"tokens:\n  - {{id: ro, sha256: '{hash_token('t')}', scopes: [read]}}\n")
    tf.chmod(mode)
    data = {"tls": _tls_pair(tmp_path, mode), "tokens_file": str(tf)}
    if why is None:
        cfg = load_config(data=data, env={})
        assert cfg.tls.enabled and [t.id for t in cfg.tokens] == ["ro"]
        return
    with pytest.raises(ConfigError) as err:
        load_config(data=data, env={})
    found = [p for p in err.value.problems if why in p]
    assert [p.split(":")[0] for p in found] == ["tls.key", "tokens_file"], err.value.problems
    assert f"mode {mode:04o}" in found[0]


def test_yaml_file_and_env_overrides(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    key.chmod(0o600)
    f = tmp_path / "agent.yaml"
    f.write_text(
        "listen: 127.0.0.1:9000\n"
        f"tokens: [{{id: ctl, sha256: '{DIGEST}', scopes: [read, clean]}}]\n"
        "roots: [/volume1/@docker]\n"
    )
    env = {
        "NAS_JANITOR_CONFIG": str(f),
        "NAS_JANITOR_LISTEN": "127.0.0.1:9443",
        "NAS_JANITOR_TLS_CERT": str(cert),
        "NAS_JANITOR_TLS_KEY": str(key),
        "NAS_JANITOR_ROOTS": "/a/b:/c",
        "NAS_JANITOR_STATE_DIR": str(tmp_path / "state"),
    }
    cfg = load_config(env=env)
    assert cfg.listen == "127.0.0.1:9443"
    assert cfg.host_port == ("127.0.0.1", 9443)
    assert cfg.tls.enabled and cfg.tls.cert == str(cert)
    assert cfg.roots == ("/a/b", "/c")
    assert cfg.tokens[0].id == "ctl" and cfg.tokens[0].scopes == {"read", "clean"}


def test_tokens_file(tmp_path: Path) -> None:
    tf = tmp_path / "tokens.yaml"
    tf.write_text(f"tokens:\n  - {{id: ro, sha256: '{hash_token('t')}', scopes: [read]}}\n")
    tf.chmod(0o600)
    cfg = load_config(data={"tokens_file": str(tf), "listen": "127.0.0.1:8443"}, env={})
    assert [t.id for t in cfg.tokens] == ["ro"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"listen": "nowhere"}, "listen"),
        ({"listen": "1.2.3.4:99999"}, "port out of range"),
        ({"roots": ["relative/path"]}, "roots[0]"),
        ({"roots": ["/"]}, "too wide"),
        ({"tokens": [{"id": "x", "sha256": "short", "scopes": ["read"]}]}, "sha256"),
        ({"tokens": [{"id": "x", "sha256": DIGEST, "scopes": ["admin"]}]}, "scopes"),
        (
            {
                "tokens": [
                    {"id": "x", "sha256": DIGEST, "scopes": ["read"]},
                    {"id": "x", "sha256": DIGEST, "scopes": ["read"]},
                ]
            },
            "duplicate",
        ),
        ({"tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}, "no such file"),
        ({"tls": {"cert": "/etc/hostname"}}, "go together"),
        ({"docker_host": "/var/run/docker.sock"}, "docker_host"),
        ({"gunicorn": {"workers": 4}}, "must be 1"),
        ({"gunicorn": {"request_timeout": 1}}, "request_timeout 2-300"),
        ({"gunicorn": {"request_timeout": 10**5000}}, "request_timeout 2-300"),
        ({"allow_plaintext": "maybe"}, "allow_plaintext: true or false"),
        ({"plan_ttl_seconds": 5}, "plan_ttl_seconds"),
        ({"colour": "blue"}, "unknown setting"),
        ({"unreadable_pids_allowed": 1}, "a list of process ids"),
        ({"unreadable_pids_allowed": [0]}, "is not a process id"),
        ({"unreadable_pids_allowed": ["init"]}, "is not a process id"),
        ({"unreadable_pids_allowed": [True]}, "is not a process id"),
    ],
)
def test_bad_config_says_what_is_wrong(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(data=data, env={})
    assert any(needle in p for p in err.value.problems), err.value.problems


def test_bad_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, env={})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", env={})
