# tether/errors.py: libtether's status codes and the exceptions its negative statuses become.
import enum

from ._ffi import lib, text

__all__ = [
    "Status",
    "TetherError",
    "NullError",
    "Utf8Error",
    "InvalidArgument",
    "TooLargeError",
    "FullError",
    "ClosedError",
    "TlsError",
    "ThreadError",
    "InternalError",
    "status_text",
    "last_error",
    "check",
    "error_for",
]


class Status(enum.IntEnum):
    """Every status a libtether function returns (TETHER_OK, TETHER_TIMEOUT, TETHER_CLOSED, TETHER_ERR_*)."""

    OK = lib.TETHER_OK
    TIMEOUT = lib.TETHER_TIMEOUT
    CLOSED = lib.TETHER_CLOSED
    ERR_NULL = lib.TETHER_ERR_NULL
    ERR_UTF8 = lib.TETHER_ERR_UTF8
    ERR_INVALID = lib.TETHER_ERR_INVALID
    ERR_TOO_LARGE = lib.TETHER_ERR_TOO_LARGE
    ERR_FULL = lib.TETHER_ERR_FULL
    ERR_CLOSED = lib.TETHER_ERR_CLOSED
    ERR_TLS = lib.TETHER_ERR_TLS
    ERR_THREAD = lib.TETHER_ERR_THREAD
    ERR_INTERNAL = lib.TETHER_ERR_INTERNAL


def status_text(status: int) -> str:
    """The library's name for a status code (tether_status_text), e.g. "queue full"."""
    return text(lib.tether_status_text(int(status)))


def last_error() -> str:
    """What went wrong in the last failing libtether call on this thread (tether_last_error); "" if none."""
    return text(lib.tether_last_error())


class TetherError(Exception):
    """A libtether call failed. `code` is its status (a Status), `message` the library's words for it."""

    def __init__(self, code: int, message: str = ""):
        try:
            code = Status(code)
        except ValueError:
            pass
        self.code = code
        self.message = message
        super().__init__(f"{message} ({status_text(code)})" if message else status_text(code))


class NullError(TetherError):
    """TETHER_ERR_NULL: a pointer the library needed was NULL (a defect of this binding if it ever happens)."""


class Utf8Error(TetherError, ValueError):
    """TETHER_ERR_UTF8: a string argument was not valid UTF-8."""


class InvalidArgument(TetherError, ValueError):
    """TETHER_ERR_INVALID: an empty or over-long id, a malformed host:port, no server, a bad value."""


class TooLargeError(TetherError):
    """TETHER_ERR_TOO_LARGE: the payload is larger than the server takes."""


class FullError(TetherError):
    """TETHER_ERR_FULL: the sends held while disconnected, or the reliable window, are full: retry later."""


class ClosedError(TetherError):
    """The client is closed: TETHER_ERR_CLOSED from a call after close() (or after GAVE_UP, or after free()),
    and also, with code Status.CLOSED, from next_event() once every event was taken."""


class TlsError(TetherError):
    """TETHER_ERR_TLS: the TLS settings could not be used (unreadable CA file, bad server name)."""


class ThreadError(TetherError):
    """TETHER_ERR_THREAD: a waiting call was made on the library's own thread."""


class InternalError(TetherError):
    """TETHER_ERR_INTERNAL: a defect inside the library, or a resource it could not get."""


_BY_CODE = {
    Status.ERR_NULL: NullError,
    Status.ERR_UTF8: Utf8Error,
    Status.ERR_INVALID: InvalidArgument,
    Status.ERR_TOO_LARGE: TooLargeError,
    Status.ERR_FULL: FullError,
    Status.ERR_CLOSED: ClosedError,
    Status.ERR_TLS: TlsError,
    Status.ERR_THREAD: ThreadError,
    Status.ERR_INTERNAL: InternalError,
}


def error_for(code: int) -> TetherError:
    """The exception for a negative status, with tether_last_error()'s message (read on this thread, now)."""
    return _BY_CODE.get(code, TetherError)(code, last_error())


def check(code: int) -> int:
    """Raise the exception for a negative status; return any other status."""
    if code < 0:
        raise error_for(code)
    return code
