"""What btrfs-progs prints for subvolumes and qgroups, parsed: for the tests only.

The agent lists subvolumes and qgroups with ioctls (``agent.host.btrfs_tree``): text
cannot say which line a name holding a newline belongs to. These parsers of
``btrfs subvolume list`` (``-a -p -u -q``, ``-r``) and ``btrfs qgroup show --raw`` (4.4.1
and 6.x) remain for the lab tests that cross-check the ioctl listing against the
command on ordinary names, and are tested on the captures in tests/agent/captures/.

Lines are split on ``"\\n"`` only; a path holding a newline breaks them (that is the
point). Unexpected output raises ``agent.host.btrfs_parse.BtrfsParseError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.host.btrfs_parse import BtrfsParseError
from agent.host.records import Qgroup

__all__ = [
    "ListedSubvolume",
    "parse_qgroup_show",
    "parse_readonly_list",
    "parse_subvolume_list",
    "quotas_disabled",
]


@dataclass(frozen=True)
class ListedSubvolume:
    """One line of ``btrfs subvolume list -a -p -u -q``."""

    id: int
    parent_id: int  # the "parent" column: the subvolume whose tree holds this one
    top_level: int
    generation: int
    uuid: str | None
    parent_uuid: str | None
    path: str  # relative to the top level ("<FS_TREE>/" dropped)


def _lines(text: str) -> list[str]:
    """Non-empty lines, split on newlines only."""
    return [line for line in text.split("\n") if line.strip()]


# --------------------------------------------------------------------------- subvolume list

# One line of ``btrfs subvolume list``, fields in the order btrfs-progs prints them
# (print_subvolume_column in both generations). v6 pads ``parent_uuid -`` and
# ``received_uuid -`` to the width of a UUID, hence `` +`` between keys. The path is the
# last field; everything after ``path `` is the path, spaces included.
_LIST_RE = re.compile(
    r"ID (?P<id>\d+) gen (?P<gen>\d+)"
    r"(?: cgen (?P<cgen>\d+))?"
    r"(?: parent (?P<parent>\d+))?"
    r" top level (?P<top>\d+)"
    r"(?: otime (?P<otime>\S+ \S+))?"
    r"(?: +parent_uuid +(?P<puuid>\S+))?"
    r"(?: +received_uuid +(?P<ruuid>\S+))?"
    r"(?: +uuid +(?P<uuid>\S+))?"
    r" +path (?P<path>.*)"
)

_PUQ_RE = re.compile(
    r"ID (\d+) gen (\d+) parent (\d+) top level (\d+) +parent_uuid +(\S+) +uuid +(\S+) path (.+)"
)

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid_or_none(value: str, what: str, line: str) -> str | None:
    if value == "-":
        return None
    if not _UUID_RE.fullmatch(value):
        raise BtrfsParseError(what, f"bad uuid {value!r}", line)
    return value


def _list_path(raw: str) -> str:
    # With -a, every path is the full one from the top level, and btrfs-progs prefixes
    # with <FS_TREE>/ those not directly below the listed subvolume. Without -a the paths
    # below the listed subvolume are relative to it: agent.host.btrfs always passes -a.
    return raw.removeprefix("<FS_TREE>/")


def _list_matches(stdout: str, what: str) -> list[tuple[str, re.Match[str]]]:
    out = []
    for line in stdout.split("\n"):
        if not line.strip():
            continue
        m = _LIST_RE.fullmatch(line)
        if not m or not m.group("path"):
            raise BtrfsParseError(what, "unexpected line", line)
        out.append((line, m))
    return out


def parse_subvolume_list(stdout: str) -> list[ListedSubvolume]:
    """``btrfs subvolume list -a -p -u -q <mount>``: every subvolume but the top level (5).

    Paths are relative to the filesystem's top level (``<FS_TREE>/`` dropped).
    Empty output (a filesystem with no subvolumes) is an empty list.
    """
    what = "btrfs subvolume list -a -p -u -q"
    records = []
    fast = _PUQ_RE.fullmatch
    for line in stdout.split("\n"):
        # The exact shape both versions print for -p -u -q (one regex without optional
        # groups: 10,000 lines parse several times faster); anything else goes the
        # general way below, which checks it.
        f = fast(line)
        if f is None:
            if not line.strip():
                continue
            m = _LIST_RE.fullmatch(line)
            if not m or not m.group("path"):
                raise BtrfsParseError(what, "unexpected line", line)
            if m.group("parent") is None or m.group("uuid") is None or m.group("puuid") is None:
                raise BtrfsParseError(what, "line lacks parent, uuid or parent_uuid", line)
            sid, gen, parent, top, puuid, uuid, path = (
                m.group("id"), m.group("gen"), m.group("parent"), m.group("top"),
                m.group("puuid"), m.group("uuid"), m.group("path"),
            )  # fmt: skip
        else:
            sid, gen, parent, top, puuid, uuid, path = f.groups()
        records.append(
            ListedSubvolume(
                id=int(sid),
                parent_id=int(parent),
                top_level=int(top),
                generation=int(gen),
                uuid=_uuid_or_none(uuid, what, line),
                parent_uuid=_uuid_or_none(puuid, what, line),
                path=_list_path(path),
            )
        )
    return records


def parse_readonly_list(stdout: str) -> set[int]:
    """``btrfs subvolume list -r <mount>``: the ids of the read-only subvolumes."""
    return {int(m.group("id")) for _, m in _list_matches(stdout, "btrfs subvolume list -r")}


# --------------------------------------------------------------------------- qgroups

_QGROUP_OFF_RE = re.compile(
    r"quotas not enabled"
    r"|can't perform the search - No such file or directory"
    r"|can't list qgroups: No such file or directory",
    re.IGNORECASE,
)


def quotas_disabled(stderr: str) -> bool:
    """True when ``btrfs qgroup show`` failed because quotas are off.

    v4: ``can't perform the search - No such file or directory`` / ``can't list qgroups:
    No such file or directory``; v6: ``can't list qgroups: quotas not enabled``.
    """
    return bool(_QGROUP_OFF_RE.search(stderr))


_QGROUP_ROW_RE = re.compile(r"(?P<level>\d+)/(?P<id>\d+) +(?P<rfer>\d+) +(?P<excl>\d+)(?: .*)?")


def parse_qgroup_show(stdout: str) -> dict[int, Qgroup]:
    """``btrfs qgroup show --raw <mount>`` with quotas on: level-0 qgroups by subvolume id.

    v4 header ``qgroupid rfer excl``, v6 ``Qgroupid Referenced Exclusive Path``; any
    further columns (a path, limits, ``<stale>`` for a deleted subvolume) are ignored.
    Higher-level qgroups (``1/100``) are skipped.
    """
    what = "btrfs qgroup show --raw"
    lines = _lines(stdout)
    if not lines:
        return {}
    if not lines[0].split()[0].lower() == "qgroupid":
        raise BtrfsParseError(what, "missing qgroupid header", lines[0])
    body = lines[1:]
    if body and set(body[0].replace(" ", "")) <= {"-"}:
        body = body[1:]
    result: dict[int, Qgroup] = {}
    for line in body:
        m = _QGROUP_ROW_RE.fullmatch(line.strip())
        if not m:
            raise BtrfsParseError(what, "unexpected line (sizes not in bytes?)", line)
        if m.group("level") != "0":
            continue
        qid = int(m.group("id"))
        result[qid] = Qgroup(
            id=qid, referenced=int(m.group("rfer")), exclusive=int(m.group("excl"))
        )
    return result
