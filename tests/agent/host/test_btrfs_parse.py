"""The btrfs parsers against what btrfs-progs 4.4.1 and 6.2 really printed
(tests/agent/captures/), plus the edge cases the captures do not show."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.host.btrfs_parse import (
    BtrfsParseError,
    DeleteOutput,
    PathFacts,
    delete_results,
    parse_filesystem_show,
    parse_filesystem_usage,
    parse_get_default,
    parse_mountinfo,
    parse_subvolume_delete,
    parse_version,
    unescape_mountinfo,
)
from agent.host.records import DeleteResult, MountEntry

CAPTURES = Path(__file__).parent.parent / "captures"
VERSIONS = ["v4.4.1", "v6.2"]


@dataclass(frozen=True)
class Capture:
    command: str
    stdout: str
    stderr: str
    exit_code: int


def load_capture(version: str, name: str) -> Capture:
    """A capture file: ``$ command``, the output as a terminal showed it, ``[exit N]``.

    btrfs-progs writes ERROR:/WARNING: lines to stderr and the rest to stdout, so that is
    how the interleaved text is split back.
    """
    lines = (CAPTURES / "btrfs-progs" / version / name).read_text().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    assert lines[0].startswith("$ ") and lines[-1].startswith("[exit ")
    body = lines[1:-1]
    err = [line for line in body if line.startswith(("ERROR: ", "WARNING: "))]
    out = [line for line in body if not line.startswith(("ERROR: ", "WARNING: "))]
    return Capture(
        command=lines[0][2:],
        stdout="".join(line + "\n" for line in out),
        stderr="".join(line + "\n" for line in err),
        exit_code=int(lines[-1][len("[exit ") : -1]),
    )


# --------------------------------------------------------------------------- version


@pytest.mark.parametrize(("version", "expected"), [("v4.4.1", "4.4.1"), ("v6.2", "6.2")])
def test_version(version: str, expected: str) -> None:
    cap = load_capture(version, "version.txt")
    assert cap.exit_code == 0
    assert parse_version(cap.stdout) == expected


def test_version_of_newer_releases_with_a_feature_line() -> None:
    out = "btrfs-progs v6.6.3\n-EXPERIMENTAL -INJECT -STATIC +LZO +ZSTD +UDEV +FSVERITY\n"
    assert parse_version(out) == "6.6.3"


@pytest.mark.parametrize("text", ["", "\n", "btrfs version unknown\n", "v6.2\n"])
def test_version_garbage(text: str) -> None:
    with pytest.raises(BtrfsParseError, match="btrfs --version"):
        parse_version(text)


# --------------------------------------------------------------------------- filesystem


@pytest.mark.parametrize("version", VERSIONS)
def test_filesystem_show(version: str) -> None:
    ident = parse_filesystem_show(load_capture(version, "filesystem-show.txt").stdout)
    assert ident.uuid == "fb415bf3-dfe2-46e7-965f-840f6fe01817"
    assert ident.label is None
    assert ident.devices == ("/dev/loop1",)


def test_filesystem_show_with_a_label() -> None:
    ident = parse_filesystem_show(load_capture("v6.2-extra", "filesystem-show-label.txt").stdout)
    assert ident.uuid == "8232c298-8a61-4f2f-b357-f6a8575f0712"
    assert ident.label == "nas data"
    assert ident.devices == ("/dev/loop2",)


def test_filesystem_show_garbage() -> None:
    block = load_capture("v6.2", "filesystem-show.txt").stdout
    with pytest.raises(BtrfsParseError, match="expected one filesystem, found 0"):
        parse_filesystem_show("")
    with pytest.raises(BtrfsParseError, match="expected one filesystem, found 2"):
        parse_filesystem_show(block + block)
    with pytest.raises(BtrfsParseError, match="label"):
        parse_filesystem_show("Label: none  uuid: not-a-uuid\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_filesystem_usage(version: str) -> None:
    usage = parse_filesystem_usage(load_capture(version, "filesystem-usage-b.txt").stdout)
    assert usage.size_bytes == 6442450944
    assert usage.used_bytes == 26877952
    assert usage.free_bytes == 5863464960


def test_filesystem_usage_garbage() -> None:
    with pytest.raises(BtrfsParseError, match="missing"):
        parse_filesystem_usage("Overall:\n    Device size:\t\t 6442450944\n")
    with pytest.raises(BtrfsParseError, match="not in bytes"):
        parse_filesystem_usage(
            "Overall:\n    Device size:\t\t   6.00GiB\n    Used:\t\t\t  25.63MiB\n"
            "    Free (estimated):\t\t   5.46GiB\t(min: 3.03GiB)\n"
        )
    with pytest.raises(BtrfsParseError):
        parse_filesystem_usage("")


@pytest.mark.parametrize("version", VERSIONS)
def test_get_default(version: str) -> None:
    assert parse_get_default(load_capture(version, "subvolume-get-default.txt").stdout) == 5


def test_get_default_other_subvolume() -> None:
    assert parse_get_default("ID 257 gen 10 top level 5 path dir x/snap\n") == 257


@pytest.mark.parametrize("text", ["", "garbage\n", "ID 5 (FS_TREE)\nID 6 (FS_TREE)\n"])
def test_get_default_garbage(text: str) -> None:
    with pytest.raises(BtrfsParseError, match="get-default"):
        parse_get_default(text)


# --------------------------------------------------------------------------- delete


def facts(path: str, *, existed: bool = True, subvolume: bool = True, gone: bool) -> PathFacts:
    return PathFacts(path, path, existed=existed, was_subvolume=subvolume, gone=gone)


@pytest.mark.parametrize("version", VERSIONS)
def test_delete_batch_with_a_missing_path(version: str) -> None:
    cap = load_capture(version, "subvolume-delete-batch.txt")
    assert cap.exit_code == 1
    out = parse_subvolume_delete(cap.stdout, cap.stderr)
    assert out.announced == ("/volume1/a", "/volume1/b")
    [msg] = out.messages
    assert msg.stage == "check"
    assert msg.reason == "No such file or directory"
    assert msg.path == ("/volume1/missing" if version == "v4.4.1" else None)
    results = delete_results(
        [
            facts("/volume1/a", gone=True),
            facts("/volume1/b", gone=True),
            facts("/volume1/missing", existed=False, subvolume=False, gone=True),
        ],
        out,
    )
    assert results == [
        DeleteResult("/volume1/a", ok=True),
        DeleteResult("/volume1/b", ok=True),
        DeleteResult("/volume1/missing", ok=False, error="No such file or directory"),
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("name", "path", "reason"),
    [
        ("subvolume-delete-enotempty.txt", "/volume1/q", "Directory not empty"),
        ("subvolume-delete-erofs.txt", "/volume1/p/child", "Read-only file system"),
    ],
)
def test_delete_destroy_errors(version: str, name: str, path: str, reason: str) -> None:
    cap = load_capture(version, name)
    assert cap.exit_code == 1
    out = parse_subvolume_delete(cap.stdout, cap.stderr)
    assert out.announced == (path,)  # a failing path is announced before it fails
    [msg] = out.messages
    assert (msg.stage, msg.reason) == ("destroy", reason)
    assert msg.path == (path if version == "v4.4.1" else None)
    assert delete_results([facts(path, gone=False)], out) == [
        DeleteResult(path, ok=False, error=reason)
    ]


# One batch mixing everything, as each version prints it: a missing path, a parent whose
# child is still there, a leaf that deletes, a child of a read-only parent.
MIXED_PATHS = ["/volume1/missing", "/volume1/q", "/volume1/c", "/volume1/p/child"]
MIXED_STDOUT = "".join(
    f"Delete subvolume (no-commit): '{p}'\n"
    for p in ["/volume1/q", "/volume1/c", "/volume1/p/child"]
)
MIXED_STDERR = {
    "v4.4.1": "ERROR: cannot access subvolume /volume1/missing: No such file or directory\n"
    "ERROR: cannot delete '/volume1/q': Directory not empty\n"
    "ERROR: cannot delete '/volume1/p/child': Read-only file system\n",
    "v6.2": "ERROR: Could not statfs: No such file or directory\n"
    "ERROR: Could not destroy subvolume/snapshot: Directory not empty\n"
    "ERROR: Could not destroy subvolume/snapshot: Read-only file system\n",
}
MIXED_FACTS = [
    facts("/volume1/missing", existed=False, subvolume=False, gone=True),
    facts("/volume1/q", gone=False),
    facts("/volume1/c", gone=True),
    facts("/volume1/p/child", gone=False),
]


@pytest.mark.parametrize("version", VERSIONS)
def test_delete_mixed_batch_reasons_go_to_the_right_paths(version: str) -> None:
    out = parse_subvolume_delete(MIXED_STDOUT, MIXED_STDERR[version])
    assert delete_results(MIXED_FACTS, out) == [
        DeleteResult("/volume1/missing", ok=False, error="No such file or directory"),
        DeleteResult("/volume1/q", ok=False, error="Directory not empty"),
        DeleteResult("/volume1/c", ok=True),
        DeleteResult("/volume1/p/child", ok=False, error="Read-only file system"),
    ]


def test_delete_v4_matches_named_paths_whatever_their_order() -> None:
    stderr = (
        "ERROR: cannot delete '/volume1/p/child': Read-only file system\n"
        "ERROR: cannot delete '/volume1/q': Directory not empty\n"
    )
    results = delete_results(MIXED_FACTS[1:], parse_subvolume_delete(MIXED_STDOUT, stderr))
    assert [r.error for r in results] == ["Directory not empty", None, "Read-only file system"]


def test_delete_v4_names_the_real_path() -> None:
    """btrfs prints the realpath; the caller's path may differ (e.g. a trailing slash)."""
    out = parse_subvolume_delete(
        "Delete subvolume (no-commit): '/volume1/q'\n",
        "ERROR: cannot delete '/volume1/q': Directory not empty\n",
    )
    [result] = delete_results(
        [PathFacts("/volume1/q/", "/volume1/q", existed=True, was_subvolume=True, gone=False)],
        out,
    )
    assert result == DeleteResult("/volume1/q/", ok=False, error="Directory not empty")


