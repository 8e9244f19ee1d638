#!/usr/bin/env python3
"""Hostile and legitimate traffic for attack_e2e.rs, run inside the lab's client namespace
(stdlib only). Every mode is bounded in count and time and prints one JSON line.

  flood KIND DST PORT COUNT RATE MAXSECS   spoofed TCP segments (KIND: syn, null, ack) or UDP
                                          datagrams (KIND: udp) from random sources in
                                          100.64.0.0/10 at about RATE/s
  probe DST PORT EVERY_MS SECS TIMEOUT_MS  a new connection every EVERY_MS: connect, one echo
                                          line, close; counts those done within TIMEOUT_MS
  streams DST PORT N SECS                 N connections kept open, a line each every 200 ms
  reconnect DST PORT SPORT N              N connections one after the other from one source
                                          port, each closed (with a reset) before the next
  rst_idle DST PORT RSTS IDLE_S           one connection; RSTS spoofed resets with random
                                          sequence numbers on it; IDLE_S idle; then one line
  malformed IFACE DSTMAC SRC DST PORT     one frame of each malformed kind, on IFACE
  hold DST PORT N SECS                    N TCP connections opened and left idle; after 1 s,
                                          how many the server had closed; the rest held for
                                          SECS, then closed
"""
import json
import os
import random
import select
import socket
import struct
import sys
import time


def csum(data, init=0):
    if len(data) % 2:
        data += b"\0"
    s = init + sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def tcp_segment(src, dst, sport, dport, seq, ack, flags, payload=b"", doff=5):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 64240, 0, 0)
    seg = hdr + payload
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    c = csum(pseudo + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def ip_header(src, dst, proto, payload_len, ttl=64, ihl=5, version=4, tot_len=None):
    tl = 20 + payload_len if tot_len is None else tot_len
    h = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, tl, 0x4242, 0, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:]


def raw_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


def udp_datagram(sport, dport, payload):
    # Checksum 0: none (allowed over IPv4).
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def flood(kind, dst, port, count, rate, maxsecs):
    flags = {"syn": 0x02, "null": 0x00, "ack": 0x10, "udp": 0}[kind]
    s = raw_socket()
    rnd = random.Random(os.getpid())
    sent = failed = 0
    start = time.monotonic()
    burst = 200
    while sent + failed < count and time.monotonic() - start < maxsecs:
        for _ in range(min(burst, count - sent - failed)):
            a = rnd.getrandbits(22)
            src = "100.%d.%d.%d" % (64 + (a >> 16), (a >> 8) & 0xFF, a & 0xFF)
            if kind == "udp":
                proto, seg = 17, udp_datagram(rnd.randint(1024, 65535), port, b"flood\n")
            else:
                proto = 6
                seg = tcp_segment(src, dst, rnd.randint(1024, 65535), port, rnd.getrandbits(32),
                                  rnd.getrandbits(32) if flags & 0x10 else 0, flags)
            try:
                s.sendto(ip_header(src, dst, proto, len(seg)) + seg, (dst, 0))
                sent += 1
            except OSError:
                failed += 1
        # Pace: where the sender should be by now at RATE per second.
        ahead = (sent + failed) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    print(json.dumps({"sent": sent, "failed": failed, "secs": round(time.monotonic() - start, 3)}))


def echo_once(dst, port, timeout, sport=None, linger_reset=False):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        if sport is not None:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind(("0.0.0.0", sport))
        c.connect((dst, port))
        c.sendall(b"hello\n")
        got = b""
        while not got.endswith(b"\n"):
            b = c.recv(256)
            if not b:
                return False
            got += b
        return got.endswith(b" hello\n")
    except OSError:
        return False
    finally:
        if linger_reset:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


def probe(dst, port, every_ms, secs, timeout_ms):
    ok = fail = 0
    failures = []
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < secs:
        t0 = time.monotonic()
        if echo_once(dst, port, timeout_ms / 1000.0):
            ok += 1
        else:
            fail += 1
            failures.append(round(t0 - start, 2))
        n += 1
        nxt = start + n * every_ms / 1000.0
        time.sleep(max(0.0, nxt - time.monotonic()))
    print(json.dumps({"ok": ok, "fail": fail, "failed_at": failures[:20]}))


def streams(dst, port, n, secs):
    conns = []
    for _ in range(n):
        c = socket.create_connection((dst, port), timeout=3)
        c.settimeout(3)
        conns.append(c)
    alive = [True] * n
    start = time.monotonic()
    rounds = 0
    while time.monotonic() - start < secs:
        for i, c in enumerate(conns):
            if not alive[i]:
                continue
            try:
                c.sendall(b"tick %d\n" % rounds)
                got = b""
                while not got.endswith(b"\n"):
                    b = c.recv(256)
                    if not b:
                        raise OSError("closed")
                    got += b
            except OSError:
                alive[i] = False
        rounds += 1
        time.sleep(0.2)
    for c in conns:
        c.close()
    print(json.dumps({"intact": sum(alive), "streams": n, "rounds": rounds}))


