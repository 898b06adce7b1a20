# tether/events.py: the events a client reports, copied out of libtether's `tether_event` into a dataclass.
import dataclasses
import enum
from typing import List

from ._ffi import ffi, lib, text

__all__ = ["EventKind", "PresenceState", "Event", "UNKNOWN_LAST_SEEN"]

# `last_seen_ms` of a PRESENCE event when the server does not know it (UINT32_MAX).
UNKNOWN_LAST_SEEN = 0xFFFFFFFF


class EventKind(enum.IntEnum):
    """TETHER_EVENT_*: what happened. See tether.h for the fields each kind fills."""

    CONNECTED = lib.TETHER_EVENT_CONNECTED
    DISCONNECTED = lib.TETHER_EVENT_DISCONNECTED
    RECONNECTING = lib.TETHER_EVENT_RECONNECTING
    CONNECT_FAILED = lib.TETHER_EVENT_CONNECT_FAILED
    GAVE_UP = lib.TETHER_EVENT_GAVE_UP
    DATA = lib.TETHER_EVENT_DATA
    PRESENCE = lib.TETHER_EVENT_PRESENCE
    UNDELIVERABLE = lib.TETHER_EVENT_UNDELIVERABLE
    NOT_SENT = lib.TETHER_EVENT_NOT_SENT
    SUSPECT = lib.TETHER_EVENT_SUSPECT
    RECOVERED = lib.TETHER_EVENT_RECOVERED
    ACKED = lib.TETHER_EVENT_ACKED
    DELIVERED = lib.TETHER_EVENT_DELIVERED
    NOT_DELIVERED = lib.TETHER_EVENT_NOT_DELIVERED
    IN_DOUBT = lib.TETHER_EVENT_IN_DOUBT
    DROPPED = lib.TETHER_EVENT_DROPPED
    DIAGNOSIS = lib.TETHER_EVENT_DIAGNOSIS
    HEARTBEAT = lib.TETHER_EVENT_HEARTBEAT


class PresenceState(enum.IntEnum):
    """`state` of a PRESENCE event (TETHER_ONLINE, ...); NONE (0) in every other kind."""

    NONE = 0
    ONLINE = lib.TETHER_ONLINE
    SUSPECT = lib.TETHER_SUSPECT
    OFFLINE = lib.TETHER_OFFLINE


@dataclasses.dataclass(frozen=True)
class Event:
    """One event, every field of `tether_event` copied (so it stays valid after the next pull).

    Which fields mean something depends on `kind`; the others are 0, "" or empty. `flag` is 1 or 0:
    CONNECTED: to the primary; DISCONNECTED: the server ended it (0: this client decided); PRESENCE: the peer
    ended its connection itself; IN_DOUBT: it was sent and never acknowledged. `len` is len(data), except in
    NOT_SENT, where it is the size of the message that was not sent (its bytes are not given: `data` is b"").
    """

    kind: EventKind
    flag: int = 0
    state: PresenceState = PresenceState.NONE
    attempt: int = 0
    heartbeat_ms: int = 0
    timeout_ms: int = 0
    retry_after_ms: int = 0
    delay_ms: int = 0
    silent_ms: int = 0
    last_seen_ms: int = 0
    epoch: int = 0
    seq: int = 0
    resent_as: int = 0
    count: int = 0
    server: str = ""
    peer: str = ""
    reason: str = ""
    alternative: str = ""
    text: str = ""
    data: bytes = b""
    len: int = 0
    seqs: List[int] = dataclasses.field(default_factory=list, hash=False)

    def __repr__(self) -> str:
        # Only the fields that say something: Event(DISCONNECTED, server='127.0.0.1:7400', reason='bye').
        kind = self.kind.name if isinstance(self.kind, EventKind) else str(self.kind)
        parts = [kind]
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default and not (f.name == "seqs" and not value):
                parts.append(f"{f.name}={value.name if isinstance(value, PresenceState) else value!r}")
        return f"Event({', '.join(parts)})"


def _enum(cls, value):
    try:
        return cls(value)
    except ValueError:  # a kind or state newer than this binding: keep the number
        return value


def copy_event(ev) -> Event:
    """Copy a filled `tether_event *` out at once (its pointers die with the next tether_next_event)."""
    data = bytes(ffi.buffer(ev.data, ev.len)) if ev.data != ffi.NULL else b""
    seqs = list(ffi.unpack(ev.seqs, ev.nseqs)) if ev.seqs != ffi.NULL else []
    return Event(
        kind=_enum(EventKind, ev.kind),
        flag=ev.flag,
        state=_enum(PresenceState, ev.state),
        attempt=ev.attempt,
        heartbeat_ms=ev.heartbeat_ms,
        timeout_ms=ev.timeout_ms,
        retry_after_ms=ev.retry_after_ms,
        delay_ms=ev.delay_ms,
        silent_ms=ev.silent_ms,
        last_seen_ms=ev.last_seen_ms,
        epoch=ev.epoch,
        seq=ev.seq,
        resent_as=ev.resent_as,
        count=ev.count,
        server=text(ev.server),
        peer=text(ev.peer),
        reason=text(ev.reason),
        alternative=text(ev.alternative),
        text=text(ev.text),
        data=data,
        len=ev.len,
        seqs=seqs,
    )
