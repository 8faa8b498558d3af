"""capsuled.peer: field 22 of /proc/PID/stat, whatever the process named itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsuled.peer import parse_start_time, read_start_time

# After comm: state, then fields 4..21, then 22 (starttime) = 777, then a few more.
TAIL = b"S " + b" ".join(str(n).encode() for n in range(4, 22)) + b" 777 8 9 10\n"


@given(st.binary(max_size=16).filter(lambda b: b"\n" not in b))
def test_any_comm_leaves_field_22_in_place(comm: bytes) -> None:
    assert parse_start_time(b"4242 (" + comm + b") " + TAIL) == 777


def test_a_comm_that_forges_fields() -> None:
    forged = b"4242 () S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 1 20) " + TAIL
    assert parse_start_time(forged) == 777


@pytest.mark.parametrize(
    "stat", [b"", b"4242 (x S 1 2", b"4242 (x) S 1 2 3", b"1 (x) " + b"y " * 30]
)
def test_malformed_lines_are_value_errors(stat: bytes) -> None:
    with pytest.raises(ValueError, match=r"comm field|too short|invalid literal"):
        parse_start_time(stat)


def test_read_from_a_proc_directory(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_bytes(b"7 (a) b) " + TAIL)
    assert read_start_time(7, proc=str(tmp_path)) == 777
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "stat").write_bytes(b"8 (cut")
    for pid in (8, 9):  # unparsable, absent: both mean "not that process"
        with pytest.raises(ProcessLookupError):
            read_start_time(pid, proc=str(tmp_path))


def test_read_this_process() -> None:
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        expected = int(f.read().rsplit(b")", 1)[1].split()[19])
    assert read_start_time(os.getpid()) == expected
