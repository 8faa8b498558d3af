"""Unit file checking: systemd's config_parse() lexing, our stricter policy, line numbers."""

from __future__ import annotations

import pytest

from capsuled.unitfile import (
    UNIT_FILE_MAX_BYTES,
    InvalidUnitFile,
    check_unit_file,
    parse_unit_file,
)

GOOD = b"""\
# A comment
; another comment
[Unit]
Description=Hello  from a capsule

[Service]
Type=oneshot
ExecStart=/bin/echo hello \\
    world
Environment=A=1 B=2

[Install]
WantedBy=capsule@.target default.target
"""


def test_good_unit_parses_with_sections_and_lines() -> None:
    unit = check_unit_file(GOOD, unit_name="hello.service")
    assert [(s.name, s.line) for s in unit.sections] == [
        ("Unit", 3),
        ("Service", 6),
        ("Install", 12),
    ]
    assert unit.values("Unit", "Description") == ["Hello  from a capsule"]
    # The backslash became a space and the next line was joined (leading spaces kept).
    assert unit.values("Service", "ExecStart") == ["/bin/echo hello      world"]
    assert unit.values("Service", "Environment") == ["A=1 B=2"]  # split at the first '='
    exec_start = unit.sections[1].assignments[1]
    assert (exec_start.key, exec_start.line) == ("ExecStart", 8)
    assert unit.install_info().wanted_by == ("capsule@.target", "default.target")


def test_comment_inside_continuation_is_dropped() -> None:
    unit = parse_unit_file(b"[Service]\nExecStart=/bin/a \\\n# not part of it\n  b\n")
    assert unit.values("Service", "ExecStart") == ["/bin/a    b"]


def test_escaped_backslash_does_not_continue() -> None:
    unit = parse_unit_file(b"[Service]\nExecStart=/bin/a \\\\\nType=simple\n")
    assert unit.values("Service", "ExecStart") == ["/bin/a \\\\"]
    assert unit.values("Service", "Type") == ["simple"]


def test_continuation_at_end_of_file() -> None:
    unit = parse_unit_file(b"[Service]\nExecStart=/bin/a \\")
    assert unit.values("Service", "ExecStart") == ["/bin/a"]


def test_crlf_cr_and_bom() -> None:
    unit = parse_unit_file(b"\xef\xbb\xbf[Unit]\r\nDescription=x\rAfter=y\n")
    assert unit.values("Unit", "Description") == ["x"]
    assert unit.values("Unit", "After") == ["y"]


def test_repeated_sections_and_x_sections() -> None:
    unit = check_unit_file(
        b"[Service]\nExecStart=/a\n[X-Mine]\nFoo=bar\n[Service]\nExecStart=/b\n",
        unit_name="a.service",
    )
    assert unit.values("Service", "ExecStart") == ["/a", "/b"]
    assert unit.values("X-Mine", "Foo") == ["bar"]


def test_empty_value_and_empty_wantedby_reset() -> None:
    unit = parse_unit_file(b"[Install]\nWantedBy=a.target b.target\nWantedBy=\nWantedBy=c.target\n")
    assert unit.install_info().wanted_by == ("c.target",)
    assert unit.install_info().also == ()


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        (b"Description=x\n[Unit]\n", 1, "outside of any section"),
        (b"# c\n\nDescription=x\n", 3, "outside of any section"),
        (b"[Unit]\nDescription\n", 2, "missing '='"),
        (b"[Unit]\n=x\n", 2, "missing key name"),
        (b"[Unit]\nDes cription=x\n", 2, "invalid key name"),
        (b"[Unit\nA=b\n", 1, "invalid section header"),
        (b"[Unit] # trailing\n", 1, "invalid section header"),
        (b"[]\n", 1, "empty section name"),
        (b'[Un"it]\n', 1, "bad characters"),
        (b"[Unit]\nA=\x1b[31m\n", 2, "U+001B"),
        (b"[Unit]\nA=b\n\nC=\xff\n", 4, "UTF-8"),
        (b"[Unit]\nA=b\nC=d\0\n", 3, "NUL"),
        (b"[Unit]\rA=b\r\nC=\xff\n", 3, "UTF-8"),
        # A continuation reports the line where the logical line starts.
        (b"[Unit]\nDescription=a \\\nb \\\nc\nbroken\n", 5, "missing '='"),
        (b"[Unit]\nbro\\\nken\n", 2, "missing '='"),
    ],
)
def test_errors_carry_line_numbers(content: bytes, line: int, fragment: str) -> None:
    with pytest.raises(InvalidUnitFile) as info:
        check_unit_file(content)
    assert info.value.line == line
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"line {line}: ")


