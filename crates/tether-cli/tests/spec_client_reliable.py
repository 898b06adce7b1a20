#!/usr/bin/env python3
"""A reliable tether client written from docs/protocol.md alone (sections 1-5), standard library only.

Usage: spec_client_reliable.py HOST:PORT [scenario|edges]

`scenario` (the default) runs two reliable clients, `a` (receipts on) and `b`, in one process against a server
started with `--heartbeat-interval 500ms --heartbeat-timeout 1500ms --session-expiry 10s`, through five steps:
the grant, 100 acknowledged messages with receipts, an abrupt drop and resume of `b`, a forged token for `b`'s
id, and a clean BYE. `edges` checks two resume rules: receipts follow the sender's latest HELLO, and a resume
below what the client acknowledged gets `fresh`. Each prints one line per step and exits non-zero with a
message at the first deviation from the document.

# Layout

Codec (`Reader`, `frame` and the encoders), then `Conn` (one TCP connection: framing, heartbeat, the ACK rule),
then `Client` (what a reliable client keeps across connections: token, `last`, its numbered outbox), then
`pump` (one select loop serving every open connection until a condition holds or a deadline passes), then the
two scenarios.
"""
import os
import select
import socket
import struct
import sys
import time

HELLO, WELCOME, PING, PONG, DATA, SUBSCRIBE, UNSUBSCRIBE, PRESENCE, BYE, UNDELIVERABLE, SDATA, ACK, REPORT = range(
    1, 14)
EXT_RELIABLE = 0x0003
DEFAULT_MAX_FRAME = 65536
ACK_EVERY = 16  # section 5: an ACK once 16 sequenced frames arrived since the last one ...
ACK_DELAY = 0.020  # ... or 20 ms after the first of them, whichever comes first
PATIENCE = 10.0  # every wait in this script ends by this many seconds
BYE_NORMAL, EOF, RESET, TAKEOVER = 1, 2, 3, 8


class Deviation(Exception):
    pass


def check(ok, msg):
    if not ok:
        raise Deviation(msg)


# ---- codec ------------------------------------------------------------------------------------------------------

class Reader:
    def __init__(self, body):
        self.b = bytes(body)
        self.i = 0

    def take(self, n):
        check(self.i + n <= len(self.b), "truncated")
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def str8(self, max_len=255):
        raw = self.take(self.u8())
        check(len(raw) <= max_len, f"str8 of {len(raw)} bytes, at most {max_len} allowed")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Deviation("invalid UTF-8")
        return raw

    def id(self):
        raw = self.str8(128)
        check(len(raw) >= 1, "empty id")
        return raw

    def bytes16(self):
        return self.take(self.u16())

    def left(self):
        return len(self.b) - self.i

    def rest(self):
        return self.take(self.left())

    def end(self):
        check(self.i == len(self.b), "trailing bytes")


def frame(kind, body):
    return struct.pack(">IB", len(body) + 1, kind) + body


def str8(raw):
    assert len(raw) <= 255
    return bytes([len(raw)]) + raw


def ext_entry(kind, value):
    return struct.pack(">HH", kind, len(value)) + value


def hello_v2(client_id, nonce, extensions):
    body = struct.pack(">BIQ", 2, 0, nonce) + str8(client_id) + struct.pack(">H", 0)
    return frame(HELLO, body + struct.pack(">H", len(extensions)) + extensions)


def parse_extensions(block):
    entries = {}
    r = Reader(block)
    while r.left():
        kind, n = r.u16(), r.u16()
        check(n <= r.left(), "extension runs past its block")
        check(kind not in entries, f"extension {kind:#06x} repeated")
        entries[kind] = r.take(n)
        check(len(entries) <= 64, "more than 64 extensions")
    return entries


# ---- one connection ---------------------------------------------------------------------------------------------

