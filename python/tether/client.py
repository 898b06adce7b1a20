# tether/client.py: tether.Client, a reconnecting tether client over libtether (tether_config_*,
# tether_client_start, tether_send, tether_(un)subscribe, tether_next_event, tether_set_wakeup, tether_close,
# tether_free).
#
# Events are pulled with next_event() (blocking, with a timeout), by iterating over the client, or from asyncio
# (next_event_async(), events()): asyncio waits on tether_set_wakeup, whose callback (on the library's thread)
# only posts to the event loop with loop.call_soon_threadsafe.
import asyncio
import atexit
import itertools
import math
import os
import threading
import time
import weakref
from typing import AsyncIterator, Iterator, Optional, Sequence, Tuple, Union

from ._ffi import ffi, lib
from .errors import ClosedError, InvalidArgument, Status, check, error_for
from .events import Event, copy_event

__all__ = ["Client", "DEFAULT_HELD_SENDS", "DEFAULT_MAX_EVENTS"]

# The library's defaults for tether_config_set_queues (see tether_config_new), used when only one is given.
DEFAULT_HELD_SENDS = 1000
DEFAULT_MAX_EVENTS = 16384

_U32_MAX = 0xFFFFFFFF
_I32_MAX = 0x7FFFFFFF
# Longest single wait inside the library: waits for ever are made of these, so that Ctrl-C, free() and other
# threads get their turn. An event ends a wait at once; this is not a polling delay.
_SLICE_MS = 250

# Wake-up callbacks, by key: the one C callback below looks the client's up, so nothing the library may still
# call (tether_set_wakeup(NULL) does not wait for a call already under way) is ever freed.
_wakers = {}
_keys = itertools.count(1)


@ffi.callback("tether_wakeup_fn")
def _on_wakeup(user):
    # On the library's thread: must return quickly and must not call into the library.
    waker = _wakers.get(int(ffi.cast("uintptr_t", user)))
    if waker is not None:
        try:
            waker()
        except Exception:  # noqa: BLE001 (an event loop already closed: nobody to wake)
            pass


def _release(ptr, key):
    """Free a client's handle: stop its wake-ups first, so the library never calls into a finalized Python."""
    if _wakers.pop(key, None) is not None:
        lib.tether_set_wakeup(ptr, ffi.NULL, ffi.NULL)
    lib.tether_free(ptr)


def _stop_wakeups():
    # At exit, before the interpreter goes: the library's thread outlives it.
    for client in list(_live):
        client._stop_wakeup()


_live = weakref.WeakSet()
atexit.register(_stop_wakeups)


def _cstr(value, what: str, *, optional: bool = False):
    """A Python string (or UTF-8 bytes, or a path) for a `const char *` argument; None is NULL when optional."""
    if value is None and optional:
        return ffi.NULL
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        # Lone surrogates pass through, so that the library's own check reports them (Utf8Error).
        value = value.encode("utf-8", "surrogatepass")
    elif not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if b"\0" in value:
        raise InvalidArgument(Status.ERR_INVALID, f"{what} contains a NUL character")
    return bytes(value)


def _u32(value, what: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U32_MAX:
        raise InvalidArgument(Status.ERR_INVALID, f"{what} {value} is out of range (0 to {_U32_MAX})")
    return int(value)


def _seconds_to_ms(timeout, what: str, limit: int) -> int:
    if not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(timeout).__name__}")
    if timeout < 0 or math.isnan(timeout):
        raise InvalidArgument(Status.ERR_INVALID, f"{what} {timeout} must be 0 or more seconds (None: no limit)")
    return min(math.ceil(timeout * 1000), limit)


