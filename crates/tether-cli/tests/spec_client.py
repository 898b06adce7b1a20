#!/usr/bin/env python3
"""A tether client written from docs/protocol.md alone (standard library only).

Usage: spec_client.py HOST:PORT CLIENT_ID
Handshakes, subscribes to itself, relays DATA to itself through the server, pings and answers the server's
ping, then says BYE and expects the server to close. Prints one line per step; exits non-zero on any deviation.
"""
import os
import socket
import struct
import sys

MAX_FRAME = 65536
HELLO, WELCOME, PING, PONG, DATA, SUBSCRIBE, UNSUBSCRIBE, PRESENCE, BYE, UNDELIVERABLE = range(1, 11)


def str8(text):
    raw = text.encode("utf-8")
    return bytes([len(raw)]) + raw


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    me = sys.argv[2]
    sock = socket.create_connection((host, int(port)), timeout=10)

    def send(kind, body):
        sock.sendall(struct.pack(">IB", len(body) + 1, kind) + body)

    def recv_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv_frame():
        header = recv_exact(4)
        if header is None:
            return None, None
        (length,) = struct.unpack(">I", header)
        if not 1 <= length <= MAX_FRAME:
            sys.exit(f"bad frame length {length}")
        body = recv_exact(length)
        return body[0], body[1:]

    # 1. HELLO, then WELCOME.
    nonce = int.from_bytes(os.urandom(8), "big")
    send(HELLO, struct.pack(">BIQ", 1, 500, nonce) + str8(me) + struct.pack(">H", 0))
    kind, body = recv_frame()
    if kind != WELCOME:
        sys.exit(f"expected WELCOME, got kind {kind}")
    version, heartbeat_ms, timeout_ms, epoch = struct.unpack(">BIIQ", body[:17])
    server_id = body[18 : 18 + body[17]].decode()
    print(f"welcome version={version} heartbeat_ms={heartbeat_ms} timeout_ms={timeout_ms} epoch={epoch} server={server_id}")

    # 2. Subscribe to ourselves, relay DATA to ourselves, and ping.
    send(SUBSCRIBE, struct.pack(">H", 1) + str8(me))
    send(DATA, str8(me) + b"hello from python")
    send(PING, struct.pack(">IQ", 1, 123456))

    # 3. Collect the snapshot, the relayed data, our PONG, and one PING from the server (answered).
    want = {"presence", "data", "pong", "server-ping"}
    seen = set()
    while seen != want:
        kind, body = recv_frame()
        if kind is None:
            sys.exit(f"server closed early; saw {sorted(seen)}")
        if kind == PRESENCE:
            n = body[0]
            cid, state = body[1 : 1 + n].decode(), body[1 + n]
            if cid != me or state != 1:
                sys.exit(f"unexpected presence {cid} state {state}")
            seen.add("presence")
        elif kind == DATA:
            n = body[0]
            peer, payload = body[1 : 1 + n].decode(), body[1 + n :]
            if peer != me or payload != b"hello from python":
                sys.exit(f"unexpected data from {peer!r}: {payload!r}")
            seen.add("data")
        elif kind == PONG:
            seq, ts = struct.unpack(">IQ", body)
            if (seq, ts) != (1, 123456):
                sys.exit(f"PONG did not echo: {seq} {ts}")
            seen.add("pong")
        elif kind == PING:
            send(PONG, body)
            seen.add("server-ping")
        else:
            sys.exit(f"unexpected kind {kind}")
        print("got", sorted(seen))

    # 4. Goodbye: BYE(bye), then the server closes.
    send(BYE, struct.pack(">BI", 1, 0) + str8(""))
    while True:
        kind, _ = recv_frame()
        if kind is None:
            break
    print("closed cleanly")


if __name__ == "__main__":
    main()
