#!/usr/bin/env python3
"""A tether VERSION 2 client written from docs/protocol.md alone (standard library only).

Usage: spec_client_v2.py HOST:PORT CLIENT_ID

Steps (one line per step or observation on stdout; exits non-zero with a message on stderr on any deviation
of the server from docs/protocol.md):
  1. HELLO offering version 2 (v2 layout, with one extension of an unknown type that the server must skip),
     heartbeat 500 ms, a random nonce.
  2. WELCOME in the v2 layout: version 2, limits, extensions (known ones decoded, unknown ones skipped); the
     frame limit is raised to WELCOME.max_frame.
  3. SUBSCRIBE to itself and to an id never seen: v2 PRESENCE (with flags): itself online, the ghost offline
     with reason 0 and last_seen 0xFFFFFFFF.
  4. Relay: small DATA to itself; DATA of exactly max_frame - 130 bytes to itself (delivered whole); one byte
     more (UNDELIVERABLE why=2, connection stays up); DATA to the ghost (UNDELIVERABLE why=1).
  5. Liveness: PING / PONG echo; then a quiet period in which the server must ping (section 3: "a client that
     has gone quiet is still pinged by the server"); then a steady period with the client driving the heartbeat.
     Every server PING is answered at once, at any time, and checked against the ping allowance.
  6. BYE(bye), then the server must close.
"""
import collections
import math
import os
import select
import socket
import struct
import sys
import time

OFFERED_VERSION = 2
DEFAULT_MAX_FRAME = 65536
REQUESTED_HEARTBEAT_MS = 500
UNKNOWN_HELLO_EXTENSION = (0x7ABC, b"\x5a\xa5")  # type unknown to the server: it must skip it

HELLO, WELCOME, PING, PONG, DATA, SUBSCRIBE, UNSUBSCRIBE, PRESENCE, BYE, UNDELIVERABLE = range(1, 11)
KIND_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", PING: "PING", PONG: "PONG", DATA: "DATA", SUBSCRIBE: "SUBSCRIBE",
    UNSUBSCRIBE: "UNSUBSCRIBE", PRESENCE: "PRESENCE", BYE: "BYE", UNDELIVERABLE: "UNDELIVERABLE",
}
CLIENT_ONLY_KINDS = {HELLO, SUBSCRIBE, UNSUBSCRIBE}

REASONS = {
    1: "bye", 2: "eof", 3: "reset", 4: "heartbeat_timeout", 5: "keepalive_timeout", 6: "write_timeout",
    7: "unreachable", 8: "takeover", 9: "id_conflict", 10: "protocol_error", 11: "handshake_timeout",
    12: "busy", 13: "slow_consumer", 14: "server_shutdown", 15: "kicked", 16: "auth_failed",
    17: "ping_flood", 18: "ip_limit", 19: "rate_limited", 20: "tls_error", 21: "subscription_refused",
}
R_BYE, R_PROTOCOL_ERROR, R_PING_FLOOD, R_TLS_ERROR = 1, 10, 17, 20
STATES = {1: "online", 2: "suspect", 3: "offline"}
ONLINE, SUSPECT, OFFLINE = 1, 2, 3
FLAG_BY_CLIENT = 0x01
WHY = {0: "not said", 1: "target not online", 2: "payload too large"}
EXT_MAX_SUBSCRIPTIONS, EXT_MAX_DATA_RATE = 0x0001, 0x0002
EXT_NAMES = {EXT_MAX_SUBSCRIPTIONS: "max_subscriptions", EXT_MAX_DATA_RATE: "max_data_rate"}
RELAY_OVERHEAD = 130  # kind byte + str8 length + longest id


class Deviation(Exception):
    """The server did something docs/protocol.md does not allow (or did not do what it requires)."""

    def __init__(self, message, protocol=False):
        super().__init__(message)
        self.protocol = protocol  # True: a frame-level violation, answered with BYE(protocol_error)


def now():
    return time.monotonic()


def reason_name(code):
    # v2: an unknown close-reason code is kept as "unknown reason N" (section 2).
    return REASONS.get(code, f"unknown reason {code}")


def str8(text):
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError("str8 longer than 255 bytes")
    return bytes([len(raw)]) + raw


