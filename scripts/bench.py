#!/usr/bin/env python3
"""ferrolb benchmark (not a test): one run, three paths, ratios against baselines measured in
the same run on the same lab (containerlab/lb-single):

  plain           client -> lb1 (routing only, no load balancer) -> be1
  nft             client -> lb1 nftables DNAT (the kernel's conntrack NAT, what kube-proxy uses) -> be1
  ferrolb         client -> lb1 ferrolb (eBPF, DNAT mode) -> be1
  ferrolb-onearm  the same rule in one-arm mode (source: lb1's address toward be1)
  ferrolb-fullnat the same rule in full-NAT mode (source: the VIP)

Each path is measured for TCP throughput (iperf3, one stream, 5 s), requests/s (wrk, keep-alive,
32 connections, 5 s, against nginx) and new connections/s (wrk with "Connection: close").
Every path goes to the one backend be1, so only the LB path differs. Then: 10,000 rules x 8
endpoints installed through the REST API (time, agent memory), and a TCP echo stream measured
while rules change (longest gap).

Each path connects from a client address of its own (see SOURCES); --shared-source uses one for
all, as this script did before (and shows what that costs the paths that keep the client's address).

New connections/s against plain routing are measured once more in pairs of short trials (plain,
then ferrolb's modes, in the opposite order every other pair; --pairs N, default 8): the ratio's
median over the pairs is what the ratios report, since one trial varies by +-5 % from the next.

Each paired trial follows --warmup S (default 1) seconds of the same load, not counted.
The machine's speed drifts by more than a few percent between such trials; scripts/bench_cps_ab.py
measures new connections/s through ferrolb and plain routing at the same moment instead.

Usage: sudo python3 scripts/bench.py [--rounds N] [--pairs N] [--warmup S] [--json FILE]
       [--shared-source]
Needs root and `scripts/deps.sh --bench` (wrk, nginx). Prints a table and the ratios.
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
TOPO = os.path.join(ROOT, "containerlab", "lb-single", "lb-single.clab.yml")
NAME = "ferrolb-bench"
VIP = "203.0.113.10"
NFT_VIP = "203.0.113.20"
BE1 = "10.10.10.11"
SECONDS = 5


def run(argv, check=True, timeout=120):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        sys.exit("failed: %s\n%s%s" % (" ".join(argv), p.stdout, p.stderr))
    return p.stdout


def lab(node, *argv, check=True, timeout=120):
    return run([FERROLAB, "exec", "--name", NAME, TOPO, node, "--"] + list(argv), check, timeout)


def api(method, path, body=None):
    argv = ["curl", "-sf", "-X", method, "http://127.0.0.1:11111/netlox/v1" + path]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    return lab("lb1", *argv)


def iperf(target, port=5201):
    out = lab("client", "iperf3", "-c", target, "-p", str(port), "-t", str(SECONDS), "-J", timeout=60)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(target, close, port=80, seconds=None):
    argv = ["wrk", "-t2", "-c32", "-d%ds" % (seconds or SECONDS), "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = lab("client", *(argv + ["http://%s:%d/" % (target, port)]), timeout=60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errs or non2xx:
        print("   wrk %s%s: %s %s" % (target, " (close)" if close else "",
                                      errs.group(0) if errs else "", non2xx.group(0) if non2xx else ""))
    return float(m.group(1)) if m else 0.0


def netstat(node):
    """The node's TcpExt counters (/proc/net/netstat in its namespace)."""
    lines = lab(node, "cat", "/proc/net/netstat").splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:])))
    return {}


# Each path's client source address. With one shared address, a path's new connections reuse
# the 4-tuples the previous path left in TIME_WAIT at be1, with TCP timestamps from another
# offset (Linux derives it from the source and destination addresses, and the client's
# destination differs per path: be1, the nft VIP, ferrolb's VIP): about half of those SYNs fail
# be1's PAWS check (TcpExtPAWSTimewait), be1 answers with an ACK and the client retries the SYN
# a second later. Only the paths that keep the client's address at be1 (plain and both DNATs)
# meet them, which made DNAT look slower than routing. --shared-source measures it that way.
SOURCES = {"plain": "198.51.100.20", "nft": "198.51.100.21", "ferrolb": "198.51.100.22",
           "ferrolb-onearm": "198.51.100.23", "ferrolb-fullnat": "198.51.100.24"}
