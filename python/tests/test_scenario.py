# tests/test_scenario.py: the libtether scenario in Python (see scripts/test-clients and examples/c/scenario.c):
# alice and bob, each with a primary and a backup server, see each other, talk, survive the primary's SIGSTOP by
# failing over, and close cleanly. Then the same pair through asyncio, on the backup.
# Needs TETHER_PRIMARY, TETHER_BACKUP (host:port) and TETHER_PRIMARY_PID; skipped without them.
import asyncio
import os
import signal
import time

import pytest

import tether
from tether import EventKind, PresenceState, Status

PRIMARY = os.environ.get("TETHER_PRIMARY")
BACKUP = os.environ.get("TETHER_BACKUP")
PRIMARY_PID = os.environ.get("TETHER_PRIMARY_PID")

pytestmark = pytest.mark.skipif(
    not (PRIMARY and BACKUP and PRIMARY_PID),
    reason="needs running servers: set TETHER_PRIMARY, TETHER_BACKUP and TETHER_PRIMARY_PID "
    "(scripts/test-clients python does)",
)


def now_ms() -> float:
    return time.monotonic() * 1000


def start(name, servers=None):
    # Reconnect after 100 ms at first; stay on the backup once there.
    return tether.Client(name, servers=servers or [PRIMARY, BACKUP], heartbeat_ms=500, reconnect=(100, 2000, 0, 0))


def wait_for(c, who, kind, peer=None, data=None, state=None, within_ms=5000):
    """Pull `who`'s events until one of `kind` matches (peer, data, state when given), within the deadline."""
    deadline = now_ms() + within_ms
    while True:
        left = deadline - now_ms()
        if left <= 0:
            pytest.fail(f"{who}: no {kind.name} event (peer {peer or '-'}) within {within_ms:.0f} ms")
        ev = c.next_event(timeout=left / 1000)
        if ev is None:
            continue
        if ev.kind == EventKind.DISCONNECTED:
            print(f"{who}: disconnected from {ev.server}: {ev.reason} (by server: {ev.flag})")
        if ev.kind == EventKind.CONNECTED:
            print(f"{who}: connected to {ev.server}")
        if ev.kind != kind:
            continue
        if peer is not None and ev.peer != peer:
            continue
        if state is not None and ev.state != state:
            continue
        if data is not None and ev.data != data:
            continue
        return ev


def talk(alice, bob, round_):
    a, b = f"hello bob ({round_})".encode(), f"hello alice ({round_})".encode()
    alice.send("bob", a)
    wait_for(bob, "bob", EventKind.DATA, peer="alice", data=a)
    bob.send("alice", b)
    wait_for(alice, "alice", EventKind.DATA, peer="bob", data=b)
    print(f"exchanged messages ({round_})")


def close_client(c, who):
    assert c.close(timeout=3) is True, f"{who}: close did not finish"
    with pytest.raises(tether.ClosedError) as info:
        c.close(timeout=3)
    assert info.value.code == Status.ERR_CLOSED, f"{who}: a second close was not refused"
    with pytest.raises(tether.ClosedError) as info:
        c.send("x", b"x")
    assert info.value.code == Status.ERR_CLOSED, f"{who}: send after close"
    saw_bye, deadline = False, now_ms() + 3000
    while True:
        left = deadline - now_ms()
        assert left > 0, f"{who}: events did not end with TETHER_CLOSED"
        try:
            ev = c.next_event(timeout=left / 1000)
        except tether.ClosedError as e:
            assert e.code == Status.CLOSED
            break
        if ev is not None and ev.kind == EventKind.DISCONNECTED and ev.reason == "bye":
            saw_bye = True
    assert saw_bye, f"{who}: no disconnected(bye) after close"
    c.free()