class Conn:
    def __init__(self, client, addr, extensions):
        self.client = client
        self.sock = socket.create_connection(addr, timeout=PATIENCE)
        # Before WELCOME nothing tells the limit: assume the default (section 1).
        self.max_frame = DEFAULT_MAX_FRAME
        self.buf = bytearray()
        self.welcome = None  # dict of the WELCOME fields once it arrived
        self.grant = None  # the `reliable` entry's fields, or None when the extension is not in effect
        self.started = self.last_sent = self.last_recv = time.monotonic()
        self.ping_seq = 0
        self.pongs = set()  # seqs of PONGs received, so a step can wait for one round trip
        self.pending = 0  # sequenced frames taken (or duplicates) since our last ACK
        self.pending_since = None  # when the first of them arrived (the 20 ms timer)
        self.sent_high = 0  # highest number of our stream sent on this connection: an ACK above it is an error
        self.acks = 0  # ACK frames the server sent on this connection
        self.bye = None  # (reason, retry_after_ms, alternative) of a BYE from the server
        self.closed = False
        self.expect_close = False  # we said BYE or half-closed: the server's close is then expected
        self.send(hello_v2(client.id, client.nonce, extensions))

    def send(self, raw):
        check(not self.closed, f"{self.client.name}: send on a closed connection")
        self.sock.sendall(raw)
        self.last_sent = time.monotonic()

    def flush_ack(self):
        c = self.client
        if not self.pending or self.welcome is None or self.expect_close:
            return  # a side ending the connection takes late SDATA without acknowledging it
        if c.ack_ceiling is not None and c.last > c.ack_ceiling:
            return  # the scenario's crash: these ACKs never leave the process
        self.send(frame(ACK, struct.pack(">Q", c.last)))
        self.pending, self.pending_since = 0, None

    def ping(self):
        self.flush_ack()  # an ACK pending goes out right before any PING or PONG
        self.ping_seq += 1
        ts = int((time.monotonic() - self.started) * 1e6)
        self.send(frame(PING, struct.pack(">IQ", self.ping_seq, ts)))
        return self.ping_seq

    def deadline(self):
        if self.welcome is None:
            return self.started + PATIENCE
        ds = [self.last_sent + self.welcome["heartbeat_ms"] / 1000, self.last_recv + self.welcome["timeout_ms"] / 1000]
        if self.pending_since is not None:
            ds.append(self.pending_since + ACK_DELAY)
        return min(ds)

    def tick(self, now):
        if self.welcome is None or self.closed:
            return
        if self.pending_since is not None and now - self.pending_since >= ACK_DELAY:
            self.flush_ack()
        if now - self.last_sent >= self.welcome["heartbeat_ms"] / 1000 and not self.expect_close:
            self.ping()
        check(now - self.last_recv < self.welcome["timeout_ms"] / 1000,
              f"{self.client.name}: the server was silent for timeout_ms")

    def on_readable(self):
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            self.sock.close()
            check(self.expect_close, f"{self.client.name}: the server closed the connection (BYE {self.bye})")
            return
        self.last_recv = time.monotonic()
        self.buf += data
        self.parse()

    def parse(self):
        c = self.client
        while len(self.buf) >= 4 and not self.closed:
            if c.take_limit is not None and c.last >= c.take_limit:
                return  # the application stopped reading here; the rest dies with the connection
            n = struct.unpack(">I", self.buf[:4])[0]
            check(n != 0, "frame len 0")
            check(n <= self.max_frame, f"frame len {n} over the maximum {self.max_frame}")
            if len(self.buf) < 4 + n:
                return
            kind, body = self.buf[4], Reader(self.buf[5:4 + n])
            del self.buf[:4 + n]
            self.handle(kind, body)

    def handle(self, kind, r):
        c = self.client
        if self.welcome is None:
            check(kind in (WELCOME, BYE), f"{c.name}: frame kind {kind} before WELCOME")
        if kind == WELCOME:
            check(self.welcome is None, "a second WELCOME")
            self.on_welcome(r)
        elif kind == PING:
            seq, ts = r.u32(), r.u64()
            r.end()
            if self.expect_close:
                return  # after our BYE (or FIN) we send nothing more
            self.flush_ack()
            self.send(frame(PONG, struct.pack(">IQ", seq, ts)))
        elif kind == PONG:
            seq, _ts = r.u32(), r.u64()
            r.end()
            self.pongs.add(seq)
        elif kind == DATA:
            peer, payload = r.str8(128), r.rest()
            c.plain.append((peer, payload))
        elif kind == PRESENCE:
            who, state, reason, ago, flags = r.id(), r.u8(), r.u8(), r.u32(), r.u8()
            r.end()
            check(state in (1, 2, 3), f"presence state {state}")
            check(reason != 0 or state != 3 or ago == 0xFFFFFFFF, "offline reason 0 with a last-seen time")
            c.presence.append((who.decode(), state, reason, ago, flags))
        elif kind == BYE:
            reason, retry, alt = r.u8(), r.u32(), r.str8()
            r.end()
            check(reason != 0, "BYE reason 0")
            self.bye = (reason, retry, alt)
        elif kind == UNDELIVERABLE:
            to, why = r.id(), r.u8()
            r.end()
            c.undeliverable.append((to, why))
        elif kind in (SDATA, REPORT, ACK):
            check(self.grant is not None, f"{c.name}: kind {kind} without the reliable extension in effect")
            if kind == ACK:
                self.on_ack(r)
            else:
                self.on_sequenced(kind, r)
        else:
            raise Deviation(f"{c.name}: frame kind {kind} from the server")

    def on_welcome(self, r):
        c = self.client
        version = r.u8()
        check(version == 2, f"{c.name}: WELCOME version {version}, offered 2")
        w = {"version": version, "heartbeat_ms": r.u32(), "timeout_ms": r.u32(), "epoch": r.u64(),
             "server_id": r.str8(), "max_frame": r.u32()}
        exts = parse_extensions(r.bytes16())
        r.end()
        check(w["heartbeat_ms"] >= 1 and w["timeout_ms"] > w["heartbeat_ms"], f"bad heartbeat in {w}")
        check(256 <= w["max_frame"] <= 1 << 24, f"max_frame {w['max_frame']}")
        self.max_frame = w["max_frame"]
        self.welcome = w
        rel = exts.get(EXT_RELIABLE)
        if rel is None or len(rel) != 30 or rel[16] > 3:
            return  # not in effect: at most once, and SDATA/ACK/REPORT are a protocol_error
        g = {"token": rel[:16], "status": rel[16], "why": rel[17],
             "received": struct.unpack(">Q", rel[18:26])[0], "lost": struct.unpack(">I", rel[26:30])[0]}
        self.grant = g
        c.token = g["token"]
        if g["status"] in (1, 2):  # resumed: the server has our stream up to `received`
            check(g["received"] < c.next_seq, f"{c.name}: server has {g['received']}, we numbered {c.next_seq - 1}")
            check(g["received"] >= c.server_acked, f"{c.name}: server has {g['received']}, it acked {c.server_acked}")
            for seq in [s for s in c.kept if s <= g["received"]]:
                del c.kept[seq]
            self.sent_high = g["received"]
            c.resent = list(c.kept)
            for seq, (peer, payload) in list(c.kept.items()):
                self.send_sdata(seq, peer, payload)
        else:  # new or fresh: both streams start at 1
            c.unknown_fate = list(c.kept)
            c.kept.clear()
            c.last, c.next_seq, c.server_acked = 0, 1, 0

    def send_sdata(self, seq, peer, payload):
        self.send(frame(SDATA, struct.pack(">Q", seq) + str8(peer) + payload))
        self.sent_high = max(self.sent_high, seq)

    def on_ack(self, r):
        c = self.client
        seq = r.u64()
        r.end()
        check(seq <= self.sent_high, f"{c.name}: ACK {seq} above the {self.sent_high} sent")
        self.acks += 1
        c.server_acked = max(c.server_acked, seq)
        for s in [s for s in c.kept if s <= seq]:
            del c.kept[s]

    def on_sequenced(self, kind, r):
        c = self.client
        seq = r.u64()
        check(seq != 0, "sequence number 0")
        peer = r.str8(128)
        if kind == SDATA:
            item, box = (peer, r.rest()), c.inbox
        else:
            outcome, count = r.u8(), r.u16()
            check(count * 8 <= r.left(), "REPORT count larger than the frame")
            nums = [r.u64() for _ in range(count)]
            r.end()
            check(count > 0 and 0 not in nums, f"REPORT numbers {nums}")
            item, box = (peer, outcome, nums), c.reports
        if seq <= c.last:
            c.dups += 1  # dropped, and acknowledged again
        else:
            check(seq == c.last + 1, f"{c.name}: gap: got {seq} after {c.last}")
            c.last = seq
            box.append(item)
        if self.pending == 0:
            self.pending_since = time.monotonic()
        self.pending += 1
        if self.pending >= ACK_EVERY or (c.ack_ceiling is not None and c.last == c.ack_ceiling):
            self.flush_ack()