SHARED_SOURCE = "198.51.100.2"


def measure(path, target, offset=0):
    src = SHARED_SOURCE if SHARED else SOURCES[path]
    lab("client", "ip", "route", "replace", "default", "via", "198.51.100.1", "src", src)
    before_be, before_cl = netstat("be1"), netstat("client")
    r = {"gbps": iperf(target, 5201 + offset), "rps": wrk(target, False, 80 + offset)}
    cpu0 = agent_cpu_s()
    r["cps"] = wrk(target, True, 80 + offset)
    cpu1 = agent_cpu_s()
    after_be, after_cl = netstat("be1"), netstat("client")
    if cpu0 is not None and cpu1 is not None:
        # The agent's own share of the 2 cores while new connections ran (ring events,
        # collector): what the datapath's cost per connection does not show.
        r["agent_cpu_s"] = cpu1 - cpu0
        print("   agent CPU during the %d s of new connections: %.2f s" % (SECONDS, cpu1 - cpu0),
              flush=True)
    r["paws_timewait"] = after_be.get("PAWSTimewait", 0) - before_be.get("PAWSTimewait", 0)
    r["syn_retrans"] = after_cl.get("TCPSynRetrans", 0) - before_cl.get("TCPSynRetrans", 0)
    print("   source %s: be1 PAWSTimewait +%d, client TCPSynRetrans +%d"
          % (src, r["paws_timewait"], r["syn_retrans"]), flush=True)
    return r


# ferrolb's NAT modes (loxilb numbering) and the port offset of their rules.
MODES = (("ferrolb", 0, 0), ("ferrolb-onearm", 1, 1), ("ferrolb-fullnat", 2, 2))


AGENT_PID = None


def agent_cpu_s():
    """CPU seconds (user + system) the running agent has used, or None without one."""
    if AGENT_PID is None:
        return None
    try:
        fields = open("/proc/%d/stat" % AGENT_PID).read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pid(tag):
    out = run(["pgrep", "-f", tag], check=False).split()
    return int(out[0]) if out else None


def stop_agent():
    global AGENT_PID
    AGENT_PID = None
    for pid in run(["pgrep", "-x", "ferrolb"], check=False).split():
        # only ours: the process must be in the lab's lb1 network namespace
        try:
            if os.readlink("/proc/%s/ns/net" % pid) == LB1_NETNS:
                os.kill(int(pid), 15)
        except OSError:
            pass
    time.sleep(0.5)
    lab("lb1", FERROLB, "--remove-datapath")


def start_agent(*extra):
    tag = "ferrolb-bench-%d" % time.monotonic_ns()
    cfg = "/etc/ferrolb-%s" % tag
    lab("lb1", "sh", "-c", "%s --config-path %s --loglevel warning %s > /var/log/%s.log 2>&1 &"
        % (FERROLB, cfg, " ".join(extra), tag))
    for _ in range(100):
        if lab("lb1", "curl", "-sf", "http://127.0.0.1:11111/netlox/v1", check=False):
            return tag
        time.sleep(0.1)
    sys.exit("agent did not come up")


def cps_trial(path, target, port, seconds):
    """New connections/s of one short trial (wrk with "Connection: close"), after WARMUP
    seconds of the same load that are not counted (plain and ferrolb alike): the trial
    measures the steady state, not the first second, in which a freshly started agent's
    tables hold none of the client's 4-tuples yet (wrk cycles through its ~28,000 ports in
    about a second; after that most new connections reuse a 4-tuple) and caches are cold."""
    src = SHARED_SOURCE if SHARED else SOURCES[path]
    lab("client", "ip", "route", "replace", "default", "via", "198.51.100.1", "src", src)
    if WARMUP > 0:
        wrk(target, True, port, WARMUP)
    return wrk(target, True, port, seconds)


