#!/usr/bin/env python3
"""BGP scale benchmark (not a test): how long the FRR ToR of the bgp-ecmp lab takes to learn
N VIPs from one ferrolb node, and the agent's memory while it holds them.

lb1 gets N rules with `bgp: true` (one VIP each) through the REST API first; then the BGP
neighbour is configured and the clock runs from that request until the ToR reports N prefixes
received from lb1 (`show bgp summary json`, polled every 50 ms).

Usage: sudo python3 scripts/bench_bgp.py [N] [--v6]   (default 10000; --v6: /128 VIPs over the
IPv6 session, MP_REACH_NLRI)
"""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/ferrolb-target")
FERROLAB = os.path.join(TARGET, "release", "ferrolab")
FERROLB = os.path.join(TARGET, "release", "ferrolb")
TOPO = os.path.join(ROOT, "containerlab", "bgp-ecmp", "ferrolb.clab.yml")
NAME = "ferrolb-bgp-bench"


def run(argv, check=True, timeout=600, stdin=None):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and p.returncode != 0:
        sys.exit("failed: %s\n%s%s" % (" ".join(argv), p.stdout, p.stderr))
    return p.stdout


def lab(node, *argv, **kw):
    return run([FERROLAB, "exec", "--name", NAME, TOPO, node, "--"] + list(argv), **kw)


def api(node, method, path, body):
    return lab(node, "curl", "-sf", "-X", method, "http://127.0.0.1:11111/netlox/v1" + path,
               "-H", "Content-Type: application/json", "--data-binary", json.dumps(body))


def main():
    args = [a for a in sys.argv[1:] if a != "--v6"]
    v6 = "--v6" in sys.argv
    n = int(args[0]) if args else 10000
    if os.geteuid() != 0:
        sys.exit("run as root")
    run(["bash", os.path.join(ROOT, "scripts", "deps.sh")])
    run(["cargo", "build", "--release", "-q", "-p", "ferrolb-agent", "-p", "ferrolb-lab", "--bins"], timeout=1800)
    run([FERROLAB, "up", "--name", NAME, "--lab-dir", "/tmp/ferrolb-bgp-bench", "--var", "FERROLB=" + FERROLB, "--strict", TOPO])
    try:
        # Restart lb1's agent with room for N services.
        ns = lab("lb1", "readlink", "/proc/self/ns/net").strip()
        for p in run(["pgrep", "-x", "ferrolb"], check=False).split():
            try:
                if os.readlink("/proc/%s/ns/net" % p) == ns:
                    os.kill(int(p), 9)
            except OSError:
                pass
        time.sleep(0.3)
        lab("lb1", FERROLB, "--remove-datapath")
        lab("lb1", "sh", "-c", "%s -b --max-services %d --config-path /etc/ferrolb-bench --loglevel warning "
            "> /var/log/bench-agent.log 2>&1 &" % (FERROLB, max(4096, n + 16)))
        for _ in range(100):
            if lab("lb1", "curl", "-sf", "http://127.0.0.1:11111/netlox/v1", check=False):
                break
            time.sleep(0.1)
        api("lb1", "POST", "/config/bgp/global", {"localAs": 65100, "routerId": "192.0.2.2"})
        loader = (
            "import http.client,json,sys\n"
            "c=http.client.HTTPConnection('127.0.0.1',11111,timeout=30)\n"
            "n=int(sys.argv[1])\n"
            "v6=sys.argv[2]=='v6'\n"
            "for i in range(n):\n"
            "  vip=('2001:db8:ee:%x::%x' if v6 else '198.18.%d.%d')%(i//250,i%250+1)\n"
            "  b={'serviceArguments':{'externalIP':vip,'port':80,'protocol':'tcp','BGP':True,'name':'bench_%d:llb-inst0'%i},"
            "'endpoints':[{'endpointIP':'fd00:10::11' if v6 else '10.10.10.11','targetPort':8080,'weight':1}]}\n"
            "  c.request('POST','/netlox/v1/config/loadbalancer',json.dumps(b)); r=c.getresponse(); r.read()\n"
            "  assert r.status==200, r.status\n"
        )
        t0 = time.monotonic()
        lab("lb1", "python3", "-c", loader, str(n), "v6" if v6 else "v4", timeout=1200)
        print("%d rules with bgp: true installed in %.1f s" % (n, time.monotonic() - t0))
        t0 = time.monotonic()
        tor_ip, lb_ip, afi = ("2001:db8:2:1::1", "2001:db8:2:1::2", "ipv6Unicast") if v6 else ("192.0.2.1", "192.0.2.2", "ipv4Unicast")
        api("lb1", "POST", "/config/bgp/neigh", {"ipAddress": tor_ip, "remoteAs": 65000})
        learned = 0
        while time.monotonic() - t0 < 120:
            s = json.loads(lab("tor", "vtysh", "-c", "show bgp summary json"))
            peers = s.get(afi, {}).get("peers", {})
            learned = peers.get(lb_ip, {}).get("pfxRcd", 0)
            if learned >= n:
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
        routes = 0
        while time.monotonic() - t0 < 120:
            routes = int(lab("tor", "sh", "-c", "ip %s route show proto bgp | wc -l" % ("-6" if v6 else "-4")).strip())
            if routes >= n:
                break
            time.sleep(0.05)
        took_fib = time.monotonic() - t0
        pid = None
        ns = lab("lb1", "readlink", "/proc/self/ns/net").strip()
        for p in run(["pgrep", "-x", "ferrolb"], check=False).split():
            try:
                if os.readlink("/proc/%s/ns/net" % p) == ns:
                    pid = int(p)
            except OSError:
                pass
        status = open("/proc/%d/status" % pid).read() if pid else ""
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        print("ToR learned %d of %d VIPs in %.2f s after the neighbour was configured, %d in its kernel "
              "after %.2f s; agent RSS %.1f MB (peak %.1f MB)" % (learned, n, took, routes, took_fib,
                                                    int(rss.group(1)) / 1024 if rss else -1,
                                                    int(hwm.group(1)) / 1024 if hwm else -1))
    finally:
        run([FERROLAB, "down", "--name", NAME, "--cleanup", TOPO], check=False)


if __name__ == "__main__":
    main()