def bytes16(raw):
    return struct.pack(">H", len(raw)) + raw


class Reader:
    """Strict body decoder: every read checks `truncated`, `end()` checks `trailing bytes`."""

    def __init__(self, body, what):
        self.body, self.pos, self.what = body, 0, what

    def take(self, n, field):
        if self.pos + n > len(self.body):
            raise Deviation(f"{self.what}: truncated at {field} (needs {n} bytes at offset {self.pos}, "
                            f"body is {len(self.body)})", protocol=True)
        raw = self.body[self.pos:self.pos + n]
        self.pos += n
        return raw

    def u8(self, field):
        return self.take(1, field)[0]

    def u16(self, field):
        return struct.unpack(">H", self.take(2, field))[0]

    def u32(self, field):
        return struct.unpack(">I", self.take(4, field))[0]

    def u64(self, field):
        return struct.unpack(">Q", self.take(8, field))[0]

    def str8(self, field, lo=0, hi=255):
        n = self.u8(field + " length")
        raw = self.take(n, field)
        if not lo <= n <= hi:
            raise Deviation(f"{self.what}: {field} is {n} bytes, must be {lo} to {hi}", protocol=True)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Deviation(f"{self.what}: {field} is not valid UTF-8: {raw!r}", protocol=True) from None

    def id(self, field):
        return self.str8(field, 1, 128)

    def bytes16(self, field):
        return self.take(self.u16(field + " length"), field)

    def rest(self):
        raw = self.body[self.pos:]
        self.pos = len(self.body)
        return raw

    def end(self):
        if self.pos != len(self.body):
            raise Deviation(f"{self.what}: trailing bytes ({len(self.body) - self.pos} after the last field: "
                            f"{self.body[self.pos:self.pos + 16].hex()})", protocol=True)


def parse_extensions(block, what):
    """A bytes16 block of `type: u16, len: u16, value` entries (section 4). Returns [(type, value)]."""
    entries, seen, pos = [], set(), 0
    while pos < len(block):
        if pos + 4 > len(block):
            raise Deviation(f"{what}: extension header runs past the end of the block "
                            f"({len(block) - pos} bytes left)", protocol=True)
        etype, elen = struct.unpack(">HH", block[pos:pos + 4])
        pos += 4
        if pos + elen > len(block):
            raise Deviation(f"{what}: extension 0x{etype:04x} (len {elen}) runs past the end of its block "
                            f"({len(block) - pos} bytes left)", protocol=True)
        if etype in seen:
            raise Deviation(f"{what}: extension 0x{etype:04x} appears twice", protocol=True)
        seen.add(etype)
        entries.append((etype, block[pos:pos + elen]))
        pos += elen
    return entries


def check_address(text, what):
    """BYE.alternative: host:port, IPv6 in brackets (section 1). Empty = none."""
    if not text:
        return
    host, sep, port = text.rpartition(":")
    ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)
    if ok and host.startswith("["):
        ok = host.endswith("]") and len(host) > 2
    elif ok:
        ok = ":" not in host
    if not ok:
        raise Deviation(f"{what}: alternative {text!r} is not a host:port address", protocol=True)


