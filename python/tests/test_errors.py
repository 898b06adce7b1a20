# tests/test_errors.py: the binding's errors and the client's life without a server: bad arguments raise the
# right TetherError subclass (with the library's message), a closed client refuses calls, close and free behave,
# and events (connect failures) come through next_event, iteration and asyncio. Servers are loopback ports
# nothing listens on.
import asyncio
import re
import socket
import threading
import time

import pytest

import tether
from tether import EventKind, Status


def dead_port() -> str:
    """host:port of a loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def client(name="tester", **kw):
    kw.setdefault("reconnect", (50, 200, 0, 0))
    return tether.Client(name, servers=[dead_port()], **kw)


def wait_for(c, kind, within=5.0):
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {kind.name} event within {within} s")
        ev = c.next_event(timeout=left)
        if ev is not None and ev.kind == kind:
            return ev


def drain(c, within=5.0):
    """Every event left, until the end (ClosedError with Status.CLOSED), within a deadline."""
    events, deadline = [], time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"events did not end within {within} s: {events}")
        try:
            ev = c.next_event(timeout=left)
        except tether.ClosedError as e:
            assert e.code == Status.CLOSED
            return events
        if ev is not None:
            events.append(ev)


def test_library_facts():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", tether.version())
    assert tether.library_path.endswith(".so")
    assert tether.status_text(Status.ERR_FULL) == "queue full"
    assert tether.status_text(Status.OK) == "ok"
    assert tether.status_text(12345) == "unknown status"
    assert {s.value for s in Status} == set(range(-9, 3))


@pytest.mark.parametrize("bad", ["", "x" * 129])
def test_bad_ids_are_invalid(bad):
    with pytest.raises(tether.InvalidArgument) as info:
        tether.Client(bad, servers=[dead_port()])
    assert info.value.code == Status.ERR_INVALID
    assert "client_id" in info.value.message
    assert tether.last_error() == info.value.message
    assert isinstance(info.value, ValueError) and isinstance(info.value, tether.TetherError)


@pytest.mark.parametrize("bad", [b"\xff\xfe", "\ud800"])
def test_ids_not_utf8(bad):
    with pytest.raises(tether.Utf8Error) as info:
        tether.Client(bad, servers=[dead_port()])
    assert info.value.code == Status.ERR_UTF8


def test_id_types_and_nul():
    with pytest.raises(TypeError):
        tether.Client(42, servers=[dead_port()])
    with pytest.raises(tether.InvalidArgument):
        tether.Client("a\0b", servers=[dead_port()])
    with client("y" * 128):  # the longest id is fine
        pass


@pytest.mark.parametrize("servers", [[], ["no-port"], ["127.0.0.1:notaport"]])
def test_bad_servers(servers):
    with pytest.raises(tether.InvalidArgument) as info:
        tether.Client("tester", servers=servers)
    assert info.value.message


@pytest.mark.parametrize(
    "kw",
    [
        {"reconnect": (0, 100, 0, 0)},
        {"reconnect": (200, 100, 0, 0)},
        {"reconnect": (100, 200)},
        {"heartbeat_ms": -1},
        {"heartbeat_ms": 1 << 32},
        {"max_events": 0},
        {"held_sends": -5},
        {"reliable": (-1, False)},
        {"reliable": (10,)},
    ],
)
def test_bad_settings(kw):
    with pytest.raises(tether.InvalidArgument):
        tether.Client("tester", servers=[dead_port()], **kw)


def test_bad_tls(tmp_path):
    with pytest.raises(tether.TlsError) as info:
        tether.Client("tester", servers=[dead_port()], tls_ca_file=tmp_path / "missing.pem")
    assert info.value.code == Status.ERR_TLS and "missing.pem" in info.value.message
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    with pytest.raises(tether.TlsError):
        tether.Client("tester", servers=[dead_port()], tls_ca_file=empty)
    with client(tls=True, tls_server_name="tether.example"):  # the system's store: fine to configure
        pass


def test_bad_calls_on_a_live_client():
    with client() as c:
        with pytest.raises(tether.TooLargeError) as info:
            c.send("bob", bytes(1 << 20))
        assert info.value.code == Status.ERR_TOO_LARGE
        with pytest.raises(tether.InvalidArgument):
            c.send("x" * 129, b"hi")
        with pytest.raises(TypeError):
            c.send("bob", "not bytes")
        with pytest.raises(tether.InvalidArgument):
            c.subscribe("")
        with pytest.raises(tether.InvalidArgument):
            c.unsubscribe("x" * 129)
        with pytest.raises(tether.Utf8Error):
            c.subscribe(b"\xc3")
        with pytest.raises(tether.InvalidArgument):
            c.next_event(timeout=-1)
        with pytest.raises(TypeError):
            c.next_event(timeout="soon")
        assert c.send("bob", bytearray(b"held")) == 0  # disconnected: held (not reliable: no number)
        assert c.send(None, memoryview(b"to the server's application")) == 0
        c.subscribe("bob")
        c.unsubscribe("bob")


def test_held_sends_full():
    with client(held_sends=2) as c:
        c.send("bob", b"1")
        c.send("bob", b"2")
        with pytest.raises(tether.FullError) as info:
            c.send("bob", b"3")
        assert info.value.code == Status.ERR_FULL
    with client(held_sends=0) as c:
        with pytest.raises(tether.FullError):
            c.send("bob", b"refused while disconnected")


def test_reliable_window_and_numbers():
    with client(reliable=(2, True)) as c:
        assert c.send("bob", b"one") == 1
        assert c.send("bob", b"two") == 2
        with pytest.raises(tether.FullError):
            c.send("bob", b"three")


def test_events_without_a_server():
    c = client()
    try:
        failed = wait_for(c, EventKind.CONNECT_FAILED)
        assert failed.server == c.servers[0] and failed.text
        again = wait_for(c, EventKind.RECONNECTING)
        assert again.attempt >= 1 and again.server == c.servers[0]
        assert "RECONNECTING" in repr(again) and hash(again) == hash(again)
        with pytest.raises(AttributeError):
            again.attempt = 9  # events are frozen copies
    finally:
        c.free()


def test_closed_client_refuses_calls():
    c = client()
    assert c.close(timeout=3) is True
    assert c.closed
    with pytest.raises(tether.ClosedError) as info:
        c.close()
    assert info.value.code == Status.ERR_CLOSED and info.value.message
    for call in (lambda: c.send("bob", b"x"), lambda: c.subscribe("bob"), lambda: c.unsubscribe("bob")):
        with pytest.raises(tether.ClosedError) as info:
            call()
        assert info.value.code == Status.ERR_CLOSED
    drain(c)  # the events left, then the end
    with pytest.raises(tether.ClosedError):
        c.next_event(timeout=1)
    assert list(c) == []
    c.free()
    c.free()  # idempotent
    with pytest.raises(tether.ClosedError):
        c.send("bob", b"x")
    with pytest.raises(tether.ClosedError):
        c.next_event(timeout=0)
    with pytest.raises(tether.ClosedError):
        c.close()


def test_context_manager_closes_and_frees():
    with client() as c:
        wait_for(c, EventKind.CONNECT_FAILED)
    assert c.closed
    with pytest.raises(tether.ClosedError):
        c.send("bob", b"x")
    with client() as c:
        c.close()  # closing inside the block is fine too
    with pytest.raises(tether.ClosedError):
        c.subscribe("bob")


def test_iteration_ends_when_another_thread_closes():
    c = client()
    seen, done = [], threading.Event()

    def pull():
        for ev in c:
            seen.append(ev)
        done.set()

    t = threading.Thread(target=pull)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            done.wait(0.05)  # waiting for the puller to report, bounded
        assert seen, "no event pulled by the thread"
        c.close()
        assert done.wait(5), "iteration did not end after close"
    finally:
        t.join(5)
        c.free()
    assert all(isinstance(ev, tether.Event) for ev in seen)


def test_asyncio():
    async def main():
        c = client()
        try:
            ev = await c.next_event_async(timeout=5)
            assert ev is not None and ev.kind in (EventKind.CONNECT_FAILED, EventKind.RECONNECTING)
            c.close()
            kinds = []

            async def rest():
                async for e in c.events():
                    kinds.append(e.kind)

            await asyncio.wait_for(rest(), 5)
            with pytest.raises(tether.ClosedError):
                await c.next_event_async(timeout=1)
        finally:
            c.free()

    asyncio.run(main())


def test_asyncio_timeout_returns_none():
    async def main():
        with tether.Client("tester", servers=[dead_port()], reconnect=(60000, 60000, 0, 0)) as c:
            await c.next_event_async(timeout=5)  # the first failure, then a minute of silence
            while (ev := await c.next_event_async(timeout=0.3)) is not None:
                assert ev.kind != EventKind.CONNECTED
            assert await c.next_event_async(timeout=0) is None

    asyncio.run(main())


def test_gave_up():
    with client(reconnect=(20, 20, 1, 0)) as c:
        ev = wait_for(c, EventKind.GAVE_UP)
        assert ev.attempt >= 1
        with pytest.raises(tether.ClosedError):
            c.send("bob", b"x")
        c.close()
        drain(c)


def test_gave_up_ends_the_events():
    with client(reconnect=(20, 20, 1, 0)) as c:
        wait_for(c, EventKind.GAVE_UP)
        drain(c, within=2)
