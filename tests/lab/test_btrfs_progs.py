"""``lab.btrfs_progs``: btrfs-progs 4.4.1 built from the vendored tarball, cached by the
tarball's sha256 outside the clone. The real build runs here in a fresh cache of its
own (about 10 s on 2 cores), so a broken build cannot hide behind a warm cache; the
failure paths use a small stand-in tarball whose ``autogen.sh`` fails."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from lab import btrfs_progs
from tests.conftest import in_ci


@pytest.fixture
def vendored() -> Path:
    src = btrfs_progs.tarball()
    if not src.is_file():
        if in_ci():
            pytest.fail(f"CI=true needs the btrfs-progs source at {src}", pytrace=False)
        pytest.skip(f"no btrfs-progs {btrfs_progs.VERSION} source at {src}")
    return src


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAS_JANITOR_BTRFS_PROGS_CACHE", str(cache))
    return cache


def test_builds_into_an_empty_cache_then_reuses_it(vendored: Path, fresh_cache: Path) -> None:
    assert btrfs_progs.cached() is None
    said: list[str] = []
    binary = btrfs_progs.ensure(say=said.append)
    assert binary == fresh_cache / btrfs_progs.sha256(vendored) / "btrfs"
    assert any("built in" in s for s in said), said
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "btrfs-progs v4.4.1"
    log = (binary.parent / "build.log").read_text()
    assert "./configure --disable-documentation --disable-convert" in log
    assert "# built in" in log
    # the scratch source tree is gone
    assert {p.name for p in binary.parent.iterdir()} == {"btrfs", "build.log"}
    assert btrfs_progs.cached() == binary

    stamp = binary.stat().st_mtime_ns
    started = time.monotonic()
    assert btrfs_progs.ensure(say=said.append) == binary
    assert time.monotonic() - started < 5
    assert binary.stat().st_mtime_ns == stamp
    assert said[-1].startswith("btrfs-progs 4.4.1: cached")

    # a cached binary that does not run as 4.4.1 is not used
    binary.write_text("#!/bin/sh\necho btrfs-progs v6.2\n")
    assert btrfs_progs.cached() is None


def _stand_in_tarball(path: Path) -> Path:
    """A tarball laid out like upstream's whose autogen.sh fails with a message."""
    script = b"#!/bin/sh\necho 'autogen: something is missing' >&2\nexit 3\n"
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo("btrfs-progs-v4.4.1")
        top.type = tarfile.DIRTYPE
        top.mode = 0o755
        tar.addfile(top)
        info = tarfile.TarInfo("btrfs-progs-v4.4.1/autogen.sh")
        info.size = len(script)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(script))
    return path


def test_a_failed_build_says_why_and_keeps_its_log(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _stand_in_tarball(tmp_path / "btrfs-progs-v4.4.1.tar.gz")
    monkeypatch.setenv("NAS_JANITOR_BTRFS_PROGS_TARBALL", str(src))
    with pytest.raises(btrfs_progs.BuildFailed) as exc:
        btrfs_progs.ensure()
    out = fresh_cache / btrfs_progs.sha256(src)
    assert "`./autogen.sh` exited 3" in str(exc.value)
    assert "autogen: something is missing" in str(exc.value)
    assert str(out / "build.log") in str(exc.value)
    assert "autogen: something is missing" in (out / "build.log").read_text()
    assert not (out / "btrfs").exists()
    assert btrfs_progs.main(["build"]) == 1


def test_without_the_source_build_skips_except_in_ci(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NAS_JANITOR_BTRFS_PROGS_TARBALL", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(btrfs_progs.SourceMissing, match=r"absent\.tar\.gz"):
        btrfs_progs.ensure()
    assert btrfs_progs.cached() is None
    monkeypatch.setenv("CI", "false")
    assert btrfs_progs.main(["build"]) == 0
    assert btrfs_progs.main(["source"]) == 1
    assert btrfs_progs.main(["path"]) == 1
    monkeypatch.setenv("CI", "true")
    assert btrfs_progs.main(["build"]) == 1
    assert not fresh_cache.exists()


def test_the_default_source_is_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAS_JANITOR_BTRFS_PROGS_TARBALL", raising=False)
    expected = btrfs_progs.REPO_ROOT.parent / "shared" / "vendor" / "btrfs-progs-v4.4.1.tar.gz"
    assert btrfs_progs.tarball() == expected
    assert (btrfs_progs.REPO_ROOT / "lab" / "btrfs_progs.py").is_file()
