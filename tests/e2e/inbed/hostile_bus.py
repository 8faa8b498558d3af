"""What any system-bus client can send the helper, run as an unprivileged user in the testbed
(tests/e2e/test_limits.py).

    python3 -m e2e.inbed.hostile_bus PID SIZE COUNT

Finds the helper's unique name on the system bus (the connection whose process is PID: anyone
can ask with ListNames + GetConnectionUnixProcessID), sends it COUNT unicast signals of SIZE
bytes each, then calls the bus daemon once (its reply, after the signals, proves they were all
delivered: dbus-daemon keeps a connection's messages in order). Prints {"target": NAME} or
{"target": null} if the helper has no bus connection.
"""

from __future__ import annotations

import json
import sys

from jeepney import DBusAddress, HeaderFields, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection


def main(pid: int, size: int, count: int) -> dict[str, object]:
    with open_dbus_connection(bus="SYSTEM") as bus:
        names = bus.send_and_get_reply(message_bus.ListNames()).body[0]
        target = None
        for name in names:
            if not name.startswith(":"):
                continue
            reply = bus.send_and_get_reply(message_bus.GetConnectionUnixProcessID(name))
            if reply.body and reply.body[0] == pid:
                target = name
                break
        if target is None:
            return {"target": None}
        # Shaped like PID 1's own JobRemoved, but unicast from us: the helper must judge it on
        # its header (sender, destination) and skip it unread.
        emitter = DBusAddress(
            "/org/freedesktop/systemd1", interface="org.freedesktop.systemd1.Manager"
        )
        for _ in range(count):
            msg = new_signal(emitter, "JobRemoved", "uoss", (1, "/j/1", "x" * size, "done"))
            msg.header.fields[HeaderFields.destination] = target
            bus.send(msg)
        bus.send_and_get_reply(message_bus.GetId())
        return {"target": target}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))), flush=True)
