"""tether: the reconnecting tether client for Python, over libtether's C ABI (crates/tether-ffi/tether.h).

    import tether

    with tether.Client("alice", servers=["127.0.0.1:7400", "127.0.0.1:7401"], heartbeat_ms=500) as c:
        c.subscribe("bob")
        c.send("bob", b"hello")
        for ev in c:                      # or: async for ev in c.events()
            if ev.kind == tether.EventKind.DATA:
                print(ev.peer, ev.data)

Set TETHER_LIB_DIR to load the libtether.so in that directory instead of the one built into the package.
"""
from ._ffi import lib as _lib, library_path, text as _text
from .client import DEFAULT_HELD_SENDS, DEFAULT_MAX_EVENTS, Client
from . import errors as _errors
from .errors import *  # noqa: F401,F403 (the statuses and exceptions, as listed in errors.__all__)
from .events import UNKNOWN_LAST_SEEN, Event, EventKind, PresenceState

# The package's names: the client and its events, every name errors.py exports (but its internal helpers
# `check` and `error_for`), and the library's facts.
__all__ = [
    "Client",
    "Event",
    "EventKind",
    "PresenceState",
    *(n for n in _errors.__all__ if n not in ("check", "error_for")),
    "version",
    "library_path",
    "DEFAULT_HELD_SENDS",
    "DEFAULT_MAX_EVENTS",
    "UNKNOWN_LAST_SEEN",
]


def version() -> str:
    """The version of the loaded libtether (tether_version), e.g. "0.1.0"."""
    return _text(_lib.tether_version())


__version__ = "0.1.0"