def test_delete_counts_that_do_not_add_up_are_not_guessed() -> None:
    """Two destroy errors but one path still there: no message is pinned on it alone."""
    out = parse_subvolume_delete(
        "Delete subvolume (no-commit): '/v/a'\nDelete subvolume (no-commit): '/v/b'\n",
        "ERROR: Could not destroy subvolume/snapshot: Directory not empty\n"
        "ERROR: Could not destroy subvolume/snapshot: Read-only file system\n",
    )
    [a, b] = delete_results([facts("/v/a", gone=False), facts("/v/b", gone=True)], out)
    assert b.ok
    assert not a.ok
    assert a.error is not None
    assert a.error.startswith("not deleted; btrfs said: ")
    assert "Directory not empty" in a.error and "Read-only file system" in a.error


def test_delete_default_subvolume_warning_of_newer_versions() -> None:
    out = parse_subvolume_delete("", "WARNING: not deleting default subvolume id 257 '/v/snap'\n")
    assert delete_results([facts("/v/snap", gone=False)], out) == [
        DeleteResult("/v/snap", ok=False, error="It is the default subvolume")
    ]


def test_delete_eperm_warning_is_not_an_extra_error() -> None:
    out = parse_subvolume_delete(
        "Delete subvolume (no-commit): '/v/a'\n",
        "ERROR: Could not destroy subvolume/snapshot: Operation not permitted\n"
        "WARNING: deletion failed with EPERM, you don't have permissions"
        " or send may be in progress\n",
    )
    assert delete_results([facts("/v/a", gone=False)], out) == [
        DeleteResult("/v/a", ok=False, error="Operation not permitted")
    ]


