"""The text parsers the tests keep (tests/agent/host/textformats.py) against what
btrfs-progs 4.4.1 and 6.2 really printed (tests/agent/captures/)."""

from __future__ import annotations

import pytest

from agent.errors import ToolFailed
from agent.host.btrfs_parse import BtrfsParseError
from agent.host.records import Qgroup
from tests.agent.host.test_btrfs_parse import VERSIONS, load_capture
from tests.agent.host.textformats import (
    ListedSubvolume,
    parse_qgroup_show,
    parse_readonly_list,
    parse_subvolume_list,
    quotas_disabled,
)

VOLUME = "docker/volumes/4dd2138ac55d46854a569d9b596e7683f1892829c75ae8befeeb05719482abd5/_data"
LAYERS = "docker/btrfs/subvolumes"


# --------------------------------------------------------------------------- subvolume list


@pytest.mark.parametrize("version", VERSIONS)
def test_subvolume_list_puq(version: str) -> None:
    records = parse_subvolume_list(load_capture(version, "subvolume-list-puq.txt").stdout)
    assert [r.id for r in records] == [
        256, 257, 258, 261, 262, 263, 264, 265, 266, 267, 272, 273, 274, 275, 278,
    ]  # fmt: skip
    by_id = {r.id: r for r in records}
    assert by_id[256] == ListedSubvolume(
        id=256,
        parent_id=5,
        top_level=5,
        generation=31,
        uuid="fd656438-fbf3-124d-8d1b-38b84b42d845",
        parent_uuid=None,
        path="docker",
    )
    # a snapshot of a snapshot (the container layer of the inner daemon)
    assert by_id[263] == ListedSubvolume(
        id=263,
        parent_id=256,
        top_level=256,
        generation=11,
        uuid="eb123e26-8abb-9546-bf17-62ebd6891bd3",
        parent_uuid="115476da-a438-284c-82fc-4fe8da04b45e",
        path=f"{VOLUME}/btrfs/subvolumes/"
        "25bcd9ca0a66731775b4857f17ce39317922b1d28e96d1fb5737a75a6b66b036",
    )
    assert by_id[261].path == (
        f"{VOLUME}/btrfs/subvolumes/9fa588ba22b8cb96cb552b13c24c4f650076b02187ee14c53b3e7d81d2b7b869"
    )
    assert by_id[261].parent_uuid is None
    assert by_id[272].parent_uuid == by_id[257].uuid == "21aac48f-dd22-d34a-9952-2e9f9da5015e"
    assert by_id[272].path.endswith("-init")
    assert by_id[278] == ListedSubvolume(
        id=278,
        parent_id=256,
        top_level=256,
        generation=31,
        uuid="25ad846b-8e60-c247-839a-85b262e09d6c",
        parent_uuid=None,
        path=f"{LAYERS}/67367b0267ee6813e95e75f2afee83549d573458cfeacc9dad7da945ea83206b",
    )
    assert {r.parent_id for r in records} == {5, 256}
    assert by_id[258].generation == 8


def test_subvolume_list_same_result_from_both_versions() -> None:
    """v6 pads parent_uuid to a UUID's width; the records must not differ."""
    v4, v6 = (
        parse_subvolume_list(load_capture(v, "subvolume-list-puq.txt").stdout) for v in VERSIONS
    )
    assert v4 == v6
    assert len(v4) == 15


@pytest.mark.parametrize("version", VERSIONS)
def test_subvolume_list_with_received_uuid_and_fs_tree_prefix(version: str) -> None:
    """``-R -a`` adds a received_uuid column and ``<FS_TREE>/`` prefixes: same records."""
    full = parse_subvolume_list(load_capture(version, "subvolume-list-puqR-a.txt").stdout)
    plain = parse_subvolume_list(load_capture(version, "subvolume-list-puq.txt").stdout)
    assert full == plain


