from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.http.auth import hash_token

DIGEST = "a" * 64


def test_defaults_need_no_file(tmp_path: Path) -> None:
    cfg = load_config(data={}, env={})
    assert cfg.listen == "0.0.0.0:8443"
    assert cfg.roots == ()
    assert cfg.gunicorn.workers == 1 and cfg.gunicorn.threads == 4
    assert not cfg.tls.enabled


def test_yaml_file_and_env_overrides(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
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
    cfg = load_config(data={"tokens_file": str(tf)}, env={})
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
        ({"plan_ttl_seconds": 5}, "plan_ttl_seconds"),
        ({"colour": "blue"}, "unknown setting"),
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