def decode(kind, body, version):
    """Decode one server->client frame strictly in the session's version. Returns a dict."""
    name = KIND_NAMES.get(kind)
    if name is None:
        raise Deviation(f"unknown frame kind 0x{kind:02x}", protocol=True)
    if kind in CLIENT_ONLY_KINDS:
        raise Deviation(f"server sent the client-only frame {name}", protocol=True)
    r = Reader(body, name)
    f = {"kind": kind, "name": name}
    if kind == WELCOME:
        f["version"] = r.u8("version")
        if f["version"] == 0:
            raise Deviation("WELCOME.version is 0", protocol=True)
        if f["version"] > OFFERED_VERSION:
            raise Deviation(f"WELCOME.version {f['version']} is higher than the offered {OFFERED_VERSION}",
                            protocol=True)
        f["heartbeat_ms"] = r.u32("heartbeat_ms")
        f["timeout_ms"] = r.u32("timeout_ms")
        f["epoch"] = r.u64("epoch")
        f["server_id"] = r.str8("server_id")
        if f["version"] >= 2:
            f["max_frame"] = r.u32("max_frame")
            f["extensions"] = parse_extensions(r.bytes16("extensions"), "WELCOME.extensions")
    elif kind in (PING, PONG):
        f["seq"] = r.u32("seq")
        f["ts_ms"] = r.u64("ts_ms")
    elif kind == DATA:
        f["peer"] = r.str8("peer", 0, 128)
        f["payload"] = r.rest()
    elif kind == PRESENCE:
        f["client_id"] = r.id("client_id")
        f["state"] = r.u8("state")
        if f["state"] not in STATES:
            raise Deviation(f"PRESENCE.state {f['state']} is not 1, 2 or 3", protocol=True)
        f["reason"] = r.u8("reason")
        if f["reason"] != 0 and f["reason"] not in REASONS and version < 2:
            raise Deviation(f"PRESENCE.reason {f['reason']} is unknown (an error in v1)", protocol=True)
        f["last_seen_ago_ms"] = r.u32("last_seen_ago_ms")
        f["flags"] = r.u8("flags") if version >= 2 else 0
    elif kind == BYE:
        f["reason"] = r.u8("reason")
        if f["reason"] == R_TLS_ERROR:
            raise Deviation("BYE carries reason 20 (tls_error), which is never sent in BYE", protocol=True)
        if f["reason"] not in REASONS and version < 2:
            raise Deviation(f"BYE.reason {f['reason']} is unknown (an error in v1)", protocol=True)
        f["retry_after_ms"] = r.u32("retry_after_ms")
        f["alternative"] = r.str8("alternative")
        check_address(f["alternative"], "BYE")
    elif kind == UNDELIVERABLE:
        f["to"] = r.id("to")
        f["why"] = r.u8("why") if version >= 2 else 0
    r.end()
    return f