# ---- what a client keeps across connections ---------------------------------------------------------------------

class Client:
    KEPT_LIMIT = 1000  # the outbox's bound: the application is refused beyond it, nothing is dropped

    def __init__(self, name, client_id, receipts):
        self.name = name
        self.id = client_id.encode()
        self.nonce = int.from_bytes(os.urandom(8), "big")  # one per process start, kept across reconnects
        self.receipts = receipts
        self.token = None
        self.last = 0  # the last number of the server's stream taken in order
        self.next_seq = 1  # our stream's next number
        self.kept = {}  # our stream: seq -> (peer, payload), kept until an ACK covers it (insertion-ordered)
        self.server_acked = 0  # highest ACK of our stream: a resume never says the server has less
        self.inbox = []  # SDATA taken: (peer, payload)
        self.reports = []  # REPORTs taken: (peer, outcome, [numbers])
        self.presence, self.undeliverable, self.plain = [], [], []
        self.dups = 0
        self.resent = []  # numbers sent again at the last resume
        self.unknown_fate = []  # numbers kept when a session came back fresh
        self.ack_ceiling = None  # scenario hook: ACKs above this number are never sent (a crash loses them)
        self.take_limit = None  # scenario hook: stop reading once `last` reaches this
        self.conn = None

    def connect(self, addr, token=None):
        """Open a connection offering `reliable`: a resume when we hold a token (or are given one to present)."""
        value = bytes([1 if self.receipts else 0])
        token = token or self.token
        if token is not None:
            value += token + struct.pack(">Q", self.last)
        self.conn = Conn(self, addr, ext_entry(EXT_RELIABLE, value))
        pump(lambda: self.conn.welcome is not None, f"{self.name} WELCOME")
        check(self.conn.grant is not None, f"{self.name}: reliable not granted")
        return self.conn.welcome, self.conn.grant

    def send(self, peer, payload, write=True):
        check(len(self.kept) < self.KEPT_LIMIT, f"{self.name}: outbox full")
        seq = self.next_seq
        self.next_seq += 1
        self.kept[seq] = (peer, payload)
        if write:
            self.conn.send_sdata(seq, peer, payload)
        return seq

    def abort(self):
        """Drop the connection abruptly: no BYE, a reset (linger 0)."""
        self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.sock.close()
        self.conn.closed = True

    def half_close(self):
        """Drop the connection without BYE: close our write half, then wait for the server to close."""
        self.conn.expect_close = True
        self.conn.sock.shutdown(socket.SHUT_WR)
        pump(lambda: self.conn.closed, f"{self.name}: server closes after our FIN")

    def bye(self):
        self.conn.flush_ack()
        self.conn.expect_close = True
        self.conn.send(frame(BYE, struct.pack(">BI", BYE_NORMAL, 0) + str8(b"")))
        pump(lambda: self.conn.closed, f"{self.name}: server closes after our BYE")
        check(self.conn.bye is None, f"{self.name}: answered our BYE with BYE {self.conn.bye}")


