"""A cheap pre-scan of a JSON text's shape: how deep it nests and how many values it holds.

`json.loads` builds every value before anyone can look at it. An 8 MiB message of tiny objects
(`[{},{},...]`) became ~250 MiB of dicts and stalled the event loop for about a second in the
testbed (issue 11); a message nested 100,000 deep costs a RecursionError's worth of C stack. So
a server checks the shape first, on the bytes, with no Python loop over them: every step below is
one C-level pass (a regex substitution, bytes.translate, bytes.count, bytes.replace), so the scan
costs a few milliseconds per MiB whatever the text holds.

1. Drop every escaped backslash, then every escaped quote (two bytes.replace): in JSON a
   backslash occurs only inside strings, a run of them is read as pairs, and an odd one left
   over escapes the byte after it; so afterwards every ``"`` is a string delimiter.
2. Keep only the structural bytes ``"[]{},`` (bytes.translate).
3. Drop what lies between pairs of quotes: string contents, keys included. A string is a value
   or a key, and every key has a value, so more than ``4 * max_values`` quotes is refused before
   this step, which keeps its regex to a bounded number of matches.
4. Count: containers are ``[`` + ``{``. Every value but the root opens its container or
   follows a ``,``, so ``1 + containers + commas`` is the number of values, except that an
   empty ``[]`` or ``{}`` is counted twice (the bound errs on the side of refusing).
5. Depth: only needed when there are more containers than the depth limit. Remove the innermost
   ``[]``/``{}`` pairs, one level per round; whatever is left after `max_depth` rounds is nested
   deeper (or does not pair up, which is not JSON either).

The scan only ever refuses, and it never refuses well-formed JSON within the limits (counting
each empty container as two values); for broken input its counts may be anything, and json.loads
refuses that input anyway.
"""

from __future__ import annotations

import re

from capsuled.varlink.errors import RemoteProtocolError

__all__ = ["check_shape"]

_STRING = re.compile(rb'"[^"]*"')
_STRUCTURAL = b'"[]{},'
# Every byte that is not structural: bytes.translate(None, delete) removes them in one pass.
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _STRUCTURAL)
# One nesting level per substitution: both kinds of innermost pair in one left-to-right pass
# (replacing "[]" and then "{}" would peel two levels of "{[]}" at once).
_INNERMOST = re.compile(rb"\[\]|\{\}")


def check_shape(raw: bytes, *, max_depth: int, max_values: int) -> None:
    """Refuse a JSON text nested deeper than `max_depth` or holding more than `max_values`
    values, before it is parsed (see the module docstring).

    Raises:
        RemoteProtocolError: the text is too deep or too large in values.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = raw.translate(None, _NOT_STRUCTURAL)
    quotes = skeleton.count(b'"')
    if quotes > 4 * max_values:
        raise RemoteProtocolError(f"message holds more than {max_values} JSON values")
    if quotes:
        skeleton = _STRING.sub(b"", skeleton)
    containers = skeleton.count(b"[") + skeleton.count(b"{")
    if 1 + containers + skeleton.count(b",") > max_values:
        raise RemoteProtocolError(f"message holds more than {max_values} JSON values")
    if containers <= max_depth:
        return  # nesting needs a container per level
    brackets = skeleton.translate(None, b',"')
    for _ in range(max_depth):
        before = len(brackets)
        brackets = _INNERMOST.sub(b"", brackets)
        if not brackets or len(brackets) == before:
            break
    if brackets:
        # Nested deeper than max_depth, or brackets that do not pair up (not JSON either).
        raise RemoteProtocolError(f"message nests JSON deeper than {max_depth} levels")