def test_size_cap() -> None:
    body = b"[Unit]\nDescription=" + b"x" * (UNIT_FILE_MAX_BYTES - 20)
    padded = body + b"x" * (UNIT_FILE_MAX_BYTES - len(body))
    assert len(padded) == UNIT_FILE_MAX_BYTES
    check_unit_file(padded)
    with pytest.raises(InvalidUnitFile) as info:
        check_unit_file(padded + b"x")
    assert info.value.line is None
    assert "64" in info.value.reason or str(UNIT_FILE_MAX_BYTES) in info.value.reason
    with pytest.raises(InvalidUnitFile):
        check_unit_file(b"[Unit]\nA=bcdef\n", max_bytes=10)


@pytest.mark.parametrize(
    ("unit_name", "content", "ok"),
    [
        ("a.service", b"[Service]\nExecStart=/a\n", True),
        ("a.service", b"[Socket]\nListenStream=1\n", False),
        ("a.socket", b"[Socket]\nListenStream=1\n", True),
        ("a.timer", b"[Unit]\n[Timer]\nOnCalendar=daily\n", True),
        ("a.timer", b"[Service]\nExecStart=/a\n", False),
        ("a.target", b"[Unit]\nDescription=t\n", True),
        ("a.service", b"[Frobnicate]\nA=b\n", False),
    ],
)
def test_sections_must_fit_the_unit_type(unit_name: str, content: bytes, ok: bool) -> None:
    if ok:
        check_unit_file(content, unit_name=unit_name)
    else:
        with pytest.raises(InvalidUnitFile, match="does not belong"):
            check_unit_file(content, unit_name=unit_name)


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", b"# only a comment\n", b"[X-Only]\nA=b\n", b"\xef\xbb\xbf"]
)
def test_file_without_a_real_section_is_refused(content: bytes) -> None:
    with pytest.raises(InvalidUnitFile, match="no \\[Unit\\]") as info:
        check_unit_file(content, unit_name="a.service")
    assert info.value.line is None


def test_unknown_section_without_unit_name_is_accepted_if_a_known_one_exists() -> None:
    unit = check_unit_file(b"[Unit]\nA=b\n[Whatever]\nC=d\n")
    assert [s.name for s in unit.sections] == ["Unit", "Whatever"]


# Description= as systemd 257's PID 1 parsed these files (daemon-reload, then
# `systemctl show -P Description`), recorded in the testbed; our parser must agree.
SYSTEMD_257_DESCRIPTIONS = [
    (b"[Unit]\nDescription=a \\\n  b\n", "a    b"),
    (b"[Unit]\nDescription=a \\\n# comment\n; other\nb\n", "a  b"),
    (b"[Unit]\nDescription=a\\\\\n", "a\\\\"),  # two backslashes: no continuation
    (b"[Unit]\r\nDescription=  crlf value  \r\n", "crlf value"),
    (b"\xef\xbb\xbf[Unit]\nDescription=bom\n", "bom"),
    (b"[Unit]\nDescription=x \\\n\n[Service]\n", "x"),
    (b"[Unit]\nDescription=tab\there \\\n\tnext\n", "tab\there  \tnext"),
    (b"[Unit]\nDescription=last \\", "last"),
    (b"[Unit]\nDescription=one\nDescription=two = three\n", "two = three"),
]


@pytest.mark.parametrize(("content", "description"), SYSTEMD_257_DESCRIPTIONS)
def test_agrees_with_systemd_257(content: bytes, description: str) -> None:
    assert parse_unit_file(content).values("Unit", "Description")[-1] == description
