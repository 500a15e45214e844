"""Fixtures shared by every test folder.

The real btrfs + Docker lab (see ``lab/__init__.py``):
- ``lab``: one seeded lab for the whole session; read it, do not destroy what it seeded
  (seed fresh leftovers with ``lab.seed_dind_volume()`` / ``lab.seed_orphan_subvolume()``
  when a test needs to delete something, or build your own with ``lab_factory``).
- ``lab_host``: for tests that drive ``Lab.up`` / ``python -m lab`` themselves; it only
  applies the rule below (skip or fail when this host cannot run a lab).
- ``lab_factory``: ``lab_factory(seed=True) -> Lab`` builds a separate lab in a fresh folder;
  every lab it made is torn down at the end of the session (call ``.down()`` to do it sooner).

Labs live under /tmp/nas-janitor-lab-*. Teardown runs in the fixture finalizers, and also
at interpreter exit and on SIGTERM/SIGHUP. Tests that use these fixtures are marked ``lab``
automatically, so ``pytest -m "not lab"`` never builds one.

When the lab cannot start: with ``CI=true`` the tests FAIL with the reason; elsewhere they
skip with the reason only if the host cannot run a lab at all (not root, no loop devices, a
tool missing). A lab that should start but does not is always a failure.

btrfs-progs, both versions the agent meets:
- ``btrfs_binary``: a test that takes it runs twice, with the distro's btrfs (6.2 here)
  and with btrfs-progs 4.4.1 as NAS vendors ship it (``lab.btrfs_progs``: built from
  ``../shared/vendor/btrfs-progs-v4.4.1.tar.gz`` once, cached outside the clone). Without
  that tarball the 4.4.1 runs skip with the reason; with ``CI=true`` they fail, as they do
  when the build fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

import lab as lab_pkg
from lab import Lab, LabError, LabUnavailable, btrfs_progs

LAB_FIXTURES = frozenset({"lab", "lab_factory", "lab_host"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"lab cannot start on this CI host: {reason}", pytrace=False)
    pytest.skip(f"lab unavailable: {reason}")


def _start_lab(*, seed: bool) -> Lab:
    problems = lab_pkg.host_problems()
    if problems:
        _unavailable("; ".join(problems))
    root = Path(tempfile.mkdtemp(prefix="nas-janitor-lab-"))
    try:
        return Lab.up(root, seed=seed)
    except LabUnavailable as exc:
        with contextlib.suppress(OSError):
            root.rmdir()
        _unavailable(str(exc))
    except LabError as exc:
        pytest.fail(f"lab failed to start in {root}: {exc}", pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab_host() -> None:
    problems = lab_pkg.host_problems()
    if problems:
        _unavailable("; ".join(problems))
    lab_pkg.install_cleanup_handlers()


@pytest.fixture(scope="session")
def lab_factory() -> Iterator[Callable[..., Lab]]:
    lab_pkg.install_cleanup_handlers()
    made: list[Lab] = []

    def make(*, seed: bool = True) -> Lab:
        new = _start_lab(seed=seed)
        made.append(new)
        return new

    yield make
    problems: list[str] = []
    for one in reversed(made):
        report = one.down(check=False)
        problems.extend(f"{one.root}: {e}" for e in report.errors)
    if problems:
        pytest.fail("lab teardown left things behind: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory()


# --------------------------------------------------------------------------- btrfs-progs

DISTRO = "distro"
BTRFS_VERSIONS = (DISTRO, btrfs_progs.VERSION)
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@pytest.fixture(scope="session")
def distro_btrfs() -> str:
    """The distro's btrfs (btrfs-progs 6.2 on Debian 12), by absolute path."""
    found = shutil.which("btrfs", path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if found is None:
        _unavailable("no btrfs on PATH (Debian package btrfs-progs)")
    return found


@pytest.fixture(scope="session")
def btrfs_progs_4() -> str:
    """btrfs-progs 4.4.1 built from the vendored tarball (cached between runs)."""
    try:
        return str(btrfs_progs.ensure())
    except btrfs_progs.SourceMissing as exc:
        if in_ci():
            pytest.fail(f"CI=true needs btrfs-progs {btrfs_progs.VERSION}: {exc}", pytrace=False)
        pytest.skip(f"btrfs-progs {btrfs_progs.VERSION} variant skipped: {exc}")
    except btrfs_progs.BuildFailed as exc:
        pytest.fail(f"btrfs-progs {btrfs_progs.VERSION} did not build: {exc}", pytrace=False)


@pytest.fixture(params=BTRFS_VERSIONS, ids=[f"btrfs-{v}" for v in BTRFS_VERSIONS])
def btrfs_binary(request: pytest.FixtureRequest) -> str:
    """The agent's ``btrfs_binary``: the distro's, then btrfs-progs 4.4.1."""
    name = "distro_btrfs" if request.param == DISTRO else "btrfs_progs_4"
    path: str = request.getfixturevalue(name)
    return path