CLIENTS = []


def pump(until, what, patience=PATIENCE):
    """Serve every open connection (frames, PINGs, ACK timers) until `until()` holds; fail after `patience`."""
    deadline = time.monotonic() + patience
    while not until():
        now = time.monotonic()
        check(now < deadline, f"timed out waiting for {what}")
        live = [c.conn for c in CLIENTS if c.conn is not None and not c.conn.closed]
        for conn in live:
            conn.tick(now)
        if until():
            return
        wait = min([deadline] + [conn.deadline() for conn in live]) - time.monotonic()
        ready, _, _ = select.select([conn.sock for conn in live], [], [], max(0.0, wait))
        for conn in live:
            if conn.sock in ready and not conn.closed:
                conn.on_readable()


# ---- the scenario -----------------------------------------------------------------------------------------------

def msg(n):
    return f"m{n}".encode()


def numbers(inbox, sender):
    """The message numbers of `inbox` (payloads `m7`, `b7`), all of which must come from `sender`."""
    out = []
    for peer, payload in inbox:
        check(peer == sender, f"SDATA from {peer!r}, expected {sender!r}")
        out.append(int(payload[1:]))
    return out


def delivered(client, outcome=0):
    """The numbers `client`'s REPORTs gave `outcome` (0: receipts); each must be reported once."""
    nums = [n for _peer, o, ns in client.reports if o == outcome for n in ns]
    check(len(nums) == len(set(nums)), f"{client.name}: a number reported twice: {sorted(nums)}")
    return set(nums)