def paired_cps(pairs, seconds):
    """New connections/s against plain routing, in pairs of short trials taken one right after
    the other: plain (no ferrolb datapath on lb1), then each ferrolb mode (the agent started
    for them), in the opposite order on every other pair so that a drift in the machine's
    speed does not favour either side. One trial varies by +-5 % from the next on these shared
    cores, more than the difference measured; the ratio of each pair, and the median over the
    pairs, is what this measures. Returns {path: [cps per pair]}."""
    global AGENT_PID
    out = {"plain": [], "ferrolb": [], "ferrolb-onearm": [], "ferrolb-fullnat": []}

    def plain():
        out["plain"].append(cps_trial("plain", BE1, 80, seconds))

    def ferrolb():
        global AGENT_PID
        tag = start_agent()
        AGENT_PID = agent_pid(tag)
        for name, mode, off in MODES:
            api("POST", "/config/loadbalancer", {
                "serviceArguments": {"externalIP": VIP, "port": 80 + off, "protocol": "tcp",
                                     "sel": 0, "mode": mode},
                "endpoints": [{"endpointIP": BE1, "targetPort": 80, "weight": 1}]})
        for name, mode, off in MODES:
            out[name].append(cps_trial(name, VIP, 80 + off, seconds))
        stop_agent()

    stop_agent()
    for i in range(pairs):
        if i % 2 == 0:
            plain()
            ferrolb()
        else:
            ferrolb()
            plain()
        print("  pair %d/%d: plain %.0f, DNAT %.0f (%.3f), one-arm %.0f (%.3f), full NAT %.0f (%.3f)"
              % (i + 1, pairs, out["plain"][-1],
                 out["ferrolb"][-1], out["ferrolb"][-1] / out["plain"][-1],
                 out["ferrolb-onearm"][-1], out["ferrolb-onearm"][-1] / out["plain"][-1],
                 out["ferrolb-fullnat"][-1], out["ferrolb-fullnat"][-1] / out["plain"][-1]),
              flush=True)
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main():
    rounds = 1
    out_json = None
    args = sys.argv[1:]
    if "--rounds" in args:
        rounds = int(args[args.index("--rounds") + 1])
    if "--json" in args:
        out_json = args[args.index("--json") + 1]
    global PAIRS, WARMUP
    if "--pairs" in args:
        PAIRS = int(args[args.index("--pairs") + 1])
    if "--warmup" in args:
        WARMUP = int(args[args.index("--warmup") + 1])
    global SHARED
    SHARED = "--shared-source" in args
    if os.geteuid() != 0:
        sys.exit("run as root")
    run(["bash", os.path.join(ROOT, "scripts", "deps.sh"), "--bench"])
    print("building (release)...", flush=True)
    run(["cargo", "build", "--release", "-q", "-p", "ferrolb-agent", "-p", "ferrolb-lab", "--bins"],
        timeout=1800)
    run([FERROLAB, "up", "--name", NAME, "--lab-dir", "/tmp/ferrolb-bench-lab", "--var", "FERROLB=" + FERROLB, "--strict", TOPO])
    try:
        bench(rounds, out_json)
    finally:
        run([FERROLAB, "down", "--name", NAME, "--cleanup", TOPO], check=False)


