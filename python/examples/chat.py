#!/usr/bin/env python3
"""A console chat between two ids over tether, with presence (the Python twin of examples/c/chat.c):

    python chat.py alice bob 127.0.0.1:7400 [backup:port ...]

Each line typed is sent to the peer; what the peer says, whether it is online, and the state of the link are
printed as they happen. Events are pulled on a thread of this program's own; the main thread reads stdin.
"""
import sys
import threading

import tether
from tether import EventKind, PresenceState


def print_events(client: tether.Client) -> None:
    for ev in client:  # ends once the client is closed and every event was taken
        if ev.kind == EventKind.CONNECTED:
            print(f"* connected to {ev.server}")
        elif ev.kind == EventKind.DISCONNECTED:
            print(f"* disconnected from {ev.server}: {ev.reason}")
        elif ev.kind == EventKind.CONNECT_FAILED:
            print(f"* could not connect to {ev.server}: {ev.text} (retrying)")
        elif ev.kind == EventKind.GAVE_UP:
            print(f"* gave up reconnecting: {ev.reason}")
        elif ev.kind == EventKind.PRESENCE:
            state = {PresenceState.ONLINE: "online", PresenceState.SUSPECT: "suspect"}.get(ev.state, "offline")
            print(f"* {ev.peer} is {state}{': ' + ev.reason if ev.reason else ''}")
        elif ev.kind == EventKind.DATA:
            print(f"{ev.peer}> {ev.data.decode('utf-8', 'replace')}")
        elif ev.kind == EventKind.UNDELIVERABLE:
            print(f"* not delivered to {ev.peer}: {ev.reason}")
        sys.stdout.flush()


def main(argv) -> int:
    if len(argv) < 4:
        print(f"usage: {argv[0]} ME PEER HOST:PORT [BACKUP:PORT ...]", file=sys.stderr)
        return 2
    me, peer, servers = argv[1], argv[2], argv[3:]
    try:
        client = tether.Client(me, servers=servers)
    except tether.TetherError as e:
        print(e, file=sys.stderr)
        return 2
    with client:
        client.subscribe(peer)
        events = threading.Thread(target=print_events, args=(client,), daemon=True)
        events.start()
        try:
            for line in sys.stdin:
                try:
                    client.send(peer, line.rstrip("\n").encode())
                except tether.TetherError as e:
                    print(f"* not sent: {e}")
        except KeyboardInterrupt:
            pass
        client.close(timeout=2)  # the event thread sees the end and stops
        events.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