def reconnect(dst, port, sport, n):
    ok = fail = 0
    for _ in range(n):
        if echo_once(dst, port, 2.0, sport=sport, linger_reset=True):
            ok += 1
        else:
            fail += 1
    print(json.dumps({"ok": ok, "fail": fail}))


def rst_idle(dst, port, rsts, idle_s):
    c = socket.create_connection((dst, port), timeout=3)
    c.settimeout(3)
    c.sendall(b"first\n")
    first = c.recv(256)
    src, sport = c.getsockname()
    s = raw_socket()
    rnd = random.Random()
    seqs = []
    for _ in range(rsts):
        seq = rnd.getrandbits(32)
        seqs.append(seq)
        seg = tcp_segment(src, dst, sport, port, seq, 0, 0x04)
        s.sendto(ip_header(src, dst, 6, len(seg)) + seg, (dst, 0))
    time.sleep(idle_s)
    ok = False
    try:
        c.sendall(b"after\n")
        ok = c.recv(256).endswith(b" after\n")
    except OSError:
        pass
    c.close()
    print(json.dumps({"first": first.decode(errors="replace").strip(), "ok": ok,
                      "sport": sport, "seqs": seqs}))


def malformed(iface, dstmac, src, dst, port):
    mac = bytes.fromhex(dstmac.replace(":", ""))
    with open("/sys/class/net/%s/address" % iface) as f:
        own = bytes.fromhex(f.read().strip().replace(":", ""))
    eth = mac + own + b"\x08\x00"
    sp = 41000

    def tcp_frame(flags, **ip):
        seg = tcp_segment(src, dst, sp, port, 1000, 0, flags, b"payload")
        return eth + ip_header(src, dst, 6, len(seg), **ip) + seg

    def udp_frame(ulen):
        data = b"query"
        u = struct.pack("!HHHH", 5353, port, ulen, 0) + data
        return eth + ip_header(src, dst, 17, len(u)) + u

    seg = tcp_segment(src, dst, sp, port, 1000, 0, 0x02, b"payload")
    cases = {
        "ip_header": eth + ip_header(src, dst, 6, len(seg), ihl=4) + seg,
        "ip_length": eth + ip_header(src, dst, 6, len(seg), tot_len=20 + len(seg) + 200) + seg,
        "ttl_zero": tcp_frame(0x02, ttl=0),
        "tcp_header": eth + ip_header(src, dst, 6, len(seg)) + seg[:12] + bytes([15 << 4]) + seg[13:],
        "tcp_flags": [tcp_frame(f) for f in (0x03, 0x06, 0x00, 0x3F, 0x01)],
        "udp_length": [udp_frame(0), udp_frame(200)],
        "vlan_tagged": mac + own + b"\x81\x00" + struct.pack("!H", 100) + b"\x08\x00"
        + tcp_frame(0x02)[14:],
    }
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent = {}
    for name, frames in cases.items():
        if isinstance(frames, bytes):
            frames = [frames]
        for fr in frames:
            # Pad to the Ethernet minimum: the frame, not the IP length, is what is short.
            s.send(fr + b"\0" * max(0, 60 - len(fr)))
        sent[name] = len(frames)
    print(json.dumps(sent))


def hold(dst, port, n, secs):
    conns = []
    refused = 0
    for _ in range(n):
        try:
            conns.append(socket.create_connection((dst, port), timeout=2))
        except OSError:
            refused += 1
    time.sleep(1.0)
    open_ = []
    closed = 0
    for c in conns:
        r, _, _ = select.select([c], [], [], 0)
        gone = False
        if r:
            try:
                gone = c.recv(64) == b""
            except OSError:
                gone = True
        if gone:
            closed += 1
            c.close()
        else:
            open_.append(c)
    time.sleep(max(0.0, secs - 1.0))
    for c in open_:
        c.close()
    print(json.dumps({"opened": len(conns), "connect_failed": refused, "closed": closed,
                      "held": len(open_)}))


def main():
    a = sys.argv[1:]
    mode = a[0] if a else ""
    if mode == "flood":
        flood(a[1], a[2], int(a[3]), int(a[4]), float(a[5]), float(a[6]))
    elif mode == "probe":
        probe(a[1], int(a[2]), float(a[3]), float(a[4]), float(a[5]))
    elif mode == "streams":
        streams(a[1], int(a[2]), int(a[3]), float(a[4]))
    elif mode == "reconnect":
        reconnect(a[1], int(a[2]), int(a[3]), int(a[4]))
    elif mode == "rst_idle":
        rst_idle(a[1], int(a[2]), int(a[3]), float(a[4]))
    elif mode == "hold":
        hold(a[1], int(a[2]), int(a[3]), float(a[4]))
    elif mode == "malformed":
        malformed(a[1], a[2], a[3], a[4], int(a[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
