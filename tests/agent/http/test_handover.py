"""What ``serve`` hands to the master it becomes: an anonymous file behind an inherited
descriptor (agent/http/handover.py)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.http import handover
from agent.http.handover import HandoverError, read_handover, write_handover


def test_the_text_goes_over_and_the_descriptor_is_closed() -> None:
    text = '{"config": {"tokens": ["é"]}, "options": {}}' + " " * 100_000
    fd = write_handover(text)
    assert os.get_inheritable(fd)
    assert stat.S_ISREG(os.fstat(fd).st_mode)
    # an anonymous file: no name in any folder
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:janitor-agent-serve")
    assert read_handover(str(fd)) == text
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_without_memfd_an_unlinked_file_goes_over(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memfd(*_: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(handover.os, "memfd_create", no_memfd)
    fd = write_handover('{"x": 1}')
    assert "(deleted)" in os.readlink(f"/proc/self/fd/{fd}")
    assert os.get_inheritable(fd)
    assert read_handover(str(fd)) == '{"x": 1}'


def test_the_child_of_an_exec_reads_it() -> None:
    fd = write_handover("handed")
    try:
        code = "import sys; from agent.http.handover import read_handover; "
        code += "print(read_handover(sys.argv[1]))"
        out = subprocess.run(
            [sys.executable, "-c", code, str(fd)],
            capture_output=True,
            text=True,
            check=True,
            pass_fds=(fd,),
            cwd=Path(__file__).resolve().parents[3],
        ).stdout
    finally:
        os.close(fd)
    assert out == "handed\n"


@pytest.mark.parametrize("value", [None, "", "x", "-4", "٣", "12345678901", "1", "2"])
def test_what_names_no_descriptor_is_refused(value: str | None) -> None:
    with pytest.raises(HandoverError):
        read_handover(value)
    os.fstat(1)  # standard output stays open


def test_a_closed_descriptor_a_pipe_and_binary_are_refused() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(HandoverError, match="not a file"):
        read_handover(str(r))
    with pytest.raises(HandoverError):
        read_handover(str(r))  # closed by the refusal above
    fd = os.memfd_create("t")
    os.write(fd, b"\xff\xfe")
    with pytest.raises(HandoverError, match="not text"):
        read_handover(str(fd))


def test_a_file_over_the_bound_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handover, "MAX_BYTES", 10)
    fd = write_handover("x" * 11)
    with pytest.raises(HandoverError, match="over 10"):
        read_handover(str(fd))