class Conn:
    """One tether connection: non-blocking socket, strict framing, automatic PONGs, client heartbeat."""

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        self.started = now()
        self.out = bytearray()
        self.inbuf = bytearray()
        self.limit = DEFAULT_MAX_FRAME  # until WELCOME.max_frame (section 6, step 2)
        self.version = None  # None until WELCOME
        self.heartbeat_s = self.timeout_s = None
        self.auto_ping = False
        self.bye_sent = False
        self.eof = False
        self.last_sent = self.last_received = now()
        self.frames = collections.deque()
        self.next_seq = 1
        self.pending_pings = {}  # seq -> ts_ms of our PINGs awaiting a PONG
        self.pongs_received = 0
        self.pings_sent = 0
        self.server_pings = []  # monotonic times of server PINGs
        self.ping_tokens = self.ping_capacity = self.ping_refill_s = None
        self.ping_tokens_at = None
        self.quiet = False  # suppresses the client's own heartbeat PINGs (not PONGs)
        self.rate = None  # max_data_rate in bytes/s, if the server stated one
        self.rate_tokens = self.rate_at = None

    # -- sending --------------------------------------------------------------------------------------------
    def send(self, kind, body):
        if self.bye_sent:
            raise RuntimeError("bug: sending after BYE")
        length = len(body) + 1
        if length > self.limit:
            raise RuntimeError(f"bug: would send a {length}-byte frame over the server's maximum {self.limit}")
        self.out += struct.pack(">IB", length, kind) + body
        self.last_sent = now()
        if kind == BYE:
            self.bye_sent = True

    def ping(self, seq=None, ts_ms=None):
        if seq is None:
            seq = self.next_seq
            self.next_seq += 1
        if ts_ms is None:
            ts_ms = int((now() - self.started) * 1000)
        self.pending_pings[seq] = ts_ms
        self.pings_sent += 1
        self.send(PING, struct.pack(">IQ", seq, ts_ms))
        return seq, ts_ms

    def send_bye(self, reason, retry_after_ms=0, alternative=""):
        self.send(BYE, struct.pack(">BI", reason, retry_after_ms) + str8(alternative))

    def flush(self, timeout=2.0):
        deadline = now() + timeout
        while self.out and now() < deadline:
            _, w, _ = select.select([], [self.sock], [], max(0.0, deadline - now()))
            if w:
                try:
                    n = self.sock.send(self.out)
                except (BlockingIOError, InterruptedError):
                    continue
                del self.out[:n]

    # -- receiving ------------------------------------------------------------------------------------------
    def welcome(self, f):
        self.version = f["version"]
        self.heartbeat_s = f["heartbeat_ms"] / 1000
        self.timeout_s = f["timeout_ms"] / 1000
        # Ping allowance (section 3): ceil(timeout/heartbeat) + 2 at once, one more per half interval.
        self.ping_capacity = math.ceil(f["timeout_ms"] / f["heartbeat_ms"]) + 2
        self.ping_tokens = float(self.ping_capacity)
        self.ping_refill_s = self.heartbeat_s / 2
        self.ping_tokens_at = now()

    def _on_server_ping(self, f):
        t = now()
        if self.ping_tokens is not None:
            self.ping_tokens = min(self.ping_capacity,
                                   self.ping_tokens + (t - self.ping_tokens_at) / self.ping_refill_s)
            self.ping_tokens_at = t
            if self.ping_tokens < 1:
                self.send_bye(R_PING_FLOOD)
                self.flush()
                raise Deviation(f"server exceeded the ping allowance ({self.ping_capacity} at once, one per "
                                f"{self.ping_refill_s * 1000:.0f} ms): sent BYE(ping_flood)")
            self.ping_tokens -= 1
        self.server_pings.append(t)
        if not self.bye_sent:  # after BYE a side sends nothing more
            self.send(PONG, struct.pack(">IQ", f["seq"], f["ts_ms"]))
        self.frames.append(f)  # so that waiting loops wake up; expect() passes over it
        print(f"  answered server PING seq={f['seq']} ts_ms={f['ts_ms']}"
              + (" (not answered: BYE already sent)" if self.bye_sent else ""), flush=True)

    def _on_frame(self, kind, body):
        self.last_received = now()
        if self.version is None and kind not in (WELCOME, BYE):
            raise Deviation(f"first frame from the server is {KIND_NAMES.get(kind, hex(kind))}, "
                            "expected WELCOME or BYE", protocol=True)
        f = decode(kind, body, self.version or OFFERED_VERSION)
        if kind == WELCOME and self.version is not None:
            raise Deviation("a second WELCOME", protocol=True)
        if kind == PING:
            self._on_server_ping(f)
            return
        if kind == PONG:
            expected = self.pending_pings.pop(f["seq"], None)
            if expected is None or expected != f["ts_ms"]:
                raise Deviation(f"PONG seq={f['seq']} ts_ms={f['ts_ms']} does not echo any outstanding PING "
                                f"(outstanding: {self.pending_pings})")
            self.pongs_received += 1
        self.frames.append(f)

    def _parse(self):
        while len(self.inbuf) >= 4:
            (length,) = struct.unpack(">I", self.inbuf[:4])
            # Checked from the four header bytes alone, before waiting for or allocating the body.
            if length == 0:
                raise Deviation("frame with len = 0", protocol=True)
            if length > self.limit:
                raise Deviation(f"frame len {length} exceeds our limit {self.limit}", protocol=True)
            if len(self.inbuf) < 4 + length:
                return
            kind = self.inbuf[4]
            body = bytes(self.inbuf[5:4 + length])
            del self.inbuf[:4 + length]
            self._on_frame(kind, body)

    def next_frame(self, deadline):
        """The next frame other than PING (PINGs are answered here), or None at `deadline`.
        Returns {"name": "EOF"} when the server closed. Drives the client heartbeat meanwhile."""
        while True:
            if self.frames:
                return self.frames.popleft()
            if self.eof:
                return {"name": "EOF"}
            t = now()
            wake = deadline
            if self.timeout_s is not None and not self.bye_sent:
                if t - self.last_received >= self.timeout_s:
                    raise Deviation(f"server silent for {t - self.last_received:.3f} s "
                                    f"(timeout_ms={self.timeout_s * 1000:.0f}): heartbeat_timeout")
                wake = min(wake, self.last_received + self.timeout_s)
            if self.auto_ping and not self.quiet and not self.bye_sent:
                if t - self.last_sent >= self.heartbeat_s:
                    self.ping()
                wake = min(wake, self.last_sent + self.heartbeat_s)
            if t >= deadline:
                return None
            wait = max(0.0, wake - t)
            try:
                r, w, _ = select.select([self.sock], [self.sock] if self.out else [], [], wait)
                if w:
                    try:
                        n = self.sock.send(self.out)
                        del self.out[:n]
                    except (BlockingIOError, InterruptedError):
                        pass
                if r:
                    try:
                        data = self.sock.recv(1 << 20)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not data:
                        if self.inbuf:
                            raise Deviation(f"server closed in the middle of a frame "
                                            f"({len(self.inbuf)} bytes buffered)", protocol=True)
                        self.eof = True
                        continue
                    self.inbuf += data
                    self._parse()
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Deviation(f"connection reset by the server: {e}") from None

    # -- DATA rate (max_data_rate) ----------------------------------------------------------------------------
    def pace(self, nbytes):
        """If the server stated max_data_rate, wait (while still serving the connection) so that DATA stays
        under it. Burst size is not documented: assume a bucket of one second's worth, full at WELCOME."""
        if self.rate is None:
            return
        held = []
        while True:
            t = now()
            self.rate_tokens = min(float(self.rate), self.rate_tokens + (t - self.rate_at) * self.rate)
            self.rate_at = t
            if self.rate_tokens >= min(nbytes, self.rate):
                self.rate_tokens -= nbytes
                break
            f = self.next_frame(t + (min(nbytes, self.rate) - self.rate_tokens) / self.rate)
            if f is not None:
                held.append(f)  # keep frames for the step that waits for them
                if f["name"] == "EOF":
                    break
        self.frames.extendleft(reversed(held))


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    host, _, port = sys.argv[1].rpartition(":")
    host = host.strip("[]")
    me = sys.argv[2]
    # The id must leave room for the ghost id (<= 128 bytes) and keep max_frame - 129 payloads under max_frame.
    if not 1 <= len(me.encode("utf-8")) <= 113:
        fail("CLIENT_ID must be 1 to 113 bytes of UTF-8 (room for the ghost suffix)")
    ghost = f"{me}-ghost-{os.urandom(4).hex()}"  # random suffix: never seen, even on a long-running server

    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except OSError as e:
        fail(f"cannot connect to {sys.argv[1]}: {e}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(sock)
    try:
        run(conn, me, ghost)
    except Deviation as e:
        if not conn.bye_sent and not conn.eof:
            try:
                conn.send_bye(R_PROTOCOL_ERROR if e.protocol else R_BYE)
                conn.flush(1.0)
            except OSError:
                pass
        sock.close()
        fail(str(e))
    sock.close()


def expect(conn, what, accept, timeout_s=None):
    """Wait for a frame for which accept(f) returns True. Frames that are allowed at any time (PONGs, presence
    changes of subscribed ids) are passed over; anything else is a deviation."""
    limit = timeout_s if timeout_s is not None else max(5.0, 3 * (conn.timeout_s or 5.0))
    deadline = now() + limit
    while True:
        f = conn.next_frame(deadline)
        if f is None:
            raise Deviation(f"timed out after {limit:.1f} s waiting for {what}")
        if accept(f):
            return f
        if f["name"] in ("PING", "PONG"):
            continue  # a server PING (already answered) or a heartbeat PONG, already checked against its PING
        if f["name"] == "PRESENCE" and f["client_id"] in conn.subscribed:
            check_presence(conn, f)
            print(f"  presence change {describe_presence(f)}", flush=True)
            continue
        if f["name"] == "BYE":
            raise Deviation(f"server sent BYE({reason_name(f['reason'])}, retry_after_ms="
                            f"{f['retry_after_ms']}, alternative={f['alternative']!r}) while waiting for {what}")
        if f["name"] == "EOF":
            raise Deviation(f"server closed the connection while waiting for {what}")
        raise Deviation(f"unexpected {f['name']} while waiting for {what}: {short(f)}")


def short(f):
    return {k: (v if not isinstance(v, bytes) or len(v) <= 16 else f"<{len(v)} bytes>") for k, v in f.items()}


def describe_presence(f):
    return (f"{f['client_id']} {STATES[f['state']]} reason={f['reason']}"
            f"({'none' if f['reason'] == 0 else reason_name(f['reason'])}) "
            f"last_seen_ago_ms=0x{f['last_seen_ago_ms']:08x} flags=0x{f['flags']:02x}")


def check_presence(conn, f):
    """The field rules of section 2 that hold for every PRESENCE."""
    d = describe_presence(f)
    if f["state"] in (ONLINE, SUSPECT) and f["reason"] != 0:
        raise Deviation(f"PRESENCE {d}: reason must be 0 for online and suspect")
    if f["state"] == ONLINE and f["last_seen_ago_ms"] != 0:
        raise Deviation(f"PRESENCE {d}: last_seen_ago_ms must be 0 for online")
    if f["state"] == OFFLINE and f["reason"] == 0 and f["last_seen_ago_ms"] != 0xFFFFFFFF:
        raise Deviation(f"PRESENCE {d}: last_seen_ago_ms must be 0xFFFFFFFF when unknown (reason 0)")
    if f["flags"] & FLAG_BY_CLIENT and f["state"] != OFFLINE:
        raise Deviation(f"PRESENCE {d}: by-client flag on a client that is not offline")


def run(conn, me, ghost):
    conn.subscribed = set()

    # 1. HELLO, v2 layout, with one extension of an unknown type.
    nonce = int.from_bytes(os.urandom(8), "big")
    etype, evalue = UNKNOWN_HELLO_EXTENSION
    extensions = struct.pack(">HH", etype, len(evalue)) + evalue
    conn.send(HELLO, struct.pack(">BIQ", OFFERED_VERSION, REQUESTED_HEARTBEAT_MS, nonce) + str8(me)
              + bytes16(b"") + bytes16(extensions))
    print(f"hello version={OFFERED_VERSION} heartbeat_ms={REQUESTED_HEARTBEAT_MS} nonce=0x{nonce:016x} "
          f"client_id={me} extensions=[0x{etype:04x} len={len(evalue)}]", flush=True)

    # 2. WELCOME (or BYE).
    f = conn.next_frame(now() + 10)
    if f is None:
        raise Deviation("no WELCOME within 10 s")
    if f["name"] == "BYE":
        raise Deviation(f"server refused the HELLO: BYE({reason_name(f['reason'])}, "
                        f"retry_after_ms={f['retry_after_ms']}, alternative={f['alternative']!r})")
    if f["name"] == "EOF":
        raise Deviation("server closed the connection instead of answering WELCOME")
    w = f
    if w["version"] != 2:
        raise Deviation(f"WELCOME.version is {w['version']}, expected 2 (offered 2)")
    if w["heartbeat_ms"] == 0 or w["timeout_ms"] == 0:
        raise Deviation(f"WELCOME heartbeat_ms={w['heartbeat_ms']} timeout_ms={w['timeout_ms']}: must be > 0")
    if w["timeout_ms"] < w["heartbeat_ms"]:
        raise Deviation(f"WELCOME timeout_ms={w['timeout_ms']} is shorter than heartbeat_ms={w['heartbeat_ms']}")
    if w["epoch"] < 1:
        raise Deviation("WELCOME.epoch is 0; epochs start from 1")
    if not 256 <= w["max_frame"] <= 16 * 1024 * 1024:
        raise Deviation(f"WELCOME.max_frame {w['max_frame']} is outside 256 to 16,777,216", protocol=True)
    conn.welcome(w)
    conn.limit = w["max_frame"]  # the server never sends more, and accepts up to it
    print(f"welcome epoch={w['epoch']} server_id={w['server_id']!r}", flush=True)
    max_subs = None
    for etype, value in w["extensions"]:
        if etype in (EXT_MAX_SUBSCRIPTIONS, EXT_MAX_DATA_RATE):
            if len(value) != 4:
                raise Deviation(f"WELCOME extension 0x{etype:04x} ({EXT_NAMES[etype]}) has len {len(value)}, "
                                "its value is a u32", protocol=True)
            (v,) = struct.unpack(">I", value)
            print(f"welcome extension type=0x{etype:04x} {EXT_NAMES[etype]}={v}", flush=True)
            if etype == EXT_MAX_SUBSCRIPTIONS:
                max_subs = v
            else:
                conn.rate, conn.rate_tokens, conn.rate_at = v, float(v), now()
        else:
            print(f"welcome extension type=0x{etype:04x} len={len(value)} unknown, skipped", flush=True)
    print(f"welcome version={w['version']} heartbeat_ms={w['heartbeat_ms']} timeout_ms={w['timeout_ms']} "
          f"max_frame={w['max_frame']} max_subscriptions={'absent' if max_subs is None else max_subs}",
          flush=True)
    conn.auto_ping = True

    # 3. Presence: ourselves and a ghost, in one SUBSCRIBE.
    if max_subs is not None and max_subs < 2:
        raise Deviation(f"server allows only {max_subs} subscriptions; this test needs 2")
    conn.send(SUBSCRIBE, struct.pack(">H", 2) + str8(me) + str8(ghost))
    conn.subscribed = {me, ghost}
    snapshot = {}
    while len(snapshot) < 2:
        p = expect(conn, "the PRESENCE snapshot", lambda f: f["name"] == "PRESENCE"
                   and f["client_id"] in (me, ghost) and f["client_id"] not in snapshot)
        check_presence(conn, p)
        snapshot[p["client_id"]] = p
    s, g = snapshot[me], snapshot[ghost]
    if s["state"] != ONLINE:
        raise Deviation(f"PRESENCE for ourselves is {describe_presence(s)}, expected online")
    if s["flags"] != 0:
        raise Deviation(f"PRESENCE for ourselves has flags 0x{s['flags']:02x}, expected 0 (online)")
    print(f"presence self  {describe_presence(s)}", flush=True)
    if (g["state"], g["reason"], g["last_seen_ago_ms"]) != (OFFLINE, 0, 0xFFFFFFFF):
        raise Deviation(f"PRESENCE for the ghost is {describe_presence(g)}, expected offline reason 0 "
                        "last_seen 0xFFFFFFFF")
    if g["flags"] & FLAG_BY_CLIENT:
        raise Deviation(f"PRESENCE for the ghost has the by-client flag, but the server knows nothing of it")
    print(f"presence ghost {describe_presence(g)}", flush=True)

    # 4. Relay.
    def send_data(peer, payload):
        conn.pace(len(payload))
        conn.send(DATA, str8(peer) + payload)

    small = b"hello v2 from python"
    send_data(me, small)
    d = expect(conn, "the small DATA relayed back", lambda f: f["name"] == "DATA")
    if d["peer"] != me or d["payload"] != small:
        raise Deviation(f"relayed DATA from {d['peer']!r} payload {d['payload'][:40]!r}, expected from {me!r} "
                        f"payload {small!r}")
    print(f"relay small ok peer={d['peer']} bytes={len(d['payload'])}", flush=True)

    biggest = conn.limit - RELAY_OVERHEAD
    big = os.urandom(biggest)
    send_data(me, big)
    d = expect(conn, f"the {biggest}-byte DATA relayed back", lambda f: f["name"] in ("DATA", "UNDELIVERABLE"))
    if d["name"] == "UNDELIVERABLE":
        raise Deviation(f"a payload of max_frame - 130 = {biggest} bytes was refused: UNDELIVERABLE(to="
                        f"{d['to']!r}, why={d['why']})")
    if d["peer"] != me or d["payload"] != big:
        raise Deviation(f"relayed max DATA from {d['peer']!r} with {len(d['payload'])} bytes, expected from "
                        f"{me!r} with {biggest} identical bytes")
    print(f"relay max ok peer={d['peer']} bytes={len(d['payload'])} (max_frame - 130)", flush=True)

    send_data(me, big + b"\x00")
    u = expect(conn, f"UNDELIVERABLE for a {biggest + 1}-byte payload",
               lambda f: f["name"] in ("DATA", "UNDELIVERABLE"))
    if u["name"] == "DATA":
        raise Deviation(f"a payload of max_frame - 129 = {biggest + 1} bytes was relayed "
                        f"({len(u['payload'])} bytes arrived); expected UNDELIVERABLE why=2")
    if u["to"] != me or u["why"] != 2:
        raise Deviation(f"UNDELIVERABLE(to={u['to']!r}, why={u['why']}({WHY.get(u['why'], 'other')})), expected "
                        f"to={me!r} why=2 (too large)")
    print(f"relay too-large ok UNDELIVERABLE to={u['to']} why={u['why']} ({WHY[u['why']]}), bytes={biggest + 1}",
          flush=True)

    send_data(ghost, b"anyone there?")
    u = expect(conn, "UNDELIVERABLE for the ghost", lambda f: f["name"] in ("DATA", "UNDELIVERABLE"))
    if u["name"] == "DATA":
        raise Deviation(f"DATA to the ghost was answered with DATA from {u['peer']!r}")
    if u["to"] != ghost or u["why"] != 1:
        raise Deviation(f"UNDELIVERABLE(to={u['to']!r}, why={u['why']}), expected to={ghost!r} why=1 (not online)")
    print(f"relay ghost ok UNDELIVERABLE to={u['to']} why={u['why']} ({WHY[u['why']]})", flush=True)

    # 5. Liveness.
    seq, ts = conn.ping(seq=0xC0FFEE, ts_ms=0x0123456789ABCDEF)
    expect(conn, "the PONG echo", lambda f: f["name"] == "PONG" and f["seq"] == seq)  # echo checked in Conn
    print(f"ping ok PONG seq=0x{seq:x} ts_ms=0x{ts:x} echoed", flush=True)

    # Quiet: stop our own heartbeat; the server must ping within its 1.5 intervals (we allow timeout_ms: the
    # point where we would declare it dead). Unsubscribe first so that presence traffic does not count as
    # the server "sending". PONGs to its PINGs still go out at once.
    conn.send(UNSUBSCRIBE, struct.pack(">H", 2) + str8(me) + str8(ghost))
    conn.subscribed = set()
    before = len(conn.server_pings)
    conn.quiet = True
    quiet_from = now()
    deadline = quiet_from + conn.timeout_s * 3
    while len(conn.server_pings) == before:
        f = conn.next_frame(deadline)  # raises on silence >= timeout_ms
        if f is None:
            raise Deviation("the server never pinged a quiet client")
        if f["name"] in ("PING", "PONG"):
            continue
        if f["name"] == "PRESENCE":
            print(f"  late presence (in flight before UNSUBSCRIBE?) {describe_presence(f)}", flush=True)
            continue
        raise Deviation(f"unexpected {f['name']} during the quiet period: {short(f)}")
    conn.quiet = False
    print(f"quiet ok server PING after {(conn.server_pings[-1] - quiet_from) * 1000:.0f} ms of client silence "
          f"(heartbeat_ms={conn.heartbeat_s * 1000:.0f}, expected about 1.5 intervals)", flush=True)

    # Steady: the client drives the heartbeat for two timeouts; every PING must be answered.
    pings0, pongs0 = conn.pings_sent, conn.pongs_received
    end = now() + 2 * conn.timeout_s
    while True:
        f = conn.next_frame(end)
        if f is None:
            break
        if f["name"] not in ("PING", "PONG"):
            raise Deviation(f"unexpected {f['name']} during the steady period: {short(f)}")
    # Give the last PING a moment to be answered.
    settle = now() + conn.timeout_s
    while conn.pending_pings:
        conn.auto_ping = False
        f = conn.next_frame(settle)
        if f is None:
            raise Deviation(f"PINGs never answered: {conn.pending_pings}")
        if f["name"] not in ("PING", "PONG"):
            raise Deviation(f"unexpected {f['name']} while waiting for PONGs: {short(f)}")
    conn.auto_ping = True
    print(f"heartbeat ok client sent {conn.pings_sent - pings0} PINGs, {conn.pongs_received - pongs0} PONGs "
          f"back; server PINGs answered so far: {len(conn.server_pings)}", flush=True)

    # 6. Goodbye.
    conn.send_bye(R_BYE)
    after = []
    deadline = now() + max(5.0, 2 * conn.timeout_s)
    while True:
        f = conn.next_frame(deadline)
        if f is None:
            raise Deviation(f"server did not close within {deadline - now():.1f} s after our BYE "
                            f"(frames after BYE: {after})")
        if f["name"] == "EOF":
            break
        if f["name"] == "PING":
            continue
        after.append(f["name"] if f["name"] != "BYE" else f"BYE({reason_name(f['reason'])})")
    print(f"bye ok server closed the connection" + (f" (frames after our BYE: {after})" if after else ""),
          flush=True)


if __name__ == "__main__":
    main()