def test_delete_not_a_subvolume_both_versions() -> None:
    v4 = parse_subvolume_delete("", "ERROR: not a subvolume: /v/plain\n")
    v6 = parse_subvolume_delete("", "ERROR: Not a Btrfs subvolume: Invalid argument\n")
    for out in (v4, v6):
        assert delete_results([facts("/v/plain", subvolume=False, gone=False)], out) == [
            DeleteResult("/v/plain", ok=False, error="Not a btrfs subvolume")
        ]


def test_delete_newer_announcement_with_an_id() -> None:
    out = parse_subvolume_delete("Delete subvolume 257 (no-commit): '/v/a b'\n", "")
    assert out.announced == ("/v/a b",)


def test_delete_unknown_output_is_kept_not_lost() -> None:
    out = parse_subvolume_delete("something else\n", "usage: btrfs subvolume delete\n")
    assert [m.stage for m in out.messages] == ["other", "other"]
    [result] = delete_results([facts("/v/a", gone=False)], out)
    assert result.error == "not deleted; btrfs said: something else; usage: btrfs subvolume delete"


def test_delete_no_output_at_all() -> None:
    [result] = delete_results([facts("/v/a", gone=False)], DeleteOutput((), ()))
    assert result == DeleteResult("/v/a", ok=False, error="not deleted (btrfs gave no reason)")