class Client:
    """A tether client: it connects to the first of `servers` (the primary; the others are backups), stays
    connected, reconnects and fails over in the background, and reports what happens as events.

    Client(id, servers=["127.0.0.1:7400", "127.0.0.1:7401"], heartbeat_ms=500)

    - heartbeat_ms: the heartbeat interval to ask for (0: the server's).
    - token: the credential sent in HELLO (from `tether token`).
    - tls, tls_ca_file, tls_server_name: connect with TLS (tls=True alone trusts the system's store; either of
      the other two implies TLS): a PEM file of authorities (or the server's own certificate), the name to check.
    - reconnect: (initial_ms, max_ms, max_attempts, return_to_primary_ms); max_attempts 0 retries for ever,
      return_to_primary_ms 0 stays on a backup until the next reconnect.
    - held_sends: sends held while disconnected (0 refuses them); max_events: events waiting to be pulled.
    - reliable: None, True, or (window, receipts): every message kept until acknowledged, resent after a
      reconnect, and reported (ACKED, DELIVERED with receipts, NOT_DELIVERED, IN_DOUBT).
    - adaptive_heartbeat: (floor_ms, ceiling_ms, margin_percent): learn the longest heartbeat the path's NATs
      allow (replaces heartbeat_ms); each change in a session is a HEARTBEAT event.

    Methods raise TetherError subclasses (InvalidArgument, TooLargeError, FullError, ClosedError, ...).
    close() says goodbye; the events left can still be pulled until the end. free() (or leaving a `with`
    block, or garbage collection) releases the handle.
    """

    def __init__(
        self,
        id: Union[str, bytes],  # noqa: A002 (the client's id, as the protocol calls it)
        servers: Sequence[str] = (),
        *,
        heartbeat_ms: Optional[int] = None,
        token: Optional[str] = None,
        tls: bool = False,
        tls_ca_file: Optional[Union[str, os.PathLike]] = None,
        tls_server_name: Optional[str] = None,
        reconnect: Optional[Tuple[int, int, int, int]] = None,
        held_sends: Optional[int] = None,
        max_events: Optional[int] = None,
        reliable: Union[None, bool, Tuple[int, bool]] = None,
        adaptive_heartbeat: Optional[Tuple[int, int, int]] = None,
    ):
        if isinstance(servers, (str, bytes)):
            servers = [servers]
        self._ptr = None
        cfg_out = ffi.new("tether_config **")
        check(lib.tether_config_new(_cstr(id, "id"), cfg_out))
        cfg = cfg_out[0]
        try:
            for server in servers:
                check(lib.tether_config_add_server(cfg, _cstr(server, "server")))
            if token is not None:
                check(lib.tether_config_set_token(cfg, _cstr(token, "token")))
            if heartbeat_ms is not None:
                check(lib.tether_config_set_heartbeat(cfg, _u32(heartbeat_ms, "heartbeat_ms")))
            if tls or tls_ca_file is not None or tls_server_name is not None:
                ca = _cstr(tls_ca_file, "tls_ca_file", optional=True)
                name = _cstr(tls_server_name, "tls_server_name", optional=True)
                check(lib.tether_config_set_tls(cfg, ca, name))
            if reconnect is not None:
                if len(reconnect) != 4:
                    raise InvalidArgument(
                        Status.ERR_INVALID, "reconnect is (initial_ms, max_ms, max_attempts, return_to_primary_ms)"
                    )
                names = ("initial_ms", "max_ms", "max_attempts", "return_to_primary_ms")
                check(lib.tether_config_set_reconnect(cfg, *(_u32(v, n) for v, n in zip(reconnect, names))))
            if held_sends is not None or max_events is not None:
                held = DEFAULT_HELD_SENDS if held_sends is None else _u32(held_sends, "held_sends")
                events = DEFAULT_MAX_EVENTS if max_events is None else _u32(max_events, "max_events")
                check(lib.tether_config_set_queues(cfg, held, events))
            if reliable is not None and reliable is not False:
                if reliable is not True and len(reliable) != 2:
                    raise InvalidArgument(Status.ERR_INVALID, "reliable is None, True or (window, receipts)")
                window, receipts = (0, False) if reliable is True else reliable
                check(lib.tether_config_set_reliable(cfg, _u32(window, "window"), 1 if receipts else 0))
            if adaptive_heartbeat is not None:
                if len(adaptive_heartbeat) != 3:
                    raise InvalidArgument(
                        Status.ERR_INVALID, "adaptive_heartbeat is (floor_ms, ceiling_ms, margin_percent)"
                    )
                names = ("floor_ms", "ceiling_ms", "margin_percent")
                args = (_u32(v, n) for v, n in zip(adaptive_heartbeat, names))
                check(lib.tether_config_set_adaptive_heartbeat(cfg, *args))
            out = ffi.new("tether_client **")
            check(lib.tether_client_start(cfg, out))
        finally:
            lib.tether_config_free(cfg)
        self._ptr = out[0]
        self.id = id if isinstance(id, str) else bytes(id).decode("utf-8", "replace")
        self.servers = list(servers)
        self._key = next(_keys)
        self._event = ffi.new("tether_event *")
        self._state = threading.Lock()  # guards _active, _freed, _closed
        self._idle = threading.Condition(self._state)
        self._active = 0  # calls under way (free() waits for them)
        self._freed = False
        self._closed = False
        self._pull_lock = threading.Lock()  # one puller at a time: a pull ends the life of the last event's pointers
        self._aio = None  # (loop, asyncio.Event) once asyncio waits on this client
        self._finalizer = weakref.finalize(self, _release, self._ptr, self._key)
        _live.add(self)

    def __repr__(self) -> str:
        state = "freed" if self._freed else "closed" if self._closed else "open"
        return f"<tether.Client {self.id!r} {self.servers} {state}>"

    # -- the handle's life: every call runs between _enter and _leave, so that free() can wait for them.

    def _enter(self):
        with self._state:
            if self._freed:
                raise ClosedError(Status.ERR_CLOSED, "the client was freed")
            self._active += 1
        return self._ptr

    def _leave(self):
        with self._state:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    @property
    def closed(self) -> bool:
        """True once close() or free() was called (the library may also have given up on its own: GAVE_UP)."""
        return self._closed or self._freed

    # -- sending and presence

    def send(self, to: Optional[str], data) -> int:
        """Send `data` (bytes or any buffer) to client `to` (None or "": the server's application). Returns the
        message's sequence number on a reliable session, else 0. Held while disconnected (FullError when the
        held sends, or the reliable window, are full); TooLargeError beyond what the server takes."""
        to_c = _cstr(to, "to", optional=True)
        if isinstance(data, str):
            raise TypeError("data must be bytes (encode the str first)")
        buf = ffi.from_buffer("uint8_t[]", data)
        seq = ffi.new("uint64_t *")
        ptr = self._enter()
        try:
            check(lib.tether_send(ptr, to_c, buf, len(buf), seq))
        finally:
            self._leave()
        return int(seq[0])

    def subscribe(self, id: str) -> None:  # noqa: A002
        """Follow the presence of client `id` ("*": everyone, where the server allows it): PRESENCE events.
        Kept across reconnects."""
        id_c = _cstr(id, "id")
        ptr = self._enter()
        try:
            check(lib.tether_subscribe(ptr, id_c))
        finally:
            self._leave()

    def unsubscribe(self, id: str) -> None:  # noqa: A002
        """Stop following the presence of `id`."""
        id_c = _cstr(id, "id")
        ptr = self._enter()
        try:
            check(lib.tether_unsubscribe(ptr, id_c))
        finally:
            self._leave()

    # -- events

    def _pull(self, timeout_ms: int, lock_timeout: float) -> Optional[Event]:
        """One tether_next_event, its event copied out under the pull lock; None if none came (or another
        thread held the turn for lock_timeout seconds). Raises ClosedError(CLOSED) at the end of the events."""
        ptr = self._enter()
        try:
            if lock_timeout > 0:
                got = self._pull_lock.acquire(timeout=lock_timeout)
            else:
                got = self._pull_lock.acquire(blocking=False)
            if not got:
                return None
            try:
                rc = lib.tether_next_event(ptr, timeout_ms, self._event)
                if rc == lib.TETHER_OK:
                    return copy_event(self._event)
                if rc == lib.TETHER_TIMEOUT:
                    return None
                if rc == lib.TETHER_CLOSED:
                    raise ClosedError(Status.CLOSED, "the client is closed and every event was taken")
                raise error_for(rc)
            finally:
                self._pull_lock.release()
        finally:
            self._leave()

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, waiting up to `timeout` seconds (None: as long as it takes; 0: do not wait).
        Returns None when none came in time; raises ClosedError (code Status.CLOSED) once the client is closed
        (or gave up) and every event was taken. One thread pulls at a time; others wait their turn."""
        if timeout is None:
            deadline = None
        else:
            _seconds_to_ms(timeout, "timeout", _I32_MAX)
            deadline = time.monotonic() + timeout
        while True:
            if deadline is None:
                wait_ms = _SLICE_MS
            else:
                wait_ms = max(0, min(_SLICE_MS, math.ceil((deadline - time.monotonic()) * 1000)))
            ev = self._pull(wait_ms, wait_ms / 1000)
            if ev is not None:
                return ev
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def __iter__(self) -> Iterator[Event]:
        """Every event, as it comes, until the client is closed and the last one was taken."""
        while True:
            try:
                ev = self.next_event()
            except ClosedError:
                return
            yield ev

    # -- asyncio: tether_set_wakeup posts to the running loop; the events are then pulled without waiting.

    def _wakeup_flag(self, loop) -> asyncio.Event:
        if self._aio is not None and self._aio[0] is loop:
            return self._aio[1]
        flag = asyncio.Event()

        def wake():
            loop.call_soon_threadsafe(flag.set)

        _wakers[self._key] = wake
        self._aio = (loop, flag)
        ptr = self._enter()
        try:
            check(lib.tether_set_wakeup(ptr, _on_wakeup, ffi.cast("void *", self._key)))
        finally:
            self._leave()
        return flag

    def _stop_wakeup(self):
        with self._state:
            if self._freed or _wakers.pop(self._key, None) is None:
                return
            self._active += 1
        try:
            lib.tether_set_wakeup(self._ptr, ffi.NULL, ffi.NULL)
            self._aio = None
        finally:
            self._leave()

    async def next_event_async(self, timeout: Optional[float] = None) -> Optional[Event]:
        """next_event() for asyncio: waits without blocking the loop (woken by the library's wake-up callback).
        Returns None after `timeout` seconds without an event; raises ClosedError at the end of the events."""
        loop = asyncio.get_running_loop()
        if timeout is not None:
            _seconds_to_ms(timeout, "timeout", _I32_MAX)
        deadline = None if timeout is None else loop.time() + timeout
        flag = self._wakeup_flag(loop)
        while True:
            flag.clear()  # before pulling: a wake-up for what comes after the pull is then not lost
            ev = self._pull(0, 0)
            if ev is not None:
                return ev
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            try:
                await asyncio.wait_for(flag.wait(), left)
            except asyncio.TimeoutError:
                return None

    async def events(self) -> AsyncIterator[Event]:
        """`async for ev in client.events():` every event until the client is closed and the last was taken."""
        while True:
            try:
                ev = await self.next_event_async()
            except ClosedError:
                return
            yield ev

    # -- the end

    def close(self, timeout: float = 5.0) -> bool:
        """Say goodbye to the server and stop reconnecting, waiting up to `timeout` seconds: True when done,
        False when it goes on in the background. The events left (the last DISCONNECTED among them) can still
        be pulled. A second close() raises ClosedError, as does every call after it but pulling events."""
        ms = _seconds_to_ms(timeout, "timeout", _U32_MAX)
        ptr = self._enter()
        try:
            rc = check(lib.tether_close(ptr, ms))
        finally:
            self._leave()
        self._closed = True
        return rc == lib.TETHER_OK

    def free(self) -> None:
        """Release the handle (tether_free), closing without waiting if close() was not called. Waits for the
        calls under way on other threads to return; every call after it raises ClosedError. Idempotent."""
        with self._state:
            if self._freed:
                return
            self._freed = True
            while self._active:
                self._idle.wait()
        self._aio = None
        self._finalizer()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.closed:
                self.close()
        except ClosedError:
            pass
        finally:
            self.free()
