#!/usr/bin/env python3
"""BFD scale benchmark (not a test): how many sessions at 100 ms x 3 one ferrolb agent holds,
with its CPU use and false Down events, on the bfd-interop lab.

lb1 and lb2 each get N extra addresses (10.8.16.0/20 and 10.8.32.0/20 on lo, routed over the
shared LAN); session k runs
from lb1's k-th address to lb2's k-th address, configured on both agents through the REST API
(so each agent runs N sessions). After every session is Up, the agents' CPU time is sampled
over 30 s (/proc/<pid>/stat) and the state-change counters are compared.

Usage: sudo python3 scripts/bench_bfd.py [N ...]   (default: 200 500)
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/ferrolb-target")
FERROLAB = os.path.join(TARGET, "release", "ferrolab")
FERROLB = os.path.join(TARGET, "release", "ferrolb")
TOPO = os.path.join(ROOT, "containerlab", "bfd-interop", "bfd-interop.clab.yml")
NAME = "ferrolb-bfd-bench"
SAMPLE_S = 30
HZ = os.sysconf("SC_CLK_TCK")


def run(argv, check=True, timeout=300, stdin=None):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and p.returncode != 0:
        sys.exit("failed: %s\n%s%s" % (" ".join(argv), p.stdout, p.stderr))
    return p.stdout


def lab(node, *argv, **kw):
    return run([FERROLAB, "exec", "--name", NAME, TOPO, node, "--"] + list(argv), **kw)


def addr(side, k):
    return "10.8.%d.%d" % (side * 16 + k // 250, k % 250 + 1)


def agent_pid(node):
    ns = lab(node, "readlink", "/proc/self/ns/net").strip()
    for pid in run(["pgrep", "-x", "ferrolb"], check=False).split():
        try:
            if os.readlink("/proc/%s/ns/net" % pid) == ns:
                return int(pid)
        except OSError:
            pass
    sys.exit("no agent in " + node)


def cpu_s(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def sessions(node):
    return json.loads(lab(node, "curl", "-s", "http://127.0.0.1:11111/netlox/v1/config/bfd/all"))["Attr"]


def bench(n):
    # Addresses, then sessions over one keep-alive connection per agent (python in the node).
    # Each agent's addresses sit on its lo (one neighbour entry on the LAN, not N: the
    # kernel's neighbour table would start dropping entries past gc_thresh2 = 512), with a
    # route to the other's block via its LAN address. Nothing forwards: TTL stays 255.
    for side, node, via in ((1, "lb1", "10.0.0.4"), (2, "lb2", "10.0.0.1")):
        script = "".join("addr add %s/32 dev lo\n" % addr(side, k) for k in range(n))
        script += "route replace 10.8.%d.0/20 via %s\n" % ((3 - side) * 16, via)
        lab(node, "ip", "-batch", "-", stdin=script)
    loader = (
        "import http.client,json,sys\n"
        "c=http.client.HTTPConnection('127.0.0.1',11111,timeout=10)\n"
        "for line in sys.stdin:\n"
        "  r,s=line.split()\n"
        "  c.request('POST','/netlox/v1/config/bfd',json.dumps({'remoteIp':r,'sourceIp':s,'interval':100000,'retryCount':3}))\n"
        "  x=c.getresponse(); x.read()\n"
        "  assert x.status==200, x.status\n"
    )
    for side, node in ((1, "lb1"), (2, "lb2")):
        other = 3 - side
        pairs = "".join("%s %s\n" % (addr(other, k), addr(side, k)) for k in range(n))
        lab(node, "python3", "-c", loader, stdin=pairs)
    deadline = time.time() + 60
    while time.time() < deadline:
        s1 = sessions("lb1")
        up = sum(1 for s in s1 if s["state"] == "BFDUp")
        if up >= n + 1:
            break
        time.sleep(1)
    else:
        sys.exit("only %d of %d sessions came up" % (up, n + 1))
    time.sleep(2)
    before = {s["remoteIp"]: s["stateChanges"] for s in sessions("lb1")}
    pids = [agent_pid("lb1"), agent_pid("lb2")]
    c0 = [cpu_s(p) for p in pids]
    t0 = time.time()
    time.sleep(SAMPLE_S)
    c1 = [cpu_s(p) for p in pids]
    dt = time.time() - t0
    after = {s["remoteIp"]: s["stateChanges"] for s in sessions("lb1")}
    flaps = sum(1 for k, v in after.items() if before.get(k) != v)
    down = sum(1 for s in sessions("lb1") if s["state"] != "BFDUp")
    pct = [100.0 * (b - a) / dt for a, b in zip(c0, c1)]
    print("%4d sessions at 100 ms x 3: agent CPU lb1 %.1f %%, lb2 %.1f %% of one core over %d s; "
          "sessions that changed state: %d; not Up: %d" % (n, pct[0], pct[1], SAMPLE_S, flaps, down))
    # Remove the sessions and addresses for the next size.
    for side, node in ((1, "lb1"), (2, "lb2")):
        other = 3 - side
        rm = ("import http.client,sys\nc=http.client.HTTPConnection('127.0.0.1',11111,timeout=10)\n"
              "for line in sys.stdin:\n  c.request('DELETE','/netlox/v1/config/bfd/remoteIP/'+line.strip()); c.getresponse().read()\n")
        lab(node, "python3", "-c", rm, stdin="".join("%s\n" % addr(other, k) for k in range(n)))
        lab(node, "ip", "addr", "flush", "dev", "lo", "to", "10.8.0.0/16")
    return pct, flaps


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [200, 500]
    if os.geteuid() != 0:
        sys.exit("run as root")
    run(["bash", os.path.join(ROOT, "scripts", "deps.sh")])
    run(["cargo", "build", "--release", "-q", "-p", "ferrolb-agent", "-p", "ferrolb-lab", "--bins"], timeout=1800)
    run([FERROLAB, "up", "--name", NAME, "--lab-dir", "/tmp/ferrolb-bfd-bench", "--var", "FERROLB=" + FERROLB, "--strict", TOPO])
    try:
        for n in sizes:
            bench(n)
    finally:
        run([FERROLAB, "down", "--name", NAME, "--cleanup", TOPO], check=False)


if __name__ == "__main__":
    main()