def test_scenario():
    alice, bob = start("alice"), start("bob")
    try:
        # 1. Connect to the primary, with a backup configured.
        ev = wait_for(alice, "alice", EventKind.CONNECTED)
        assert ev.server == PRIMARY and ev.flag == 1, f"alice connected to {ev.server}, not the primary"
        timeout_ms = ev.timeout_ms
        wait_for(bob, "bob", EventKind.CONNECTED)

        # 2. Subscribe to the peer and see it online.
        alice.subscribe("bob")
        wait_for(alice, "alice", EventKind.PRESENCE, peer="bob", state=PresenceState.ONLINE)
        print("alice sees bob online")

        # 3. Exchange messages.
        talk(alice, bob, "primary")

        # 4. Stop the primary: the death is the client's heartbeat verdict, and both move to the backup.
        os.kill(int(PRIMARY_PID), signal.SIGSTOP)
        stopped_at = now_ms()
        bound = timeout_ms + 2000
        ev = wait_for(alice, "alice", EventKind.DISCONNECTED, within_ms=bound)
        assert (ev.reason, ev.flag, ev.server) == ("heartbeat_timeout", 0, PRIMARY), (
            f"alice: disconnected with {ev.reason} (by server: {ev.flag}) from {ev.server}"
        )
        ev = wait_for(alice, "alice", EventKind.CONNECTED, within_ms=bound - (now_ms() - stopped_at))
        assert ev.server == BACKUP and ev.flag == 0, f"alice reconnected to {ev.server}, not the backup"
        print(f"alice failed over to the backup {now_ms() - stopped_at:.0f} ms after the SIGSTOP (bound {bound} ms)")
        wait_for(alice, "alice", EventKind.PRESENCE, peer="bob", state=PresenceState.ONLINE)
        print("alice sees bob online on the backup")
        talk(alice, bob, "backup")

        # 5. Close cleanly.
        close_client(alice, "alice")
        close_client(bob, "bob")
        print("python scenario passed")
    finally:
        alice.free()
        bob.free()


def test_scenario_asyncio():
    """The same conversation through asyncio (next_event_async, events()), on the backup only."""

    async def wait_async(c, kind, peer=None, data=None, within=5.0):
        async def match():
            async for ev in c.events():
                if ev.kind == kind and (peer is None or ev.peer == peer) and (data is None or ev.data == data):
                    return ev
            pytest.fail(f"{c.id}: events ended before {kind.name}")

        return await asyncio.wait_for(match(), within)

    async def main():
        with start("carol", [BACKUP]) as carol, start("dave", [BACKUP]) as dave:
            ev = await wait_async(carol, EventKind.CONNECTED)
            assert ev.server == BACKUP and ev.flag == 1  # the only server is its primary
            await wait_async(dave, EventKind.CONNECTED)
            carol.subscribe("dave")
            await wait_async(carol, EventKind.PRESENCE, peer="dave")

            async def say_hi():
                carol.send("dave", b"hi dave")

            # dave waits while carol sends, on one loop: dave is woken by his client's wake-up.
            got, _ = await asyncio.gather(wait_async(dave, EventKind.DATA, peer="carol", data=b"hi dave"), say_hi())
            dave.send("carol", got.data.upper())
            await wait_async(carol, EventKind.DATA, peer="dave", data=b"HI DAVE")
            assert carol.close(timeout=3)

            async def rest():
                return [ev.kind async for ev in carol.events()]

            kinds = await asyncio.wait_for(rest(), 3)
            assert EventKind.DISCONNECTED in kinds
        print("python asyncio exchange passed")

    asyncio.run(main())


def test_reliable_on_the_backup():
    """A reliable session with receipts: numbered sends, ACKED, and DELIVERED with the numbers (seqs)."""
    servers = [BACKUP]
    with tether.Client("erin", servers=servers, reliable=(0, True)) as erin, tether.Client(
        "frank", servers=servers, reliable=True
    ) as frank:
        ev = wait_for(erin, "erin", EventKind.CONNECTED)
        assert ev.reason in ("new", "fresh"), f"erin: not a reliable session: {ev}"
        wait_for(frank, "frank", EventKind.CONNECTED)
        seqs = [erin.send("frank", f"message {i}".encode()) for i in range(3)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] >= 1
        for i in range(3):
            wait_for(frank, "frank", EventKind.DATA, peer="erin", data=f"message {i}".encode())
        delivered, acked, deadline = set(), 0, now_ms() + 5000
        while (acked < seqs[-1] or delivered != set(seqs)) and now_ms() < deadline:
            ev = erin.next_event(timeout=(deadline - now_ms()) / 1000)
            if ev is not None and ev.kind == EventKind.ACKED:
                acked = max(acked, ev.seq)
            if ev is not None and ev.kind == EventKind.DELIVERED:
                assert ev.peer == "frank"
                delivered.update(ev.seqs)
        assert acked >= seqs[-1], f"erin: acknowledged up to {acked}, sent {seqs}"
        assert delivered == set(seqs), f"erin: receipts for {sorted(delivered)}, sent {seqs}"
        print(f"reliable: sent {seqs}, acknowledged and delivered")
