#!/usr/bin/env python3
"""Opens N UDP flows to VIP:PORT from distinct source addresses and ports, at about RATE flows
per second, through a raw socket (the kernel fills the IP checksum and length). Each flow is
asked twice: the second datagram goes out ~50 ms after the first (a chunk later), once the
endpoint's answer has passed the load balancer, and confirms the flow there (a flow the client
never continues stays unconfirmed and is not synced). The answers themselves go to addresses
nobody holds.

  udp_flows.py SRC_NET VIP PORT N RATE [PORT_BASE]

SRC_NET is the client's /24 (e.g. 198.51.100): flows come from SRC_NET.10-209, 500 source
ports each from PORT_BASE (20000). Bounded by N flows (at most 100,000) and by 120 s.
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
CHUNK = 1000

s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
payload = b"flow"


def datagram(i):
    src = bytes(net + [10 + i // 500])
    sport = base + i % 500
    udp = struct.pack("!HHHH", sport, port, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, i & 0xFFFF, 0, 64, 17, 0, src, vip) + udp


start = time.time()
sent = 0
prev = None
for lo in range(0, n, CHUNK):
    chunk = range(lo, min(lo + CHUNK, n))
    for i in chunk:
        s.sendto(datagram(i), (sys.argv[2], 0))
    sent = chunk.stop
    # The previous chunk, asked again: its answers came back meanwhile.
    if prev is not None:
        for i in prev:
            s.sendto(datagram(i), (sys.argv[2], 0))
    prev = chunk
    ahead = sent / rate - (time.time() - start)
    time.sleep(max(ahead, 0.02))
    if time.time() - start > 120:
        break
if prev is not None:
    time.sleep(0.1)
    for i in prev:
        s.sendto(datagram(i), (sys.argv[2], 0))
print(sent)
