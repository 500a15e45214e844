"""Pure parsers for what ``btrfs`` (btrfs-progs 4.4.1 ... 6.x) and the kernel print.

Every function takes text and returns model values; nothing here runs a process or
touches a file, so the tests feed them the captured output of both btrfs-progs
generations (``tests/agent/captures/btrfs-progs/``). ``agent.host.btrfs`` runs the commands.

Output that does not have the expected shape raises :class:`BtrfsParseError`, naming the
command and the offending line, never a half-parsed result.

Lines are split on ``"\\n"`` only (not ``str.splitlines``), because a path may hold any
other control character. Subvolumes and qgroups are not listed from text at all (a name
holding a newline forges a line of ``btrfs subvolume list``): ``agent.host.btrfs`` reads
them from the kernel with ioctls, decoded by ``agent.host.btrfs_tree``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agent.errors import ToolFailed
from agent.host.records import (
    DeleteResult,
    FilesystemIdent,
    FsUsage,
    MountEntry,
)

__all__ = [
    "BtrfsParseError",
    "DeleteMessage",
    "DeleteOutput",
    "PathFacts",
    "delete_results",
    "parse_filesystem_show",
    "parse_filesystem_usage",
    "parse_get_default",
    "parse_mountinfo",
    "parse_subvolume_delete",
    "parse_version",
    "unescape_mountinfo",
]


class BtrfsParseError(ToolFailed, ValueError):
    """A btrfs command (or the kernel) printed something this module does not understand."""

    code, title = "btrfs_unexpected_output", "Unexpected btrfs output"

    def __init__(self, what: str, problem: str, line: str | None = None) -> None:
        detail = f"{what}: {problem}"
        if line is not None:
            detail += f": {line[:200]!r}"
        super().__init__(detail)
        self.what = what
        self.line = line


def _lines(text: str) -> list[str]:
    """Non-empty lines, split on newlines only."""
    return [line for line in text.split("\n") if line.strip()]


# --------------------------------------------------------------------------- version


_VERSION_RE = re.compile(r"btrfs-progs v?(\d+(?:\.\d+)*(?:[-+.~][0-9A-Za-z.+~-]*)?)")


def parse_version(stdout: str) -> str:
    """``btrfs --version`` -> ``"4.4.1"``, ``"6.2"``.

    Newer releases print a second line of build features; only the first line counts.
    """
    lines = _lines(stdout)
    if not lines:
        raise BtrfsParseError("btrfs --version", "no output")
    m = _VERSION_RE.fullmatch(lines[0].strip())
    if not m:
        raise BtrfsParseError("btrfs --version", "unexpected line", lines[0])
    return m.group(1)


# --------------------------------------------------------------------------- filesystem

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_FS_LABEL_RE = re.compile(r"Label: (?:'(?P<label>.*)'|(?P<none>none)) +uuid: (?P<uuid>\S+)")
_FS_DEVICE_RE = re.compile(r"\s*devid +\d+ size \S+ used \S+ path (?P<path>.+)")


def parse_filesystem_show(stdout: str) -> FilesystemIdent:
    """``btrfs filesystem show <mount>``: uuid, label (``none`` -> None), device paths."""
    what = "btrfs filesystem show"
    idents = []
    devices: list[str] = []
    for line in _lines(stdout):
        if line.startswith("Label:"):
            m = _FS_LABEL_RE.fullmatch(line.rstrip())
            if not m or not _UUID_RE.fullmatch(m.group("uuid")):
                raise BtrfsParseError(what, "unexpected label line", line)
            idents.append((m.group("uuid"), None if m.group("none") else m.group("label")))
            continue
        d = _FS_DEVICE_RE.fullmatch(line.rstrip())
        if d:
            devices.append(d.group("path"))
    if len(idents) != 1:
        raise BtrfsParseError(what, f"expected one filesystem, found {len(idents)}")
    uuid, label = idents[0]
    return FilesystemIdent(uuid=uuid, label=label, devices=tuple(devices))


_USAGE_FIELDS = {
    "Device size": "size_bytes",
    "Used": "used_bytes",
    "Free (estimated)": "free_bytes",
}
_USAGE_RE = re.compile(r"\s*(?P<key>Device size|Used|Free \(estimated\)):\s+(?P<value>\S+).*")


def parse_filesystem_usage(stdout: str) -> FsUsage:
    """``btrfs filesystem usage -b <mount>``: Device size, Used, Free (estimated).

    Only the ``Overall:`` block has these keys at the start of a line; the per-profile
    blocks (``Data,single: Size:..., Used:...``) do not match.
    """
    what = "btrfs filesystem usage -b"
    found: dict[str, int] = {}
    for line in _lines(stdout):
        m = _USAGE_RE.fullmatch(line)
        if not m:
            continue
        field = _USAGE_FIELDS[m.group("key")]
        if field in found:
            continue
        if not m.group("value").isdigit():
            raise BtrfsParseError(what, "size not in bytes", line)
        found[field] = int(m.group("value"))
    missing = sorted(set(_USAGE_FIELDS.values()) - found.keys())
    if missing:
        raise BtrfsParseError(what, f"missing {', '.join(missing)}")
    return FsUsage(**found)


_DEFAULT_RE = re.compile(r"ID (?P<id>\d+) (?:\(FS_TREE\)|gen \d+ top level \d+ path .*)")


def parse_get_default(stdout: str) -> int:
    """``btrfs subvolume get-default <mount>``: ``ID 5 (FS_TREE)`` or
    ``ID 257 gen 10 top level 5 path foo`` -> the id."""
    what = "btrfs subvolume get-default"
    lines = _lines(stdout)
    if len(lines) != 1:
        raise BtrfsParseError(what, f"expected one line, got {len(lines)}")
    m = _DEFAULT_RE.fullmatch(lines[0].rstrip())
    if not m:
        raise BtrfsParseError(what, "unexpected line", lines[0])
    return int(m.group("id"))


# --------------------------------------------------------------------------- subvolume delete
#
# ``btrfs subvolume delete P1 P2 ...`` handles the paths one at a time, in order, and
# goes on past a bad one (exit 1 at the end). For each path it either
#   - fails a check before deleting (missing path, not a subvolume, newer versions: the
#     default subvolume): an ERROR (or WARNING) on stderr, nothing on stdout; or
#   - prints ``Delete subvolume (no-commit): '<realpath>'`` on stdout, then calls the
#     destroy ioctl, which may fail: an ERROR on stderr.
# stdout is a pipe, so fully buffered: the two streams cannot be interleaved after the
# fact. v4 names the path in its errors; v6 does not ("Could not destroy
# subvolume/snapshot: Directory not empty").
#
# So the outcome of each path is decided by the filesystem, not by the text: the caller
# (agent.host.btrfs) records what each path was before the batch and whether it is gone after
# (``PathFacts``). The messages only supply the reason for the paths that failed:
# a message naming a path goes to that path; the others go, in order, to the failed paths
# of their stage: destroy errors to failed paths that were announced on stdout, check
# errors to failed paths that were not. When the counts of a stage do not match, no
# guess is made: those paths get every unattributed message, labelled as such.


@dataclass(frozen=True)
class DeleteMessage:
    """One ERROR/WARNING line of ``btrfs subvolume delete``."""

    path: str | None  # the path the message names (v4), None when it names none (v6)
    reason: str  # e.g. "Directory not empty", "No such file or directory"
    stage: Literal["check", "destroy", "other"]
    text: str  # the line without its "ERROR: " / "WARNING: " prefix


@dataclass(frozen=True)
class DeleteOutput:
    announced: tuple[str, ...]  # paths of the "Delete subvolume ... '<path>'" lines, in order
    messages: tuple[DeleteMessage, ...]


_ANNOUNCE_RE = re.compile(r"Delete subvolume(?: \d+)? \((?:no-)?commit\): '(?P<path>.*)'")

# (pattern, stage, fixed reason or None to take the "reason" group)
_DELETE_MESSAGES: tuple[tuple[re.Pattern[str], Literal["check", "destroy"], str | None], ...] = (
    # v4.4 ... v4.x (error() helper) and older (" - " separator)
    (re.compile(r"cannot delete '(?P<path>.*)'(?::| -) (?P<reason>[^:]+)"), "destroy", None),
    (re.compile(r"cannot access subvolume (?P<path>.*): (?P<reason>[^:]+)"), "check", None),
    (re.compile(r"not a subvolume: (?P<path>.*)"), "check", "Not a btrfs subvolume"),
    (re.compile(r"'(?P<path>.*)' is not a subvolume"), "check", "Not a btrfs subvolume"),
    (re.compile(r"error accessing '(?P<path>.*)'"), "check", "Cannot access the path"),
    (
        re.compile(r"cannot find real path for '(?P<path>.*)': (?P<reason>[^:]+)"),
        "check",
        None,
    ),
    # v5 / v6 (libbtrfsutil messages, no path)
    (re.compile(r"Could not destroy subvolume/snapshot: (?P<reason>.+)"), "destroy", None),
    (re.compile(r"Could not statfs: (?P<reason>.+)"), "check", None),
    (re.compile(r"Could not stat: (?P<reason>.+)"), "check", None),
    (re.compile(r"Not a Btrfs subvolume(?:: .*)?"), "check", "Not a btrfs subvolume"),
    (
        re.compile(r"not deleting default subvolume id \d+ '(?P<path>.*)'"),
        "check",
        "It is the default subvolume",
    ),
    # both: btrfs_open_dir on the parent directory (so it names the parent, not the
    # path): a top level's mount point, whose parent is on another filesystem
    (re.compile(r"not a btrfs filesystem: .*"), "check", "Not on a btrfs filesystem"),
)


def _classify(text: str) -> DeleteMessage:
    for pattern, stage, fixed in _DELETE_MESSAGES:
        m = pattern.fullmatch(text)
        if m:
            groups = m.groupdict()
            reason = fixed if fixed is not None else groups["reason"].strip()
            return DeleteMessage(path=groups.get("path"), reason=reason, stage=stage, text=text)
    return DeleteMessage(path=None, reason=text, stage="other", text=text)


def parse_subvolume_delete(stdout: str, stderr: str) -> DeleteOutput:
    """Split ``btrfs subvolume delete`` output into announced paths and messages.

    Lines of stdout that are not announcements, and stderr lines that are neither ERROR
    nor WARNING (e.g. a usage text), are kept as ``other`` messages so nothing is lost.
    Benign warnings are dropped (EPERM's "deletion failed with EPERM" comes with its ERROR).
    """
    announced = []
    messages = []
    for line in stdout.split("\n"):
        if not line.strip():
            continue
        m = _ANNOUNCE_RE.fullmatch(line.rstrip())
        if m:
            announced.append(m.group("path"))
        else:
            messages.append(DeleteMessage(None, line.strip(), "other", line.strip()))
    for line in stderr.split("\n"):
        text = line.strip()
        if not text:
            continue
        if text.startswith("ERROR: "):
            messages.append(_classify(text.removeprefix("ERROR: ")))
        elif text.startswith("WARNING: "):
            msg = _classify(text.removeprefix("WARNING: "))
            if msg.stage != "other":  # e.g. "not deleting default subvolume"
                messages.append(msg)
        else:
            messages.append(DeleteMessage(None, text, "other", text))
    return DeleteOutput(announced=tuple(announced), messages=tuple(messages))


@dataclass(frozen=True)
class PathFacts:
    """What the caller saw of one path of the batch, before and after running it."""

    path: str  # as given to delete()
    real: str  # os.path.realpath before the batch: what btrfs prints and names
    existed: bool  # before: the path existed (lstat)
    was_subvolume: bool  # before: a directory with inode 256 (a subvolume's root)
    gone: bool  # after: the path no longer exists


def _norm(path: str) -> str:
    # btrfs prints dirname + "/" + basename of the realpath: "//x" for "/x".
    return "/" + path.lstrip("/") if path.startswith("/") else path


def delete_results(facts: Sequence[PathFacts], output: DeleteOutput) -> list[DeleteResult]:
    """One ``DeleteResult`` per path, in order. See the comment above for the method."""
    n = len(facts)
    ok = [f.was_subvolume and f.gone for f in facts]
    errors: list[str | None] = [None] * n
    announced = {_norm(p) for p in output.announced}

    def unassigned_failed(i: int) -> bool:
        return not ok[i] and errors[i] is None

    # 1. messages that name their path
    unnamed: list[DeleteMessage] = []
    for msg in output.messages:
        if msg.path is None:
            unnamed.append(msg)
            continue
        target = _norm(msg.path)
        for i, f in enumerate(facts):
            if unassigned_failed(i) and target in (_norm(f.path), _norm(f.real)):
                errors[i] = msg.reason
                break
        # a named message for a path that did get deleted (or a duplicate) is dropped

    # 2. unnamed messages, in order, to the failed paths of the same stage
    leftovers: list[DeleteMessage] = [m for m in unnamed if m.stage == "other"]
    for stage in ("destroy", "check"):
        msgs = [m for m in unnamed if m.stage == stage]
        targets = [
            i
            for i in range(n)
            if unassigned_failed(i)
            and ((_norm(facts[i].real) in announced) == (stage == "destroy"))
        ]
        if len(msgs) == len(targets):
            for i, msg in zip(targets, msgs, strict=True):
                errors[i] = msg.reason
        else:
            leftovers.extend(msgs)

    # 3. what is left: say what is known, never pin a message on the wrong path
    results = []
    for i, f in enumerate(facts):
        if ok[i]:
            results.append(DeleteResult(path=f.path, ok=True))
            continue
        error = errors[i]
        if error is None:
            if not f.existed:
                error = "No such file or directory"
            elif not f.was_subvolume:
                error = "Not a btrfs subvolume"
            elif leftovers:
                error = "not deleted; btrfs said: " + "; ".join(m.text for m in leftovers)
            else:
                error = "not deleted (btrfs gave no reason)"
        results.append(DeleteResult(path=f.path, ok=False, error=error))
    return results


# --------------------------------------------------------------------------- mountinfo

_OCTAL_RE = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field: str) -> str:
    r"""Undo the kernel's escaping of space, tab, newline and backslash (``\040`` ...)."""
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str, fstype: str | None = None) -> list[MountEntry]:
    """``/proc/<pid>/mountinfo`` -> its mounts, of every type (only ``fstype`` when given).

    Line: ``id parent major:minor root mountpoint options [optional...] - type source
    superoptions`` (proc(5)); the optional fields end at the lone ``-``. Mount point,
    root and source are unescaped; the super options are kept as the kernel escaped them
    (``subvol=/a\\040b``), since an escaped comma must not split an option.
    """
    what = "mountinfo"
    entries = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            raise BtrfsParseError(what, "no ' - ' separator", line) from None
        if len(fields) - sep < 4:
            raise BtrfsParseError(what, "too few fields after ' - '", line)
        kind, source, super_options = fields[sep + 1 : sep + 4]
        if fstype is not None and kind != fstype:
            continue
        if not fields[0].isdigit() or not fields[1].isdigit() or ":" not in fields[2]:
            raise BtrfsParseError(what, "no mount id, parent id or major:minor", line)
        entries.append(
            MountEntry(
                mountpoint=unescape_mountinfo(fields[4]),
                root=unescape_mountinfo(fields[3]),
                source=unescape_mountinfo(source),
                options=super_options,
                fstype=unescape_mountinfo(kind),
                dev=fields[2],
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
            )
        )
    return entries
