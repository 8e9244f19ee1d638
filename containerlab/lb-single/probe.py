#!/usr/bin/env python3
"""Client probes for the lb-single lab (stdlib only). Every mode prints one JSON document.

  probe.py http  VIP PORT N [--src IP]        N HTTP GETs, each on a new connection
  probe.py udp   VIP PORT N [--sport P ...]   N datagrams, each from a new socket (or from the
                                              given source ports, one datagram each)
  probe.py udpflow VIP PORT SECONDS [--flows N] [--interval MS]
                                              N UDP flows, one datagram every MS per flow;
                                              per flow: sent, answered, longest gap, peers seen,
                                              unanswered sequence numbers (1 s to settle)
  probe.py stream VIP PORT SECONDS [--count K] K TCP echo streams, one line every 20 ms each;
                                              reports lines sent/echoed, errors and the longest
                                              gap without an echo, per stream
Timeouts are bounded (2 s per request); nothing loops without a limit.
"""
import json
import socket
import sys
import threading
import time


def family(vip):
    """The socket family and wildcard address for a VIP (IPv6 when it has a colon)."""
    return (socket.AF_INET6, "::") if ":" in vip else (socket.AF_INET, "0.0.0.0")


def opt(name, default=None, many=False):
    vals = [sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == name]
    if many:
        return vals
    return vals[-1] if vals else default


def http(vip, port, n, src):
    out = []
    for _ in range(n):
        try:
            s = socket.create_connection((vip, port), timeout=2, source_address=(src, 0) if src else None)
            s.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            body = data.split(b"\r\n\r\n", 1)[1]
            out.append(json.loads(body))
        except Exception as e:  # noqa: BLE001 - report, never crash
            out.append({"error": str(e)})
    return out


def udp(vip, port, n, sports):
    out = []
    targets = [int(p) for p in sports] if sports else [0] * n
    for sp in targets:
        fam, anyaddr = family(vip)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((anyaddr, sp))
        s.settimeout(2)
        try:
            s.sendto(b"hello", (vip, port))
            data, _ = s.recvfrom(65535)
            r = json.loads(data)
            r["sport"] = s.getsockname()[1]
            out.append(r)
        except Exception as e:  # noqa: BLE001
            out.append({"error": str(e), "sport": sp})
        finally:
            s.close()
    return out


def stream(vip, port, seconds, count):
    results = [None] * count

    def one(i):
        r = {"sent": 0, "echoed": 0, "errors": [], "max_gap_ms": 0, "backend": None, "sport": None}
        try:
            s = socket.create_connection((vip, port), timeout=2)
            r["sport"] = s.getsockname()[1]
            f = s.makefile("rb")
            last = time.monotonic()
            end = last + seconds
            while time.monotonic() < end:
                s.sendall(b"line %d\n" % r["sent"])
                r["sent"] += 1
                line = f.readline()
                if not line:
                    r["errors"].append("connection closed")
                    break
                r["echoed"] += 1
                r["backend"] = line.split(b" ", 1)[0].decode()
                now = time.monotonic()
                r["max_gap_ms"] = max(r["max_gap_ms"], int((now - last) * 1000))
                last = now
                time.sleep(0.02)
            s.close()
        except Exception as e:  # noqa: BLE001
            r["errors"].append(str(e))
        results[i] = r

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(seconds + 10)
    return results


def udpflow(vip, port, seconds, flows, interval_ms):
    """`flows` UDP flows (one socket each), one datagram every `interval_ms` per flow; per flow:
    sent, answered (distinct datagrams the backend echoed), the longest gap between answers,
    which address the backend saw, the sequence numbers never answered ("missing", the first
    20), and how many answers came only after sending stopped ("late"). Once sending stops,
    answers still in flight get up to 1 s: a datagram of the last round whose answer takes
    longer than one interval is late, not lost."""
    socks = []
    for _ in range(flows):
        fam, anyaddr = family(vip)
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((anyaddr, 0))
        s.setblocking(False)
        socks.append(s)
    res = [{"sent": 0, "answered": 0, "max_gap_ms": 0, "peers": {}, "last": None} for _ in socks]
    pending = [set() for _ in socks]

    def receive():
        for i, s in enumerate(socks):
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                r = res[i]
                try:
                    reply = json.loads(data)
                    seq = int(reply["data"])
                except Exception:  # noqa: BLE001 - not an answer to us: ignored
                    continue
                if seq not in pending[i]:
                    continue  # a duplicate, or not ours
                pending[i].discard(seq)
                r["answered"] += 1
                try:
                    peer = reply["peer"].rsplit(":", 1)[0].strip("[]")
                    r["peers"][peer] = r["peers"].get(peer, 0) + 1
                except Exception:  # noqa: BLE001
                    pass
                now = time.monotonic()
                if r["last"] is not None:
                    r["max_gap_ms"] = max(r["max_gap_ms"], int((now - r["last"]) * 1000))
                r["last"] = now

    start = time.monotonic()
    end = start + seconds
    seq = 0
    while time.monotonic() < end:
        t = time.monotonic()
        for i, s in enumerate(socks):
            try:
                s.sendto(b"%d" % seq, (vip, port))
                res[i]["sent"] += 1
                pending[i].add(seq)
            except OSError:
                pass
        seq += 1
        deadline = t + interval_ms / 1000.0
        while time.monotonic() < deadline:
            receive()
            time.sleep(0.001)
    before = [r["answered"] for r in res]
    settle = time.monotonic() + 1.0
    while any(pending) and time.monotonic() < settle:
        receive()
        time.sleep(0.001)
    for i, r in enumerate(res):
        del r["last"]
        r["missing"] = sorted(pending[i])[:20]
        r["last_seq"] = seq - 1
        r["late"] = r["answered"] - before[i]  # answered only after sending stopped
    return res


def main():
    mode, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "http":
        res = http(vip, port, int(sys.argv[4]), opt("--src"))
    elif mode == "udp":
        res = udp(vip, port, int(sys.argv[4]), opt("--sport", many=True))
    elif mode == "udpflow":
        res = udpflow(vip, port, float(sys.argv[4]), int(opt("--flows", "10")), float(opt("--interval", "10")))
    elif mode == "stream":
        res = stream(vip, port, float(sys.argv[4]), int(opt("--count", "1")))
    else:
        sys.exit("unknown mode " + mode)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
