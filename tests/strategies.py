"""Hypothesis strategies shared by the tests.

``hostile_names()``: names a btrfs directory entry (a subvolume, a folder) can really
have, as bytes, chosen to break whatever reads them as text: newlines that forge a line
of ``btrfs subvolume list``, tabs, backslashes, leading dashes taken for options,
``<FS_TREE>``, spaces, bytes that are not UTF-8, 255-byte names. The kernel refuses
only "/", NUL, "." and ".." (and more than 255 bytes), so neither does this.
"""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["NAME_MAX", "SAMPLE_HOSTILE_NAMES", "hostile_names", "is_valid_name"]

NAME_MAX = 255  # BTRFS_NAME_LEN

# One of each kind, also used as-is by the lab tests.
SAMPLE_HOSTILE_NAMES: tuple[bytes, ...] = (
    b"new\nline",
    b"ID 999 gen 1 top level 5 path forged",  # what a forged line would say
    b"x\nID 256 gen 7 parent 5 top level 5 parent_uuid - uuid - path elsewhere",
    b"tab\there",
    b"back\\slash",
    b"\\n not a newline",
    b"-r",
    b"--help",
    b"<FS_TREE>",
    b"<FS_TREE> and more",
    b" leading space",
    b"trailing space ",
    b" ",
    b"caf\xc3\xa9",  # UTF-8
    b"latin1 caf\xe9",  # not UTF-8
    b"\xff\xfe\xfd",
    b"\xc3",  # a truncated UTF-8 sequence
    b"\x01\x02\x7f control",
    b"quote'\"`$(touch pwned)",
    b"n" * NAME_MAX,
    b"\xe9" * NAME_MAX,  # 255 bytes, none of them UTF-8
)

_SPECIAL_BYTES = b"\n\t\r\\ -<>'\"$`*?[]{}\x00\x01\x7f\x80\xc3\xe9\xff"


def is_valid_name(name: bytes) -> bool:
    """What the kernel accepts as a directory entry's name."""
    if not 0 < len(name) <= NAME_MAX or b"/" in name or b"\0" in name:
        return False
    return name not in (b".", b"..")


def hostile_names() -> st.SearchStrategy[bytes]:
    """Valid btrfs names (bytes), hostile to any text parser."""
    alphabet = st.sampled_from([bytes([b]) for b in _SPECIAL_BYTES if b != 0])
    mixed = st.lists(
        st.one_of(alphabet, st.binary(min_size=1, max_size=8)), min_size=1, max_size=12
    ).map(b"".join)
    long = st.integers(min_value=NAME_MAX - 3, max_value=NAME_MAX).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)
    )
    raw = st.one_of(st.sampled_from(SAMPLE_HOSTILE_NAMES), mixed, long)
    return raw.map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")[:NAME_MAX]).filter(
        is_valid_name
    )
