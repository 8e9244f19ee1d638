#!/usr/bin/env python3
"""SCTP from user space over raw IP sockets (protocol 132): the lab kernels have no SCTP
stack. Enough of RFC 9260 for a single-homed association: INIT / INIT ACK / COOKIE ECHO /
COOKIE ACK, DATA with SACK, HEARTBEAT, SHUTDOWN / SHUTDOWN ACK / SHUTDOWN COMPLETE, ABORT.
Every packet sent carries a CRC32c computed here; every packet received is checked.

  sctp.py serve NAME PORT
      An echo server: answers INITs to PORT, echoes each DATA chunk back prefixed with NAME.
  sctp.py assoc VIP PORT SECONDS [--interval S] [--t0-file F]
      One association to VIP:PORT: handshake, one DATA every S seconds for SECONDS (each
      retransmitted every 0.2 s until echoed), then a graceful shutdown. Prints a JSON report:
      sent, echoed, retransmits, max_gap_ms (longest wait for an echo), backend, errors,
      shutdown (completed).
"""
import json
import os
import random
import socket
import struct
import sys
import time

IPPROTO_SCTP = 132
DATA, INIT, INIT_ACK, SACK, HEARTBEAT, HEARTBEAT_ACK, ABORT = 0, 1, 2, 3, 4, 5, 6
SHUTDOWN, SHUTDOWN_ACK, COOKIE_ECHO, COOKIE_ACK, SHUTDOWN_COMPLETE = 7, 8, 10, 11, 14


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


TABLE = _table()


