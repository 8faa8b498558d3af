"""capsuled.varlink.framing: bytes in, messages out; the cap; linear search."""

from __future__ import annotations

import pytest

from capsuled.varlink.errors import RemoteProtocolError
from capsuled.varlink.framing import MAX_MESSAGE_BYTES, MessageBuffer

STREAM = b'{"method":"a.b.C"}\0{"method":"a.b.D","parameters":{"x":"\xc3\xa9"}}\0\0{}\0'
MESSAGES = [b'{"method":"a.b.C"}', b'{"method":"a.b.D","parameters":{"x":"\xc3\xa9"}}', b"", b"{}"]


def _drain(buf: MessageBuffer) -> list[bytes]:
    out = []
    while (msg := buf.next_message()) is not None:
        out.append(msg)
    return out


def test_max_is_sixteen_mib() -> None:
    assert MAX_MESSAGE_BYTES == 16 * 1024 * 1024


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_every_split_point(cut: int) -> None:
    buf = MessageBuffer()
    buf.feed(STREAM[:cut])
    got = _drain(buf)
    buf.feed(STREAM[cut:])
    got += _drain(buf)
    assert got == MESSAGES
    assert len(buf) == 0


def test_byte_by_byte() -> None:
    buf = MessageBuffer()
    got = []
    for i in range(len(STREAM)):
        buf.feed(STREAM[i : i + 1])
        got += _drain(buf)
    assert got == MESSAGES


def test_search_resumes_where_it_stopped() -> None:
    # White-box: the buffer must not rescan bytes it already knows hold no NUL (h11's
    # ReceiveBuffer trick), else a trickled message costs quadratic time.
    buf = MessageBuffer()
    for i in range(1, 1000):
        buf.feed(b"x")
        assert buf.next_message() is None
        assert buf._searched == i
    buf.feed(b"\0")
    assert buf.next_message() == b"x" * 999
    assert buf._searched == 0


@pytest.mark.parametrize("cap", [1, 10, 100])
def test_exactly_at_the_cap_and_one_over(cap: int) -> None:
    buf = MessageBuffer(cap)
    buf.feed(b"a" * cap)
    assert buf.next_message() is None  # incomplete, but not over the cap yet
    buf.feed(b"\0")
    assert buf.next_message() == b"a" * cap
    buf.feed(b"a" * (cap + 1) + b"\0")
    with pytest.raises(RemoteProtocolError):
        buf.next_message()


def test_incomplete_message_over_the_cap_fails_without_waiting_for_the_nul() -> None:
    buf = MessageBuffer(10)
    buf.feed(b"a" * 11)
    with pytest.raises(RemoteProtocolError):
        buf.next_message()


def test_broken_buffer_stays_broken() -> None:
    buf = MessageBuffer(4)
    buf.feed(b"aaaaa\0{}\0")
    with pytest.raises(RemoteProtocolError):
        buf.next_message()
    with pytest.raises(RemoteProtocolError):
        buf.next_message()


def test_full_size_cap() -> None:
    buf = MessageBuffer()
    buf.feed(b"a" * MAX_MESSAGE_BYTES + b"\0")
    assert len(buf.next_message() or b"") == MAX_MESSAGE_BYTES
    buf.feed(b"a" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(RemoteProtocolError):
        buf.next_message()


def test_invalid_cap() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MessageBuffer(0)