def test_a_path_that_was_no_subvolume_is_never_ok() -> None:
    [result] = delete_results(
        [facts("/v/file", subvolume=False, gone=True)], parse_subvolume_delete("", "")
    )
    assert not result.ok


# --------------------------------------------------------------------------- mountinfo


def test_mountinfo_btrfs_entries() -> None:
    text = (CAPTURES / "linux" / "mountinfo.txt").read_text()
    assert parse_mountinfo(text, fstype="btrfs") == [
        MountEntry(
            mountpoint="/srv/lab/volume 1",
            root="/",
            source="/dev/loop2",
            options="rw,discard=async,space_cache=v2,subvolid=5,subvol=/",
            fstype="btrfs",
            dev="0:43",
            mount_id=50,
            parent_id=27,
        ),
        MountEntry(
            mountpoint="/srv/lab/back\\slash",
            root="/docker",
            source="/dev/loop2",
            options="rw,discard=async,space_cache=v2,subvolid=256,subvol=/docker",
            fstype="btrfs",
            dev="0:43",
            mount_id=60,
            parent_id=27,
        ),
        MountEntry(
            mountpoint="/srv/lab/tab\tdir",
            root="/docker",
            source="/dev/loop2",
            options="rw,discard=async,space_cache=v2,subvolid=256,subvol=/docker",
            fstype="btrfs",
            dev="0:43",
            mount_id=61,
            parent_id=27,
        ),
    ]


def test_mountinfo_all_types() -> None:
    text = (CAPTURES / "linux" / "mountinfo.txt").read_text()
    entries = parse_mountinfo(text)
    assert len(entries) == 9
    assert [e.fstype for e in entries] == [
        "proc", "sysfs", "devtmpfs", "tmpfs", "devpts", "ext4", "btrfs", "btrfs", "btrfs",
    ]  # fmt: skip
    root = MountEntry(
        "/",
        "/",
        "/dev/vda",
        "rw,discard,resv_strict,resuid=65534,resgid=65534",
        "ext4",
        "254:0",
        27,
        1,
    )
    assert root in entries
    assert parse_mountinfo(text, fstype="proc") == [
        MountEntry("/proc", "/", "proc", "rw", "proc", "0:21", 22, 27)
    ]


def test_mountinfo_escapes() -> None:
    assert unescape_mountinfo(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert unescape_mountinfo("/plain") == "/plain"
    line = (
        r"70 27 0:43 /sub\040vol /mnt/my\040nas rw shared:1 master:2 - btrfs /dev/sd\040b"
        r" rw,subvol=/sub\040vol"
    )
    [entry] = parse_mountinfo(line + "\n")
    # super options stay as the kernel wrote them (a comma in a value is escaped too)
    assert entry == MountEntry(
        "/mnt/my nas", "/sub vol", "/dev/sd b", r"rw,subvol=/sub\040vol", "btrfs", "0:43", 70, 27
    )


@pytest.mark.parametrize(
    "text",
    [
        "garbage\n",
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 btrfs /dev/root rw\n",  # no " - "
        "36 35 98:0 /mnt1 /mnt/parent rw - btrfs\n",  # too few fields after " - "
    ],
)
def test_mountinfo_garbage(text: str) -> None:
    with pytest.raises(BtrfsParseError, match="mountinfo"):
        parse_mountinfo(text)


def test_mountinfo_empty() -> None:
    assert parse_mountinfo("") == []


def test_delete_of_a_top_level_mount_point() -> None:
    """btrfs opens the parent folder, which is not on btrfs; the message names the parent."""
    out = parse_subvolume_delete("", "ERROR: not a btrfs filesystem: /srv\n")
    assert delete_results([facts("/srv/lab", gone=False)], out) == [
        DeleteResult("/srv/lab", ok=False, error="Not on a btrfs filesystem")
    ]
