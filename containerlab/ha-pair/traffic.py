#!/usr/bin/env python3
"""HA traffic for the ha-pair lab (stdlib only): long-lived TCP streams and UDP flows through
the VIP while a fault is injected, then one JSON document on stdout.

  traffic.py VIP [--tcp N] [--late M] [--udp F] [--duration S] [--fault-at T]
             [--fault-cmd 'shell command'] [--tcp-port 9000] [--udp-port 9001]
             [--interval-ms 10] [--line-ms 20] [--drain S] [--t0-file PATH]

- TCP: N streams to VIP:tcp-port (the lab's line-echo servers answer "NAME <line>"). M of them
  are opened 200 ms before the fault, the others at the start. Each stream writes a numbered
  line every line-ms and waits for its echo. A stream survives when it saw no reset or EOF and
  every line came back exactly once, in order, from one backend.
- UDP: F flows (one socket each) to VIP:udp-port, one datagram every interval-ms per flow. The
  outage of a flow is the longest gap between two consecutive replies (it includes one
  interval).
- The fault command runs (through the shell) at fault-at seconds; its start time is reported.
  Without one, fault-at only times the late streams, and whoever injects the fault times it
  from the t0 file, written at the start.
Every loop is bounded by duration + drain.
"""
import json
import socket
import subprocess
import sys
import threading
import time


def opt(name, default, cast=str):
    if name in sys.argv:
        i = sys.argv.index(name)
        if i + 1 < len(sys.argv):
            return cast(sys.argv[i + 1])
    return default


VIP = sys.argv[1]
TCP_N = opt("--tcp", 50, int)
LATE = opt("--late", 10, int)
UDP_N = opt("--udp", 20, int)
DURATION = opt("--duration", 8.0, float)
FAULT_AT = opt("--fault-at", -1.0, float)
FAULT_CMD = opt("--fault-cmd", "")
TCP_PORT = opt("--tcp-port", 9000, int)
UDP_PORT = opt("--udp-port", 9001, int)
INTERVAL = opt("--interval-ms", 10, int) / 1000.0
LINE = opt("--line-ms", 20, int) / 1000.0
DRAIN = opt("--drain", 8.0, float)

T0_FILE = opt("--t0-file", "")

T0 = time.monotonic()
END = T0 + DURATION
if T0_FILE:
    # Whoever injects the fault from outside times it from this file's appearance.
    with open(T0_FILE, "w") as f:
        f.write("%f\n" % time.time())
HARD_END = END + DRAIN


def now():
    return time.monotonic() - T0


def stream(i, late, out):
    r = {"id": i, "late": late, "sent": 0, "echoed": 0, "in_order": True, "backend": None,
         "backend_changed": False, "errors": [], "max_gap_ms": 0, "opened_at": None, "sport": None}
    out[i] = r
    try:
        if late:
            start = T0 + FAULT_AT - 0.2 if FAULT_AT >= 0 else T0
            time.sleep(max(0.0, start - time.monotonic()))
        s = socket.create_connection((VIP, TCP_PORT), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r["opened_at"] = round(now(), 3)
        r["sport"] = s.getsockname()[1]
        f = s.makefile("rb")
        last = time.monotonic()
        while time.monotonic() < END:
            n = r["sent"]
            s.sendall(b"%d\n" % n)
            r["sent"] += 1
            s.settimeout(max(0.5, HARD_END - time.monotonic()))
            line = f.readline()
            if not line:
                r["errors"].append("connection closed at %.3f" % now())
                break
            name, _, body = line.strip().partition(b" ")
            name = name.decode(errors="replace")
            if body != b"%d" % n:
                r["in_order"] = False
            if r["backend"] is None:
                r["backend"] = name
            elif r["backend"] != name:
                r["backend_changed"] = True
            r["echoed"] += 1
            t = time.monotonic()
            r["max_gap_ms"] = max(r["max_gap_ms"], int((t - last) * 1000))
            last = t
            time.sleep(LINE)
        s.close()
    except Exception as e:  # noqa: BLE001
        r["errors"].append("%s at %.3f" % (e, now()))


def udp_flows(out):
    socks = []
    for _ in range(UDP_N):
        v6 = ":" in VIP
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("::" if v6 else "0.0.0.0", 0))
        s.setblocking(False)
        socks.append(s)
    res = [{"sport": s.getsockname()[1], "sent": 0, "answered": 0, "max_gap_ms": 0,
            "backends": {}, "gap_at": None, "last": None} for s in socks]
    seq = 0
    next_send = time.monotonic()
    while True:
        t = time.monotonic()
        if t >= END + 0.5:
            break
        if t >= next_send and t < END:
            for i, s in enumerate(socks):
                try:
                    s.sendto(b"%d" % seq, (VIP, UDP_PORT))
                    res[i]["sent"] += 1
                except OSError:
                    pass
            seq += 1
            next_send += INTERVAL
        for i, s in enumerate(socks):
            while True:
                try:
                    data = s.recv(65535)
                except (BlockingIOError, OSError):
                    break
                r = res[i]
                r["answered"] += 1
                try:
                    b = json.loads(data)["backend"]
                    r["backends"][b] = r["backends"].get(b, 0) + 1
                except Exception:  # noqa: BLE001
                    pass
                t2 = time.monotonic()
                if r["last"] is not None:
                    gap = int((t2 - r["last"]) * 1000)
                    if gap > r["max_gap_ms"]:
                        r["max_gap_ms"] = gap
                        r["gap_at"] = round(r["last"] - T0, 3)
                r["last"] = t2
        time.sleep(0.001)
    for r in res:
        del r["last"]
    out["udp"] = res


def main():
    streams = [None] * TCP_N
    threads = []
    for i in range(TCP_N):
        late = i >= TCP_N - LATE and FAULT_AT >= 0
        t = threading.Thread(target=stream, args=(i, late, streams), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.005)
    udp = {}
    ut = threading.Thread(target=udp_flows, args=(udp,), daemon=True)
    ut.start()
    fault = {}
    if FAULT_AT >= 0 and FAULT_CMD:
        time.sleep(max(0.0, T0 + FAULT_AT - time.monotonic()))
        fault["at"] = round(now(), 3)
        p = subprocess.run(FAULT_CMD, shell=True, capture_output=True, text=True, timeout=10)
        fault["rc"] = p.returncode
        fault["stderr"] = p.stderr[-500:]
        fault["took_ms"] = int((now() - fault["at"]) * 1000)
    for t in threads:
        t.join(max(0.1, HARD_END + 1 - time.monotonic()))
    ut.join(max(0.1, HARD_END + 1 - time.monotonic()))
    tcp = [s for s in streams if s is not None]
    survived = [s for s in tcp if not s["errors"] and s["sent"] == s["echoed"] and s["in_order"]
                and not s["backend_changed"] and s["sent"] > 0]
    udp_res = udp.get("udp", [])
    print(json.dumps({
        "fault": fault,
        "tcp": tcp,
        "udp": udp_res,
        "summary": {
            "tcp_streams": len(tcp),
            "tcp_survived": len(survived),
            "tcp_max_gap_ms": max([s["max_gap_ms"] for s in survived] or [0]),
            "udp_flows": len(udp_res),
            "udp_resumed": sum(1 for r in udp_res if r["answered"] > 0),
            "udp_outage_ms": max([r["max_gap_ms"] for r in udp_res] or [0]),
            "udp_lost": sum(r["sent"] - r["answered"] for r in udp_res),
            "udp_backend_changed": sum(1 for r in udp_res if len(r["backends"]) > 1),
        },
    }))


if __name__ == "__main__":
    main()
