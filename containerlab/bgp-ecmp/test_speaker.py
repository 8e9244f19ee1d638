#!/usr/bin/env python3
"""A deliberately small BGP speaker for tests (stdlib only): listens on TCP 179, accepts one
session, exchanges OPEN/KEEPALIVE (4-octet AS capability), then sends one UPDATE whose ORIGIN
is invalid (5: RFC 7606 says treat-as-withdraw, not a reset) and one valid UPDATE, and keeps the
session alive with KEEPALIVEs for SECONDS. Prints what it received, one line per message.

  test_speaker.py ASN ROUTER_ID SECONDS
"""
import socket
import struct
import sys
import time

ASN, RID, SECONDS = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])


def msg(kind, body=b""):
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), kind) + body


def open_msg():
    cap = struct.pack("!BBI", 65, 4, ASN)  # 4-octet AS
    mp = struct.pack("!BBHBB", 1, 4, 1, 0, 1)  # multiprotocol IPv4 unicast
    params = struct.pack("!BB", 2, len(cap) + len(mp)) + cap + mp
    my_as = ASN if ASN < 65536 else 23456
    return msg(1, struct.pack("!BHH4sB", 4, my_as, 9, socket.inet_aton(RID), len(params)) + params)


def update(origin, prefix):
    net, plen = prefix.split("/")
    plen = int(plen)
    nlri = bytes([plen]) + socket.inet_aton(net)[: (plen + 7) // 8]
    aspath = struct.pack("!BB", 2, 1) + struct.pack("!I", ASN)
    attrs = (
        bytes([0x40, 1, 1, origin])
        + bytes([0x40, 2, len(aspath)]) + aspath
        + bytes([0x40, 3, 4]) + socket.inet_aton(RID)
    )
    return msg(2, struct.pack("!H", 0) + struct.pack("!H", len(attrs)) + attrs + nlri)


def main():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 179))
    srv.listen(1)
    srv.settimeout(SECONDS)
    conn, peer = srv.accept()
    print("accepted", peer, flush=True)
    conn.sendall(open_msg())
    conn.settimeout(0.2)
    buf = b""
    end = time.monotonic() + SECONDS
    sent_updates = False
    last_ka = 0.0
    while time.monotonic() < end:
        try:
            chunk = conn.recv(65535)
            if not chunk:
                print("closed by peer", flush=True)
                return
            buf += chunk
        except socket.timeout:
            pass
        while len(buf) >= 19:
            length, kind = struct.unpack("!HB", buf[16:19])
            if len(buf) < length:
                break
            print("received type", kind, "length", length, flush=True)
            buf = buf[length:]
            if kind == 1:
                conn.sendall(msg(4))
            if kind == 3:
                print("NOTIFICATION received", flush=True)
                return
        now = time.monotonic()
        if now - last_ka > 1:
            conn.sendall(msg(4))
            last_ka = now
            if not sent_updates:
                time.sleep(0.5)
                conn.sendall(update(5, "198.18.1.0/24"))  # invalid ORIGIN
                conn.sendall(update(0, "198.18.2.0/24"))  # valid
                print("sent malformed and valid UPDATEs", flush=True)
                sent_updates = True
    conn.close()


if __name__ == "__main__":
    main()