def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = TABLE[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def chunk(ty, flags, value=b""):
    c = struct.pack("!BBH", ty, flags, 4 + len(value)) + value
    return c + b"\0" * (-len(c) % 4)


def packet(sport, dport, vtag, chunks):
    p = bytearray(struct.pack("!HHII", sport, dport, vtag, 0) + chunks)
    p[8:12] = struct.pack("<I", crc32c(bytes(p)))
    return bytes(p)


def parse(data, v6):
    """(src port, dst port, vtag, [(type, flags, value)]) of a received packet, or None."""
    if not v6:
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < 16:
        return None
    got = struct.unpack("<I", data[8:12])[0]
    if crc32c(data[:8] + b"\0\0\0\0" + data[12:]) != got:
        return None
    sport, dport, vtag = struct.unpack("!HHI", data[:8])
    chunks, off = [], 12
    while off + 4 <= len(data):
        ty, fl, ln = struct.unpack("!BBH", data[off:off + 4])
        if ln < 4 or off + ln > len(data):
            break
        chunks.append((ty, fl, data[off + 4:off + ln]))
        off += (ln + 3) & ~3
    return sport, dport, vtag, chunks


def init_value(tag, tsn, cookie=None):
    v = struct.pack("!IIHHI", tag, 65535, 10, 10, tsn)
    if cookie is not None:
        v += struct.pack("!HH", 7, 4 + len(cookie)) + cookie + b"\0" * (-len(cookie) % 4)
    return v


def data_chunk(tsn, payload):
    return chunk(DATA, 0x03, struct.pack("!IHHI", tsn, 0, 0, 60) + payload)


def sack(cum):
    return chunk(SACK, 0, struct.pack("!IIHH", cum, 65535, 0, 0))


def sock_for(addr):
    v6 = ":" in addr
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    return s, v6


def serve(name, port):
    v6 = os.environ.get("SCTP_V6") == "1"
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    assocs = {}
    while True:
        data, addr = s.recvfrom(65535)
        p = parse(data, v6)
        if p is None:
            continue
        sport, dport, vtag, chunks = p
        if dport != port or not chunks:
            continue
        peer = (addr[0], sport)
        a = assocs.get(peer)
        out = b""
        for ty, fl, val in chunks:
            if ty == INIT and len(val) >= 16:
                peer_tag, _, _, _, peer_tsn = struct.unpack("!IIHHI", val[:16])
                a = {"peer_tag": peer_tag, "tag": random.randint(1, 2**32 - 1), "tsn": 1}
                assocs[peer] = a
                cookie = os.urandom(8)
                s.sendto(packet(port, sport, peer_tag, chunk(INIT_ACK, 0, init_value(a["tag"], 1, cookie))), (addr[0], 0))
                out = b""
                break
            if a is None or vtag != a["tag"] and not (ty in (ABORT, SHUTDOWN_COMPLETE) and fl & 1):
                continue
            if ty == COOKIE_ECHO:
                out += chunk(COOKIE_ACK, 0)
            elif ty == DATA and len(val) >= 12:
                tsn = struct.unpack("!I", val[:4])[0]
                out += sack(tsn)
                out += data_chunk(a["tsn"], name.encode() + b" " + val[12:])
                a["tsn"] += 1
            elif ty == HEARTBEAT:
                out += chunk(HEARTBEAT_ACK, 0, val)
            elif ty == SHUTDOWN:
                out += chunk(SHUTDOWN_ACK, 0)
            elif ty in (SHUTDOWN_COMPLETE, ABORT):
                assocs.pop(peer, None)
                a = None
                out = b""
                break
        if out and a is not None:
            s.sendto(packet(port, sport, a["peer_tag"], out), (addr[0], 0))


def assoc(vip, port, seconds, interval, t0_file):
    s, v6 = sock_for(vip)
    s.settimeout(0.05)
    sport = random.randint(20000, 60000)
    tag = random.randint(1, 2**32 - 1)
    rep = {"sent": 0, "echoed": 0, "retransmits": 0, "max_gap_ms": 0, "backend": None,
           "backends": [], "errors": [], "shutdown": False, "sport": sport}

    def recv_until(pred, deadline, resend=None, every=0.2):
        last = time.monotonic()
        while time.monotonic() < deadline:
            if resend is not None and time.monotonic() - last >= every:
                s.sendto(resend, (vip, 0))
                rep["retransmits"] += 1
                last = time.monotonic()
            try:
                data, addr = s.recvfrom(65535)
            except socket.timeout:
                continue
            if addr[0] != vip:
                continue
            p = parse(data, v6)
            if p is None or p[0] != port or p[1] != sport or p[2] != tag:
                continue
            for c in p[3]:
                if c[0] == ABORT:
                    raise RuntimeError("ABORT from the endpoint")
                r = pred(c)
                if r is not None:
                    return r
        return None

    try:
        if t0_file:
            open(t0_file, "w").write(str(time.time()))
        init = packet(sport, port, 0, chunk(INIT, 0, init_value(tag, 1)))
        s.sendto(init, (vip, 0))

        def on_init_ack(c):
            if c[0] != INIT_ACK or len(c[2]) < 16:
                return None
            peer_tag = struct.unpack("!I", c[2][:4])[0]
            off, cookie = 16, None
            while off + 4 <= len(c[2]):
                pt, pl = struct.unpack("!HH", c[2][off:off + 4])
                if pl < 4:
                    break
                if pt == 7:
                    cookie = c[2][off + 4:off + pl]
                off += (pl + 3) & ~3
            return (peer_tag, cookie or b"")

        r = recv_until(on_init_ack, time.monotonic() + 3, resend=init, every=0.5)
        if r is None:
            raise RuntimeError("no INIT ACK")
        peer_tag, cookie = r
        echo = packet(sport, port, peer_tag, chunk(COOKIE_ECHO, 0, cookie))
        s.sendto(echo, (vip, 0))
        if recv_until(lambda c: True if c[0] == COOKIE_ACK else None, time.monotonic() + 3, resend=echo, every=0.5) is None:
            raise RuntimeError("no COOKIE ACK")
        end = time.monotonic() + seconds
        tsn, peer_cum = 1, 0
        while time.monotonic() < end:
            msg = b"msg %d" % tsn
            pkt = packet(sport, port, peer_tag, data_chunk(tsn, msg))
            sent_at = time.monotonic()
            s.sendto(pkt, (vip, 0))
            rep["sent"] += 1

            def on_echo(c):
                if c[0] == DATA and len(c[2]) >= 12 and c[2][12:].endswith(b" " + msg):
                    return (struct.unpack("!I", c[2][:4])[0], c[2][12:].split(b" ", 1)[0].decode())
                return None

            r = recv_until(on_echo, sent_at + 10, resend=pkt, every=0.2)
            if r is None:
                raise RuntimeError("DATA %d not echoed within 10 s" % tsn)
            peer_cum, backend = r
            rep["echoed"] += 1
            rep["max_gap_ms"] = max(rep["max_gap_ms"], int((time.monotonic() - sent_at) * 1000))
            if backend not in rep["backends"]:
                rep["backends"].append(backend)
            rep["backend"] = backend
            s.sendto(packet(sport, port, peer_tag, sack(peer_cum)), (vip, 0))
            tsn += 1
            time.sleep(interval)
        shut = packet(sport, port, peer_tag, chunk(SHUTDOWN, 0, struct.pack("!I", peer_cum)))
        s.sendto(shut, (vip, 0))
        if recv_until(lambda c: True if c[0] == SHUTDOWN_ACK else None, time.monotonic() + 3, resend=shut, every=0.5):
            s.sendto(packet(sport, port, peer_tag, chunk(SHUTDOWN_COMPLETE, 0)), (vip, 0))
            rep["shutdown"] = True
    except Exception as e:  # noqa: BLE001 - reported, never a crash
        rep["errors"].append(str(e))
    print(json.dumps(rep))


def opt(name, default=None):
    a = sys.argv
    return a[a.index(name) + 1] if name in a[:-1] else default


def main():
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "assoc":
        assoc(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
              float(opt("--interval", "0.05")), opt("--t0-file"))
    else:
        sys.exit("usage: sctp.py serve NAME PORT | assoc VIP PORT SECONDS")


if __name__ == "__main__":
    main()