def presence_of(client, state, reason):
    return any(p[1] == state and p[2] == reason for p in client.presence)


def main(addr):
    a, b = Client("a", "a", receipts=True), Client("b", "b", receipts=False)
    CLIENTS.extend([a, b])

    # 1. Both connect asking for the extension; a watches b's presence.
    w, g = a.connect(addr)
    check((w["heartbeat_ms"], w["timeout_ms"]) == (500, 1500), f"heartbeat {w}")
    for name, grant in (("a", g), ("b", b.connect(addr)[1])):
        check((grant["status"], grant["why"], grant["received"], grant["lost"]) == (0, 0, 0, 0), f"{name}: {grant}")
    check(b.conn.welcome["epoch"] > w["epoch"], "epochs do not increase")
    a.conn.send(frame(SUBSCRIBE, struct.pack(">H", 1) + str8(b"b")))
    pump(lambda: presence_of(a, 1, 0), "a: b online")
    print(f"step 1 ok: a and b granted reliable, status new; version=2 heartbeat_ms=500 timeout_ms=1500 "
          f"max_frame={w['max_frame']} epochs {w['epoch']},{b.conn.welcome['epoch']}", flush=True)

    # 2. 100 numbered messages a -> b, acknowledged by the rule, a receipt for each.
    for n in range(1, 101):
        a.send(b"b", msg(n))
    pump(lambda: b.last >= 100 and not a.kept and len(delivered(a)) >= 100, "100 messages, ACKs and receipts")
    check(numbers(b.inbox, b"a") == list(range(1, 101)) and b.dups == 0, f"b took {numbers(b.inbox, b'a')}")
    check(delivered(a) == set(range(1, 101)), f"receipts {sorted(delivered(a))}")
    print(f"step 2 ok: b took 1..100 in order once; a got {a.conn.acks} ACKs and receipts for 1..100 "
          f"in {len(a.reports)} REPORTs", flush=True)

    # 3. b takes 60 of a second batch, acknowledges 40 of them, sends its own messages (the last two numbered but
    #    never written: they die in its outbox), and drops the connection with a reset; a sends 50 more.
    for n in range(101, 201):
        a.send(b"b", msg(n))
    b.ack_ceiling, b.take_limit = 140, 160
    for n in range(1, 11):
        b.send(b"a", f"b{n}".encode(), write=n <= 8)
    pump(lambda: b.last >= 160, "b takes 160")
    acked_before = b.server_acked
    b.abort()
    for n in range(201, 251):
        a.send(b"b", msg(n))
    pump(lambda: presence_of(a, 3, RESET) and not a.kept, "a: b offline (reset), its 250 acknowledged")
    check(a.presence[-1][4] & 1, f"offline without the by-client flag: {a.presence[-1]}")
    beats = a.conn.ping_seq + 3  # b stays away through three of a's heartbeats, longer than timeout_ms
    pump(lambda: {beats - 2, beats - 1, beats} <= a.conn.pongs, "a: three heartbeats answered")
    b.ack_ceiling = b.take_limit = None
    before = len(b.inbox)
    w, g = b.connect(addr)
    check((g["status"], g["why"], g["lost"]) == (1, 0, 0), f"resume grant {g}")
    check(g["token"] == b.token, "the token changed on resume")
    pump(lambda: b.last >= 250 and not b.kept and len(a.inbox) >= 10 and len(delivered(a)) >= 250,
         "b's resume: a's 161..250 to b, b's messages to a, receipts")
    got = numbers(b.inbox[before:], b"a")
    check(got == list(range(161, 251)), f"after resume b took {got}")
    check(b.dups == 0, f"b got {b.dups} duplicates of what it had")
    check(numbers(a.inbox, b"b") == list(range(1, 11)), f"a took {a.inbox}")
    check(delivered(a) == set(range(1, 251)) and len(delivered(a, 5)) == 0, f"receipts {sorted(delivered(a))}")
    print(f"step 3 ok: resumed after b was away through 3 heartbeats; b had taken 160 (acked 140), got 161..250 "
          f"once in order, no duplicates; server had b's stream to {g['received']} (ACK seen {acked_before}, "
          f"8 written, 10 numbered), b resent {b.resent}; a got receipts for 1..250", flush=True)

    # 4. b drops again (FIN) with 3 messages held for it; a connection with a forged token takes the id.
    b.half_close()
    pump(lambda: presence_of(a, 3, EOF), "a: b offline (eof)")
    held = [a.send(b"b", msg(n)) for n in range(251, 254)]
    pump(lambda: not a.kept, "a: 251..253 acknowledged (held for b)")
    forged = bytearray(b.token)
    forged[8:] = os.urandom(8)  # the real store, a guessed random part
    c = Client("c", "b", receipts=False)
    CLIENTS.append(c)
    _w, gc = c.connect(addr, token=bytes(forged))
    check((gc["status"], gc["why"], gc["received"], gc["lost"]) == (3, 4, 0, 0xFFFFFFFF), f"forged grant {gc}")
    check(gc["token"] != b.token, "the forged connection was given b's token")
    pump(lambda: delivered(a, 5) == set(held), "a: REPORT replaced for 251..253")
    seq = c.conn.ping()
    pump(lambda: seq in c.conn.pongs, "c: one round trip")
    check(not c.inbox and c.last == 0, f"the forged connection got {c.inbox}")
    c.conn.expect_close = True  # the forger stays online: the real b takes the id back from it
    old_token = b.token
    w, g = b.connect(addr)
    check((g["status"], g["why"], g["lost"]) == (3, 5, 3), f"b's resume after the forgery: {g}")
    check(g["token"] not in (old_token, gc["token"]), "a fresh session reuses a token")
    pump(lambda: c.conn.closed, "the forged connection closed")
    check(c.conn.bye is not None and c.conn.bye[0] == TAKEOVER, f"the forger got {c.conn.bye}, not takeover")
    check(b.last == 0 and b.next_seq == 1 and not b.unknown_fate, "fresh: both streams start at 1")
    a.send(b"b", msg(254))
    b.send(b"a", b"b-fresh")
    pump(lambda: b.inbox[-1:] == [(b"a", msg(254))] and a.inbox[-1:] == [(b"b", b"b-fresh")] and not a.kept
         and not b.kept and 254 in delivered(a), "the fresh session carries both ways")
    check(b.last == 1, f"the fresh stream to b numbered {b.last}")
    print(f"step 4 ok: forged token got fresh/unknown_token lost=unknown and nothing of b's; a got REPORT replaced "
          f"for {sorted(held)}; b's resume (forger online) got fresh/replaced lost={g['lost']}, the forger "
          f"BYE(takeover); new streams start at 1", flush=True)

    # 5. Clean goodbye.
    a.bye()
    b.bye()
    check(not a.undeliverable and not b.undeliverable and not a.plain and not b.plain, "unexpected frames")
    print("step 5 ok: bye, both closed cleanly", flush=True)