def bench(rounds, out_json):
    global LB1_NETNS, AGENT_PID
    # The lab's lb1 network namespace, to tell its agent from any other ferrolb on the host.
    LB1_NETNS = lab("lb1", "readlink", "/proc/self/ns/net").strip()
    # lb1 comes up as a host does (forwarding off: the agent turns it on where it attaches);
    # the plain-routing and nftables baselines run without the agent, so they turn it on.
    lab("lb1", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for be in ("be1", "be2", "be3"):
        lab(be, "nginx", "-c", os.path.join(ROOT, "scripts", "bench", "nginx.conf"))
    lab("be1", "iperf3", "-s", "-D")
    for src in SOURCES.values():
        lab("client", "ip", "addr", "add", src + "/24", "dev", "eth1")
    time.sleep(0.5)

    results = {"plain": [], "nft": [], "ferrolb": [], "ferrolb-onearm": [], "ferrolb-fullnat": []}
    for r in range(rounds):
        print("round %d/%d" % (r + 1, rounds), flush=True)
        # Baselines with no ferrolb datapath at all on lb1.
        stop_agent()
        print(" plain routing", flush=True)
        results["plain"].append(measure("plain", BE1))
        lab("lb1", "nft", "add table ip flbbench")
        lab("lb1", "nft", "add chain ip flbbench pre { type nat hook prerouting priority -100; }")
        lab("lb1", "nft", "add rule ip flbbench pre ip daddr %s dnat to %s" % (NFT_VIP, BE1))
        print(" nftables DNAT", flush=True)
        results["nft"].append(measure("nft", NFT_VIP))
        lab("lb1", "nft", "delete table ip flbbench")
        tag = start_agent()
        AGENT_PID = agent_pid(tag)
        for name, mode, off in MODES:
            for port, tport in ((80 + off, 80), (5201 + off, 5201)):
                api("POST", "/config/loadbalancer", {
                    "serviceArguments": {"externalIP": VIP, "port": port, "protocol": "tcp", "sel": 0,
                                         "mode": mode},
                    "endpoints": [{"endpointIP": BE1, "targetPort": tport, "weight": 1}]})
        for name, mode, off in MODES:
            print(" " + name, flush=True)
            results[name].append(measure(name, VIP, off))
        m = lab("lb1", "curl", "-sf", "http://127.0.0.1:11111/metrics")
        exhausted = re.search(r'reason="nat_ports_exhausted"\} (\d+)', m)
        print("  nat_ports_exhausted drops: %s" % (exhausted.group(1) if exhausted else "?"), flush=True)

    paired = {}
    if PAIRS > 0:
        print("new connections/s in %d pairs of %d s trials, each after %d s of uncounted load "
              "(plain, then ferrolb's modes; reversed every other pair)"
              % (PAIRS, PAIR_SECONDS, WARMUP), flush=True)
        paired = paired_cps(PAIRS, PAIR_SECONDS)
        AGENT_PID = agent_pid(start_agent())  # for the rule churn below

    best = {k: {m: max(x[m] for x in v) for m in ("gbps", "rps", "cps")} for k, v in results.items()}
    print()
    print("%-28s %12s %12s %12s" % ("path (best of %d)" % rounds, "TCP Gbit/s", "requests/s", "new conn/s"))
    for k in ("plain", "nft", "ferrolb", "ferrolb-onearm", "ferrolb-fullnat"):
        b = best[k]
        print("%-28s %12.2f %12.0f %12.0f" % (k, b["gbps"], b["rps"], b["cps"]))
    ratios = {
        "throughput_vs_plain": best["ferrolb"]["gbps"] / best["plain"]["gbps"],
        "throughput_vs_nft": best["ferrolb"]["gbps"] / best["nft"]["gbps"],
        "rps_vs_nft": best["ferrolb"]["rps"] / best["nft"]["rps"],
        "cps_vs_nft": best["ferrolb"]["cps"] / best["nft"]["cps"],
        "rps_vs_plain": best["ferrolb"]["rps"] / best["plain"]["rps"],
        "cps_vs_plain": best["ferrolb"]["cps"] / best["plain"]["cps"],
        "onearm_cps_vs_plain": best["ferrolb-onearm"]["cps"] / best["plain"]["cps"],
        "fullnat_cps_vs_plain": best["ferrolb-fullnat"]["cps"] / best["plain"]["cps"],
        "nft_cps_vs_plain": best["nft"]["cps"] / best["plain"]["cps"],
        # Source NAT against DNAT, same run (target: full NAT new connections >= 0.9x DNAT).
        "fullnat_cps_vs_dnat": best["ferrolb-fullnat"]["cps"] / best["ferrolb"]["cps"],
        "onearm_cps_vs_dnat": best["ferrolb-onearm"]["cps"] / best["ferrolb"]["cps"],
        "fullnat_rps_vs_dnat": best["ferrolb-fullnat"]["rps"] / best["ferrolb"]["rps"],
        "fullnat_throughput_vs_dnat": best["ferrolb-fullnat"]["gbps"] / best["ferrolb"]["gbps"],
    }
    # New connections/s against plain routing from the paired trials: the median of the
    # pairs' ratios (these replace the best-of-rounds ratios, which one round's noise moves).
    for k, name in (("cps_vs_plain", "ferrolb"), ("onearm_cps_vs_plain", "ferrolb-onearm"),
                    ("fullnat_cps_vs_plain", "ferrolb-fullnat")):
        if paired:
            r = [f / p for f, p in zip(paired[name], paired["plain"])]
            ratios[k] = median(r)
            ratios[k + "_pairs_min"] = min(r)
            ratios[k + "_pairs_max"] = max(r)
            ratios[k + "_pairs_above_1"] = sum(1 for x in r if x >= 1.0) / len(r)
    print()
    for k, v in ratios.items():
        print("ratio %-30s %.3f" % (k, v))
    if paired:
        print("(cps_vs_plain and the modes' ratios: median of %d paired trials; plain's median "
              "%.0f/s)" % (PAIRS, median(paired["plain"])))

    # Rule churn while a stream runs: the longest gap between echoes.
    api("POST", "/config/loadbalancer", {
        "serviceArguments": {"externalIP": VIP, "port": 7000, "protocol": "tcp", "sel": 0, "mode": 2},
        "endpoints": [{"endpointIP": "10.10.10.1%d" % i, "targetPort": 9000, "weight": 1} for i in (1, 2, 3)]})
    stream = subprocess.Popen([FERROLAB, "exec", "--name", NAME, TOPO, "client", "--", "python3",
                               "/etc/ferrolb-lab/probe.py", "stream", VIP, "7000", "6", "--count", "3"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    churn = 0
    t_end = time.monotonic() + 4
    w = 1
    while time.monotonic() < t_end:
        w = 3 - w
        api("POST", "/config/loadbalancer", {
            "serviceArguments": {"externalIP": VIP, "port": 80, "protocol": "tcp", "sel": 0, "mode": 0},
            "endpoints": [{"endpointIP": BE1, "targetPort": 80, "weight": w}]})
        churn += 1
    streams = json.loads(stream.communicate(timeout=30)[0])
    gap = max(s["max_gap_ms"] for s in streams)
    errors = sum(len(s["errors"]) for s in streams)
    print("\nrule churn: %d modifications in 4 s while 3 TCP streams ran: longest gap %d ms, %d errors"
          % (churn, gap, errors))

    # Scale: 10,000 rules x 8 endpoints through the REST API.
    stop_agent()
    tag = start_agent("--max-services", "16384")
    pid = agent_pid(tag)
    load = json.loads(lab("lb1", "python3", os.path.join(ROOT, "scripts", "bench", "load_rules.py"),
                          "127.0.0.1", "11111", "10000", "8", timeout=600))
    status = open("/proc/%d/status" % pid).read() if pid else ""
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    rss_mb = int(rss.group(1)) / 1024 if rss else -1
    hwm_mb = int(hwm.group(1)) / 1024 if hwm else -1
    t0 = time.monotonic()
    listed = json.loads(api("GET", "/config/loadbalancer/all"))
    list_s = time.monotonic() - t0
    print("scale: %d rules x 8 endpoints in %.2f s (%.0f rules/s), agent RSS %.1f MB (peak %.1f MB), "
          "GET all %d rules in %.2f s, errors %s"
          % (load["rules"], load["seconds"], load["rules"] / load["seconds"], rss_mb, hwm_mb,
             len(listed["lbAttr"]), list_s, load["errors"]))
    stop_agent()
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"results": results, "best": best, "ratios": ratios, "paired_cps": paired,
                       "paired_trial_s": PAIR_SECONDS, "paired_warmup_s": WARMUP,
                       "churn": {"changes": churn, "max_gap_ms": gap, "errors": errors},
                       "scale": {"rules": load["rules"], "seconds": load["seconds"],
                                 "rss_mb": rss_mb, "peak_rss_mb": hwm_mb, "list_seconds": list_s}}, f, indent=1)


LB1_NETNS = None
# Paired new-connection trials (--pairs N, 0 skips them) and each trial's length.
PAIRS = 8
PAIR_SECONDS = 3
# Uncounted seconds of load before each paired trial (--warmup S; 0: none).
WARMUP = 1

if __name__ == "__main__":
    main()
