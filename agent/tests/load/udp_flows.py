#!/usr/bin/env python3
"""Opens N UDP flows to VIP:PORT, one datagram each from distinct source addresses and ports,
at about RATE per second, through a raw socket (the kernel fills the IP checksum and length).

  udp_flows.py SRC_NET VIP PORT N RATE [PORT_BASE]

SRC_NET is the client's /24 (e.g. 198.51.100): flows come from SRC_NET.10-209, 500 source
ports each from PORT_BASE (20000). Bounded by N packets (at most 100,000) and by 120 s.
"""
import socket
import struct
import sys
import time

net = [int(x) for x in sys.argv[1].split(".")]
vip = socket.inet_aton(sys.argv[2])
port = int(sys.argv[3])
n = min(int(sys.argv[4]), 100_000)
rate = float(sys.argv[5])
base = int(sys.argv[6]) if len(sys.argv) > 6 else 20000

s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
payload = b"flow"
start = time.time()
for i in range(n):
    src = bytes(net + [10 + i // 500])
    sport = base + i % 500
    udp = struct.pack("!HHHH", sport, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, i & 0xFFFF, 0, 64, 17, 0, src, vip)
    s.sendto(ip + udp, (sys.argv[2], 0))
    if i % 1000 == 999:
        ahead = (i + 1) / rate - (time.time() - start)
        if ahead > 0:
            time.sleep(ahead)
    if time.time() - start > 120:
        break
print(i + 1)