def round_trip(client):
    """One PING answered: everything the server had queued for this connection before it arrived."""
    seq = client.conn.ping()
    pump(lambda: seq in client.conn.pongs, f"{client.name}: PONG {seq}")


def edges(addr):
    x, y = Client("x", "x", receipts=True), Client("y", "y", receipts=False)
    CLIENTS.extend([x, y])
    x.connect(addr)
    y.connect(addr)

    # Receipts follow the flag of the sender's latest HELLO when the receiver acknowledges, not the flag the
    # message was sent under. y is away (its session holds what x sends); x resumes with the flag flipped.
    for flag in (False, True):
        y.half_close()
        x.send(b"y", b"flag-%d" % flag)
        pump(lambda: not x.kept, "x: its message held for y")
        x.abort()
        x.receipts = flag
        check(x.connect(addr)[1]["status"] == 1, "x's resume")
        check(y.connect(addr)[1]["status"] == 1, "y's resume")
        pump(lambda: y.inbox[-1:] == [(b"x", b"flag-%d" % flag)], "y takes x's message")
        round_trip(y)  # the PING carries y's pending ACK ahead of it: the server has it
        round_trip(x)  # and x has what the server queued for it before
        got = [ns for _p, o, ns in x.reports if o == 0 and x.next_seq - 1 in ns]
        check(bool(got) == flag, f"receipts {'on' if flag else 'off'} at the resume, yet receipts: {x.reports}")
    print("edges 1 ok: receipts follow the sender's latest HELLO when the receiver acknowledges", flush=True)

    # A resume that offers less than the client acknowledged: the server released those frames, so the session
    # cannot continue. It ends (what it held is reported `replaced`) and the answer is fresh/unknown_token.
    for n in range(1, 21):
        x.send(b"y", msg(n))
    pump(lambda: len(y.inbox) >= 22 and not x.kept, "y takes 20 more")
    round_trip(y)  # y's ACK of all it took is in
    acked = y.last
    y.half_close()
    held = [x.send(b"y", msg(n)) for n in range(21, 24)]
    pump(lambda: not x.kept, "x: 21..23 held for y")
    y.last = acked - 5
    g = y.connect(addr)[1]
    check((g["status"], g["why"], g["received"], g["lost"]) == (3, 4, 0, 0xFFFFFFFF), f"below-acked resume: {g}")
    pump(lambda: delivered(x, 5) == set(held), "x: REPORT replaced for what y's session held")
    round_trip(y)
    check(len(y.inbox) == 22, f"y got {y.inbox[22:]} after a fresh session")
    print(f"edges 2 ok: a resume offering {acked - 5} after acknowledging {acked} got fresh/unknown_token, "
          f"its held {held} reported replaced", flush=True)
    x.bye()
    y.bye()
    print("edges ok", flush=True)


if __name__ == "__main__":
    host, _, port = sys.argv[1].rpartition(":")
    try:
        {"scenario": main, "edges": edges}[sys.argv[2] if len(sys.argv) > 2 else "scenario"]((host, int(port)))
    except (Deviation, OSError) as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
