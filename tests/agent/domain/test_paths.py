from __future__ import annotations

import posixpath
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.paths import (
    VOLUME_NAME,
    LinkMemo,
    PathMap,
    PathRefused,
    check_abs,
    is_under,
)


@pytest.mark.parametrize(
    "bad",
    ["relative", "/a/../b", "/a/./b", "/a//b", "/a/b\0c", "..", "/..", "./x", ""],
)
def test_check_abs_refuses(bad: str) -> None:
    with pytest.raises(PathRefused):
        check_abs(bad)


def test_check_abs_accepts_clean_paths() -> None:
    assert check_abs("/volume1/@docker") == "/volume1/@docker"
    assert check_abs("/volume1/x/") == "/volume1/x"


def test_is_under_is_by_component() -> None:
    assert is_under("/v/docker/x", "/v/docker")
    assert is_under("/v/docker", "/v/docker")
    assert not is_under("/v/dockerfoo", "/v/docker")
    # a root written with a trailing slash holds itself too
    assert is_under("/v/docker", "/v/docker/")
    assert not is_under("/v/dockerfoo", "/v/docker/")
    assert is_under("/anything", "/")


def test_pathmap_prefix() -> None:
    m = PathMap("/host")
    assert m.to_local("/volume1/x") == "/host/volume1/x"
    assert m.to_host("/host/volume1/x") == "/volume1/x"
    assert m.to_host("/elsewhere") is None
    assert PathMap("").to_host("/a") == "/a"


def test_symlink_free_detects_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    m = PathMap("")
    assert m.symlink_free(str(real / "x"))
    assert not m.symlink_free(str(tmp_path / "link" / "x"))


@pytest.mark.parametrize(
    "path",
    ["/", "/a", "/a/b", "/a/b/", "//a", "/a/.b", "/a/..b", "/a/b.", "/.x/..y/...", "/a\\b"],
)
def test_check_abs_fast_path_agrees_with_normpath(path: str) -> None:
    """What the one-regex fast path accepts is what the step-by-step checks return."""
    import posixpath

    norm = posixpath.normpath(path)
    assert check_abs(path) == norm


def _check_abs_step_by_step(path: str) -> str | None:
    """What ``check_abs`` accepts, checked one rule at a time (None: refused)."""
    if "\0" in path or not path.startswith("/"):
        return None
    if any(p in ("..", ".") for p in path.split("/")[1:]):
        return None
    norm = posixpath.normpath(path)
    if norm != path.rstrip("/") and not (norm == "/" and path == "/"):
        return None
    return norm


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="/.a\0\\é", max_size=12))
def test_check_abs_quick_paths_accept_and_refuse_as_the_rules_do(path: str) -> None:
    """The string scans and the regex that accept a path at once give what the rules
    checked one by one give, for accepted and refused paths alike."""
    want = _check_abs_step_by_step(path)
    try:
        got: str | None = check_abs(path)
    except PathRefused:
        got = None
    assert got == want, path


def test_link_memo_answers_like_lstat_before_and_after_reading_a_folder(tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(LinkMemo.SCAN_AFTER + 4):
        (many / f"d{i}").mkdir()
    (many / "link").symlink_to(many / "d0")
    m, memo = PathMap(""), LinkMemo()
    # asked one by one first, then from the folder's listing: the same answers
    for i in range(LinkMemo.SCAN_AFTER + 4):
        assert m.symlink_free(str(many / f"d{i}"), memo)
        assert not m.symlink_free(str(many / "link"), memo)
        assert not m.symlink_free(str(many / "link" / "x"), memo)
    # made after the folder was read: looked up again, not taken from the listing
    (many / "late").symlink_to(many / "d1")
    assert not m.symlink_free(str(many / "late"), memo)
    assert m.symlink_free(str(many / "missing"), memo)


@pytest.mark.parametrize("shape", ["", "{t}", "{t}/", "{t}//.", "{t}/./"])
def test_a_normal_path_behind_any_prefix_is_judged_as_without_the_hint(
    tmp_path: Path, shape: str
) -> None:
    """``normal=True`` (the path is known normal: no normalising) gives the answers
    the check gives without it, whatever the shape of the prefix ("/host/./" too)."""
    host = tmp_path / "host"
    (host / "real" / "in").mkdir(parents=True)
    (host / "link").symlink_to(host / "real")
    m = PathMap(shape.format(t=host))
    base = "" if m.prefix else str(host)
    for path in (f"{base}/real/in", f"{base}/link/in", f"{base}/link", f"{base}/missing/x"):
        want = m.symlink_free(path, LinkMemo())
        assert m.symlink_free(path, LinkMemo(), normal=True) == want, (shape, path)
        assert want == m.symlink_free(path)  # and what resolving the path says
    assert not m.symlink_free(f"{base}/link/in", LinkMemo(), normal=True)
    assert m.symlink_free(f"{base}/real/in", LinkMemo(), normal=True)


@pytest.mark.parametrize("name", ["..", "a/b", "", "-x", "a\0b", "%2e%2e", "a b"])
def test_volume_name_pattern_refuses(name: str) -> None:
    assert not VOLUME_NAME.match(name)
