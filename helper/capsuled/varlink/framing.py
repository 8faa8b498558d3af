"""Varlink framing: one JSON object per message, each terminated by a NUL byte (UAPI.20).

The buffer enforces the message size cap itself (systemd's VARLINK_BUFFER_MAX is 16 MiB), and it
remembers how far it already searched for a NUL, so a message arriving one byte at a time costs
linear time, not quadratic (h11's ReceiveBuffer does the same for CRLF).
"""

from __future__ import annotations

from capsuled.varlink.errors import RemoteProtocolError

__all__ = ["MAX_MESSAGE_BYTES", "MessageBuffer"]

# systemd src/libsystemd/sd-varlink/varlink-internal.h: VARLINK_BUFFER_MAX (16 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class MessageBuffer:
    """Accumulates received bytes and splits them into NUL-terminated messages."""

    __slots__ = ("_buf", "_error", "_max", "_searched")

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self._buf = bytearray()
        self._searched = 0  # bytes of _buf already known to hold no NUL
        self._max = max_message_bytes
        self._error = False

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def max_message_bytes(self) -> int:
        """The largest message (without its NUL) this buffer accepts."""
        return self._max

    def feed(self, data: bytes | memoryview) -> None:
        """Append received bytes (copied: the caller may reuse its buffer)."""
        self._buf += data

    def next_message(self) -> bytes | None:
        """Return the next complete message without its NUL, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: a message (complete or not) is already larger than the cap.
                The buffer stays broken afterwards: the stream cannot be resynchronised.
        """
        if self._error:
            raise RemoteProtocolError("message buffer is in an error state")
        end = self._buf.find(b"\0", self._searched)
        if end < 0:
            self._searched = len(self._buf)
            if len(self._buf) > self._max:
                self._error = True
                raise RemoteProtocolError(f"message exceeds {self._max} bytes")
            return None
        if end > self._max:
            self._error = True
            raise RemoteProtocolError(f"message exceeds {self._max} bytes")
        message = bytes(self._buf[:end])
        # bytearray deletes from the front in O(1) (it moves its start pointer), so pipelined
        # messages do not make the rest of the buffer get copied each time.
        del self._buf[: end + 1]
        self._searched = 0
        return message
