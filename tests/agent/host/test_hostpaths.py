"""Host paths resolved on the host (``agent.host.hostpaths``): the walk over real
symlinks in a folder standing for the host's root, and over a table of links."""

from __future__ import annotations

import os
from pathlib import Path

from agent.host.btrfs import BtrfsTool
from agent.host.hostpaths import MAX_LINKS, Lookup, resolve_on_host, resolve_path


def _host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "volume1/docker/volumes/v/_data").mkdir(parents=True)
    (root / "volume1/shortcuts").mkdir(parents=True)
    return root


def real(root: Path, path: str) -> str | None:
    return resolve_on_host([path], host_root=str(root))[path].real


def test_a_path_without_a_link_is_itself_and_a_missing_part_is_taken_as_written(
    tmp_path: Path,
) -> None:
    root = _host(tmp_path)
    assert real(root, "/volume1/docker/volumes/v/_data") == "/volume1/docker/volumes/v/_data"
    assert real(root, "/volume1/new/a/../b") == "/volume1/new/b"
    assert real(root, "/volume1//docker/./volumes/") == "/volume1/docker/volumes"


def test_an_absolute_link_starts_again_at_the_host_root_not_this_process_root(
    tmp_path: Path,
) -> None:
    root = _host(tmp_path)
    os.symlink("/volume1/docker/volumes/v/_data", root / "volume1/shortcuts/ci")
    assert real(root, "/volume1/shortcuts/ci") == "/volume1/docker/volumes/v/_data"
    assert real(root, "/volume1/shortcuts/ci/sub") == "/volume1/docker/volumes/v/_data/sub"
    # /etc exists in this process's root, not in the host root here: never followed
    os.symlink("/etc", root / "volume1/shortcuts/etc")
    r = resolve_on_host(["/volume1/shortcuts/etc/x"], host_root=str(root))
    assert r["/volume1/shortcuts/etc/x"].real is None


def test_relative_links_chains_and_links_in_the_middle(tmp_path: Path) -> None:
    root = _host(tmp_path)
    os.symlink("../docker/volumes", root / "volume1/shortcuts/vols")  # relative
    os.symlink("vols/v", root / "volume1/shortcuts/one")  # a chain: one -> vols -> ...
    os.symlink("/volume1/shortcuts/one", root / "volume1/shortcuts/two")
    os.symlink("shortcuts", root / "volume1/s")  # a link as a middle component
    assert real(root, "/volume1/shortcuts/vols/v/_data") == "/volume1/docker/volumes/v/_data"
    assert real(root, "/volume1/s/two/_data") == "/volume1/docker/volumes/v/_data"
    # ".." after a link goes up from what the link points at
    assert real(root, "/volume1/s/vols/../volumes/v") == "/volume1/docker/volumes/v"


def test_dotdot_never_climbs_out_of_the_host_root(tmp_path: Path) -> None:
    root = _host(tmp_path)
    os.symlink("../../../../../../volume1/docker", root / "volume1/shortcuts/up")
    assert real(root, "/volume1/shortcuts/up/volumes") == "/volume1/docker/volumes"
    assert real(root, "/../../volume1/docker") == "/volume1/docker"


def test_dangling_links_loops_and_non_folders_are_unresolved_with_the_reason(
    tmp_path: Path,
) -> None:
    root = _host(tmp_path)
    os.symlink("/volume1/gone/x", root / "volume1/shortcuts/dangling")
    os.symlink("loop-b", root / "volume1/shortcuts/loop-a")
    os.symlink("loop-a", root / "volume1/shortcuts/loop-b")
    (root / "volume1/file").write_text("x")
    paths = ["/volume1/shortcuts/dangling", "/volume1/shortcuts/loop-a", "/volume1/file/x"]
    out = resolve_on_host(paths, host_root=str(root))
    assert out[paths[0]].real is None and "dangling" in str(out[paths[0]].reason)
    assert "/volume1/gone" in str(out[paths[0]].reason)
    assert out[paths[1]].real is None and "loop" in str(out[paths[1]].reason)
    assert out[paths[2]].real is None and "not a folder" in str(out[paths[2]].reason)


def test_the_kernels_link_limit() -> None:
    """40 links on the way resolve (the kernel's MAXSYMLINKS); 41 are a loop."""

    def chain(n: int) -> dict[str, str]:
        links = {f"/l{i}": f"/l{i + 1}" for i in range(n)}
        links[f"/l{n}"] = "/end"
        return links

    def lookup(links: dict[str, str]) -> Lookup:
        return lambda p: (p in links or p == "/end", links.get(p))

    assert resolve_path("/l0", lookup(chain(MAX_LINKS - 1))).real == "/end"
    assert resolve_path("/l0", lookup(chain(MAX_LINKS))).real is None


def test_a_part_that_cannot_be_read_is_unresolved() -> None:
    def lookup(p: str) -> tuple[bool, str | None]:
        if p == "/volume1/private":
            raise PermissionError(13, "Permission denied")
        return True, None

    r = resolve_path("/volume1/private/x", lookup)
    assert r.real is None and "Permission denied" in str(r.reason)
    assert resolve_path("relative/x", lookup).real is None


def test_the_tool_resolves_under_the_host_root(tmp_path: Path) -> None:
    """This machine's pid 1 may not be entered (its supervisor forbids even root), so
    the tool resolves under the host's ``/`` as this process sees it."""
    os.symlink(str(tmp_path / "target"), tmp_path / "link")
    (tmp_path / "target").mkdir()
    out = BtrfsTool().resolve_host_paths([str(tmp_path / "link")])
    assert out[str(tmp_path / "link")].real == str(tmp_path / "target")


def test_the_tool_resolves_under_the_host_prefix_outside_the_hosts_pid_namespace(
    tmp_path: Path,
) -> None:
    """In a pid namespace of its own pid 1 is not the host's: the host's root is
    where the host is mounted (``host_prefix``), and an absolute link starts there."""
    proc = tmp_path / "proc"
    (proc / "self/ns").mkdir(parents=True)
    os.symlink("pid:[4026532999]", proc / "self/ns/pid")
    root = _host(tmp_path)
    os.symlink("/volume1/docker/volumes/v/_data", root / "volume1/shortcuts/ci")
    tool = BtrfsTool(proc_root=str(proc), host_root=str(root))
    out = tool.resolve_host_paths(["/volume1/shortcuts/ci"])
    assert out["/volume1/shortcuts/ci"].real == "/volume1/docker/volumes/v/_data"


def test_the_tool_prefers_pid_1s_root_when_it_may_enter_it(tmp_path: Path) -> None:
    """A proc folder whose pid 1 root is a folder standing for the host's root."""
    proc = tmp_path / "proc"
    (proc / "self/ns").mkdir(parents=True)
    os.symlink("pid:[4026531836]", proc / "self/ns/pid")
    root = _host(tmp_path)
    (proc / "1").mkdir()
    os.symlink(str(root), proc / "1/root")
    os.symlink("/volume1/docker/volumes/v/_data", root / "volume1/shortcuts/ci")
    tool = BtrfsTool(proc_root=str(proc), host_root="/nonexistent")
    out = tool.resolve_host_paths(["/volume1/shortcuts/ci"])
    assert out["/volume1/shortcuts/ci"].real == "/volume1/docker/volumes/v/_data"