@pytest.mark.parametrize("version", VERSIONS)
def test_subvolume_list_without_uuids_is_refused(version: str) -> None:
    out = load_capture(version, "subvolume-list-p.txt").stdout
    with pytest.raises(BtrfsParseError, match="lacks parent, uuid or parent_uuid"):
        parse_subvolume_list(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_readonly_list(version: str) -> None:
    cap = load_capture(version, "subvolume-list-r-readonly.txt")
    assert cap.exit_code == 0
    assert parse_readonly_list(cap.stdout) == {261}


@pytest.mark.parametrize("version", VERSIONS)
def test_id_lists_of_other_shapes(version: str) -> None:
    """The generic line parser also reads ``-o`` and ``-c -g`` lines (ids only)."""
    all_ids = {
        r.id for r in parse_subvolume_list(load_capture(version, "subvolume-list-puq.txt").stdout)
    }
    assert parse_readonly_list(load_capture(version, "subvolume-list-o-docker.txt").stdout) == (
        all_ids - {256}
    )
    assert parse_readonly_list(load_capture(version, "subvolume-list-cg.txt").stdout) == all_ids


def test_subvolume_list_empty() -> None:
    assert parse_subvolume_list("") == []
    assert parse_subvolume_list("\n") == []
    assert parse_readonly_list("") == set()


V6_PAD = "-" + " " * 35  # v6 prints "-" padded to a UUID's 36 characters


@pytest.mark.parametrize("pad", ["- ", V6_PAD + " "], ids=["v4-spacing", "v6-spacing"])
@pytest.mark.parametrize(
    "path",
    [
        "dir x/sub y",
        "a path with path inside",
        "x uuid 8afd0ad8-5f58-fc43-97dc-5eec290d0114 path y",
        " leading and trailing ",
        "tab\there",
    ],
)
def test_subvolume_list_paths_with_spaces(pad: str, path: str) -> None:
    line = (
        f"ID 300 gen 9 parent 5 top level 5 parent_uuid {pad}"
        f"uuid 8afd0ad8-5f58-fc43-97dc-5eec290d0114 path {path}\n"
    )
    [rec] = parse_subvolume_list(line)
    assert rec.path == path
    assert rec.uuid == "8afd0ad8-5f58-fc43-97dc-5eec290d0114"
    assert rec.parent_uuid is None
    assert (rec.id, rec.generation, rec.parent_id, rec.top_level) == (300, 9, 5, 5)


@pytest.mark.parametrize(
    "text",
    [
        "garbage\n",
        "ID x gen 1 parent 5 top level 5 parent_uuid - uuid - path a\n",
        "ID 256 gen 7 parent 5 top level 5 parent_uuid - uuid - path \n",  # no path
        "ID 256 gen 7 parent 5 top level 5 parent_uuid - uuid not-a-uuid path a\n",
    ],
)
def test_subvolume_list_garbage(text: str) -> None:
    with pytest.raises(BtrfsParseError, match="btrfs subvolume list") as exc:
        parse_subvolume_list(text)
    assert exc.value.line is not None


@pytest.mark.parametrize("version", VERSIONS)
def test_subvolume_list_table_output_is_refused(version: str) -> None:
    with pytest.raises(BtrfsParseError, match="unexpected line"):
        parse_subvolume_list(load_capture(version, "subvolume-list-t.txt").stdout)


def test_a_later_bad_line_fails_the_whole_parse() -> None:
    good = "ID 256 gen 7 parent 5 top level 5 parent_uuid - uuid - path a\n"
    with pytest.raises(BtrfsParseError):
        parse_subvolume_list(good + "oops\n")


def test_parse_error_is_a_tool_failure() -> None:
    with pytest.raises(BtrfsParseError) as exc:
        parse_subvolume_list("garbage\n")
    assert isinstance(exc.value, ToolFailed)
    assert isinstance(exc.value, ValueError)
    assert exc.value.status == 502
    assert "garbage" in exc.value.detail


# --------------------------------------------------------------------------- qgroups

EXPECTED_QGROUPS = {
    5: (16384, 16384),
    256: (565248, 565248),
    257: (1998848, 16384),
    258: (16384, 16384),
    261: (10387456, 8404992),
    262: (10387456, 8404992),
    263: (1998848, 16384),
    278: (4210688, 4210688),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["qgroup-show-raw.txt", "qgroup-show-pcre-raw.txt"])
def test_qgroup_show(version: str, name: str) -> None:
    cap = load_capture(version, name)
    assert cap.exit_code == 0
    groups = parse_qgroup_show(cap.stdout)
    assert len(groups) == 16
    subvol_ids = {
        r.id for r in parse_subvolume_list(load_capture(version, "subvolume-list-puq.txt").stdout)
    }
    assert set(groups) == subvol_ids | {5}
    for qid, (rfer, excl) in EXPECTED_QGROUPS.items():
        assert groups[qid] == Qgroup(id=qid, referenced=rfer, exclusive=excl)


@pytest.mark.parametrize("version", VERSIONS)
def test_qgroup_quota_off(version: str) -> None:
    cap = load_capture(version, "qgroup-show-quota-off.txt")
    assert cap.exit_code == 1
    assert quotas_disabled(cap.stderr)
    assert cap.stdout.strip() == ""


@pytest.mark.parametrize("version", VERSIONS)
def test_other_errors_are_not_quota_off(version: str) -> None:
    assert not quotas_disabled(load_capture(version, "subvolume-list-not-btrfs.txt").stderr)
    assert not quotas_disabled("")


def test_qgroup_higher_levels_and_stale_paths() -> None:
    out = (
        "Qgroupid    Referenced    Exclusive   Path \n"
        "--------    ----------    ---------   ---- \n"
        "0/5              16384        16384   <toplevel>\n"
        "0/260            16384        16384   <stale>\n"
        "0/300          1048576        65536   dir x/sub y\n"
        "1/100          1064960      1064960   <0 member qgroups>\n"
    )
    assert parse_qgroup_show(out) == {
        5: Qgroup(5, 16384, 16384),
        260: Qgroup(260, 16384, 16384),
        300: Qgroup(300, 1048576, 65536),
    }


def test_qgroup_empty_output() -> None:
    assert parse_qgroup_show("") == {}


@pytest.mark.parametrize(
    "text",
    [
        "garbage\n0/5 1 1\n",
        "qgroupid rfer excl\n-------- ---- ----\n0/5 16.00KiB 16.00KiB\n",  # not --raw
        "qgroupid rfer excl\n-------- ---- ----\nnonsense\n",
    ],
)
def test_qgroup_garbage(text: str) -> None:
    with pytest.raises(BtrfsParseError, match="qgroup show"):
        parse_qgroup_show(text)
