#!/usr/bin/env python3
"""New connections/s through ferrolb against plain routing, measured at the same time (a
benchmark, not a test).

scripts/bench.py measures plain routing and ferrolb one after the other on one router; the
machine's speed drifts by more than the difference between consecutive short trials (+-13 %
per pair on these 2 shared cores), so its paired ratio cannot resolve a few percent. Here two
identical routers stand side by side (scripts/bench/cps-ab.clab.yml): one runs ferrolb (a DNAT,
one-arm or full-NAT rule to the backend), the other routes plainly, and one wrk per path opens
connections ("Connection: close") through both AT ONCE, each to an nginx of its own on the same
backend. Whatever slows the machine slows both paths in the same seconds; the path that costs
less per connection completes more of them with the same share of the cores. The routers swap
roles every pair (ferrolb on lba, then on lbb), so that neither router, subnet nor nginx favours
a side.

Per trial: WARMUP seconds of the same load (not counted), then SECONDS counted; the ratio is
ferrolb's connections over plain routing's in the same seconds. Printed: every trial, and per
mode the median ratio, its range, and a 95 % interval of the median (bootstrap over trials).

--aa is the control: no ferrolb at all, both routers route (to two addresses of the backend);
it should read 1.0. --agent-args "..." passes more flags to the agent (e.g. --max-conntrack N).
--fresh-tuples sends every connection from a 4-tuple the VIP has not seen lately (the client
source-NATs them over 112 addresses per path; see fresh_setup), as clients of a real VIP
mostly do; without it wrk's ports come back every second or so.

--aa --baseline-program floor|nop attaches, on the router playing ferrolb's part, the
benchmark's floor program (FIB lookup, MAC rewrite, redirect: forwarding with no state) or its
zero (returns at once: the kernel routes behind a TC hook) instead of nothing: with
--router-cpu, a decomposition of ferrolb's cost per connection at the router (the TC hook, a
stateless redirect, the flows' state).

--pin-napi CPU (with --router-cpu) pins both routers' NAPI threads to that CPU, so that every
packet of a flow, both directions, meets its state on one CPU (as symmetric RSS would give a
real NIC's queues); without it the scheduler moves them between the CPUs.

--sync-peer makes each router's agent a node of an HA cluster (lba node 0, lbb node 1) with a
second agent on be1 (node 2; the backend, with no rules, so its datapath passes everything, on
both paths alike): every connection's changes are published, sent, and installed on be1.
Printed per trial: be1's agent's CPU per connection and the flows it installed.

--l4-hash sets both routers' net.ipv4.fib_multipath_hash_policy to 1 (layer 4), under which
ferrolb's FIB cache keys its questions with their ports again (decision 0010): the A/B of keying
by addresses, which the default policy (0) allows.

--router-cpu also measures what each router itself spends per connection, in the same
seconds: every veth of the lab receives in a NAPI thread of its own (GRO on, threaded NAPI),
so a router's whole forwarding work (ferrolb's program, or the kernel's routing, and the
transmit to the next hop's queue) runs in its two interfaces' threads, whose CPU time is read
from /proc/<pid>/schedstat. ferrolb forwards with a plain redirect here (--no-peer-redirect:
a redirect to the peer would run the next hop's receive in the router's thread too). The ratio
of the two costs is what each router could forward at saturation: new connections/s of the LB
node itself, which the end-to-end ratio dilutes with the client's and the server's cost (all
but a few percent of a connection here).

Usage: sudo python3 scripts/bench_cps_ab.py [--pairs N] [--seconds S] [--warmup S]
       [--modes dnat,onearm,fullnat] [--aa] [--fresh-tuples] [--router-cpu] [--l4-hash]
       [--agent-args "..."] [--baseline-program floor|nop] [--pin-napi CPU] [--sync-peer]
       [--json FILE]
Needs root and `scripts/deps.sh --bench` (wrk, nginx), and a release build (cargo build --release).
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/ferrolb-target")
FERROLAB = os.path.join(TARGET, "release", "ferrolab")
FERROLB = os.path.join(TARGET, "release", "ferrolb")
# --baseline-program: cargo build --release -p ferrolb-bpf --example bench_attach
BENCH_ATTACH = os.path.join(TARGET, "release", "examples", "bench_attach")
BASELINE = None
PIN_NAPI = None
TOPO = os.path.join(ROOT, "scripts", "bench", "cps-ab.clab.yml")
NAME = "ferrolb-cps-ab"
BE1 = "10.10.10.11"
# --aa: no ferrolb at all; the "ferrolb" side routes plainly too, to this second address of
# be1 (the method's own asymmetry, which should read 1.0).
BE1_AA = "10.10.10.21"
AA = False
# --agent-args "...": more flags for the agent (e.g. "--max-conntrack 65536").
AGENT_ARGS = ""
# --fresh-tuples: every connection from another 4-tuple (see fresh_setup()).
FRESH = False
# Per router, the last octets of the client addresses each role's connections are sent from
# with --fresh-tuples (inside the router's client subnet, so be1 answers through it).
FRESH_HOSTS = {"ferrolb": range(16, 128), "plain": range(128, 240)}
# Per router: its client-side gateway, its VIP, the nginx port behind it, and the client's
# source address for each role (distinct per role: a 4-tuple left in TIME_WAIT at be1 by one
# role is never reused by the other with another timestamp offset; see bench.py's SOURCES).
ROUTERS = {
    "lba": {"gw": "198.51.100.1", "vip": "203.0.113.10", "port": 80,
            "src": {"ferrolb": "198.51.100.2", "plain": "198.51.100.3"}, "gw_be": "10.10.10.2",
            "node": 0},
    "lbb": {"gw": "198.51.101.1", "vip": "203.0.113.11", "port": 81,
            "src": {"ferrolb": "198.51.101.2", "plain": "198.51.101.3"}, "gw_be": "10.10.10.3",
            "node": 1},
}
MODES = {"dnat": 0, "onearm": 1, "fullnat": 2}
# --l4-hash: the routers hash multipath by layer 4 (the FIB cache keys ports again).
L4_HASH = False
# --router-cpu: every node's veths (each receives in a NAPI thread of its own).
NODE_IFS = {"client": ("eth1", "eth2"), "lba": ("eth1", "eth2"), "lbb": ("eth1", "eth2"),
            "sw": ("eth1", "eth2", "eth3"), "be1": ("eth1",)}
ROUTER_CPU = False
# --sync-peer: a node of ferrolb's cluster on be1 (node id 2; the routers' agents are nodes 0
# and 1 and list it as their peer).
SYNC_PEER = False


def run(argv, check=True, timeout=120):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        sys.exit("failed: %s\n%s%s" % (" ".join(argv), p.stdout, p.stderr))
    return p.stdout


def lab_argv(node, *argv):
    return [FERROLAB, "exec", "--name", NAME, TOPO, node, "--"] + list(argv)


def lab(node, *argv, check=True, timeout=120):
    return run(lab_argv(node, *argv), check, timeout)


def api(node, method, path, body):
    return lab(node, "curl", "-sf", "-X", method, "http://127.0.0.1:11111/netlox/v1" + path,
               "-H", "Content-Type: application/json", "--data-binary", json.dumps(body))


def netns(node):
    return lab(node, "readlink", "/proc/self/ns/net").strip()


def start_agent(node, args=None):
    tag = "ferrolb-cps-ab-%d" % time.monotonic_ns()
    lab(node, "sh", "-c", "%s --config-path /etc/%s --loglevel warning %s > /var/log/%s.log 2>&1 &"
        % (FERROLB, tag, AGENT_ARGS if args is None else args, tag))
    for _ in range(100):
        if lab(node, "curl", "-sf", "http://127.0.0.1:11111/netlox/v1", check=False):
            return
        time.sleep(0.1)
    sys.exit("agent did not come up on %s" % node)


def agent_pid(ns):
    """The agent running in network namespace `ns`, or None."""
    for pid in run(["pgrep", "-x", "ferrolb"], check=False).split():
        try:
            if os.readlink("/proc/%s/ns/net" % pid) == ns:
                return int(pid)
        except OSError:
            pass
    return None


def cpu_s(pid):
    """CPU seconds (user + system) process `pid` has used."""
    try:
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


COUNTERS = ("ferrolb_fib_cache_invalidations_total", "ferrolb_conntrack_created_total",
            "ferrolb_conntrack_handshakes_completed_total")  # + SYNs dropped: NAT ports exhausted


def counters(node):
    """The agent's counters of FIB cache invalidations, flows created, handshakes completed in
    the half-open table (a flow whose 4-tuple was not a closed flow's), and new flows dropped
    because their source-NAT pool had no free port."""
    m = lab(node, "curl", "-sf", "http://127.0.0.1:11111/metrics", check=False)
    out = []
    for name in COUNTERS:
        v = re.search(r"^%s (\d+)" % name, m, re.M)
        out.append(int(v.group(1)) if v else 0)
    v = re.search(r'^ferrolb_datapath_drops_total\{reason="nat_ports_exhausted"\} (\d+)', m, re.M)
    out.append(int(v.group(1)) if v else 0)
    return out


def installed(node):
    """Peer flows the agent on `node` has installed (ferrolb_sync_entries_installed_total)."""
    m = lab(node, "curl", "-sf", "http://127.0.0.1:11111/metrics", check=False)
    v = re.search(r"^ferrolb_sync_entries_installed_total (\d+)", m, re.M)
    return int(v.group(1)) if v else 0


def kill_in_ns(name, ns, grace):
    """SIGTERM to the processes called `name` in network namespace `ns` (this lab node's
    only), then `grace` seconds for them to go."""
    for pid in run(["pgrep", "-x", name], check=False).split():
        try:
            if os.readlink("/proc/%s/ns/net" % pid) == ns:
                os.kill(int(pid), 15)
        except OSError:
            pass
    time.sleep(grace)


def stop_agent(node, ns):
    kill_in_ns("ferrolb", ns, 0.5)
    lab(node, FERROLB, "--remove-datapath")
    # The agent turned forwarding on where it attached; a plain router needs it on too.
    lab(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def attach_baseline(node):
    """--baseline-program: the benchmark program on `node`'s interfaces until detach_baseline."""
    log = "/var/log/ferrolb-bench-attach.log"
    # The last pair's log goes first, so that its "attached" cannot be read for this one.
    lab(node, "sh", "-c", "rm -f %s; %s %s eth1 eth2 > %s 2>&1 &"
        % (log, BENCH_ATTACH, BASELINE, log))
    for _ in range(100):
        if "attached" in lab(node, "cat", log, check=False):
            return
        time.sleep(0.1)
    sys.exit("bench_attach did not attach on %s: %s" % (node, lab(node, "cat", log, check=False)))


def detach_baseline(ns):
    kill_in_ns("bench_attach", ns, 0.3)


def wrk_argv(target, port, seconds):
    return lab_argv("client", "wrk", "-t1", "-c32", "-d%ds" % seconds, "--timeout", "2s",
                    "-H", "Connection: close", "http://%s:%d/" % (target, port))


def wrk_rate(out):
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if re.search(r"Socket errors|Non-2xx", out):
        print("   wrk: " + " ".join(l.strip() for l in out.splitlines()
                                     if "errors" in l or "Non-2xx" in l), flush=True)
    return float(m.group(1)) if m else 0.0


def both(targets, seconds):
    """One wrk per (target, port) at the same time; their connections/s, in order."""
    procs = [subprocess.Popen(wrk_argv(t, p, seconds), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for t, p in targets]
    return [wrk_rate(p.communicate(timeout=seconds + 60)[0]) for p in procs]


def subnet(router):
    return ROUTERS[router]["gw"].rsplit(".", 1)[0]


def fresh_setup():
    """--fresh-tuples: wrk connects from one address, and the client's ~28,000 ports come
    back every second or so, which ferrolb meets as a closed flow's 4-tuple reused (its
    cheapest new connection: the dead flow's entries are rewritten in place). Clients of a
    real VIP mostly come from 4-tuples it has not seen. Here the client's own nftables
    source-NATs each connection to the next of 112 addresses per path (numgen), so a 4-tuple
    returns only after ~2 minutes, once the closed flow has been collected. Both paths pay the
    client's NAT alike. The client owns the addresses (it answers ARP for them), and its
    conntrack forgets a closed connection after 1 s (the default 120 s would fill its table)."""
    cmds = ["for i in $(seq %d %d); do ip addr add %s.$i/32 dev %s; done"
            % (FRESH_HOSTS["ferrolb"].start, FRESH_HOSTS["plain"].stop - 1, subnet(r), dev)
            for r, dev in (("lba", "eth1"), ("lbb", "eth2"))]
    lab("client", "sh", "-c", " && ".join(cmds), timeout=300)
    lab("client", "nft", "add table ip flbab")
    lab("client", "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")


def fresh_rules(lb, plain):
    """This pair's source NAT on the client: each path from its role's addresses."""
    def rule(target, port, router, role):
        hosts = FRESH_HOSTS[role]
        m = ", ".join("%d : %s.%d" % (i, subnet(router), h) for i, h in enumerate(hosts))
        return ("ip daddr %s tcp dport %d snat to numgen inc mod %d map { %s }"
                % (target, port, len(hosts), m))
    a, b = ROUTERS[lb], ROUTERS[plain]
    script = ("flush table ip flbab\n"
              "table ip flbab {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
              "  %s\n  %s\n }\n}\n"
              % (rule(BE1_AA if AA else a["vip"], a["port"], lb, "ferrolb"),
                 rule(BE1, b["port"], plain, "plain")))
    p = subprocess.run(lab_argv("client", "nft", "-f", "-"), input=script, capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        sys.exit("nft on the client: %s%s" % (p.stdout, p.stderr))


def napi_threads():
    """pid -> name of every NAPI kernel thread."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                comm = open("/proc/%s/comm" % pid).read().strip()
            except OSError:
                continue
            if comm.startswith("napi/"):
                out[int(pid)] = comm
    return out


def threaded_napi():
    """--router-cpu: GRO and threaded NAPI on every veth of the lab, one at a time, so that
    the thread each one gets is known. Returns router -> the pids of its interfaces' threads."""
    threads = {}
    for node, devs in NODE_IFS.items():
        for dev in devs:
            before = set(napi_threads())
            lab(node, "ethtool", "-K", dev, "gro", "on")
            lab(node, "sh", "-c", "echo 1 > /sys/class/net/%s/threaded" % dev)
            new = sorted(set(napi_threads()) - before)
            if len(new) != 1:
                sys.exit("%s %s: expected one new NAPI thread, found %s" % (node, dev, new))
            threads.setdefault(node, []).extend(new)
    return {r: threads[r] for r in ROUTERS}


def sched_ns(pids):
    """Nanoseconds on a CPU of threads `pids` (their schedstat), summed."""
    total = 0
    for pid in pids:
        try:
            total += int(open("/proc/%d/schedstat" % pid).read().split()[0])
        except (OSError, ValueError, IndexError):
            sys.exit("NAPI thread %d gone" % pid)
    return total


def trial(lb, plain, seconds, warmup, pid, threads=None, peer=None):
    """Connections/s through ferrolb (on `lb`) and through the plain router in the same
    seconds, and the CPU seconds the agent (`pid`) and its sync peer (`peer`) used meanwhile.
    A/A (--aa): `lb` routes plainly too, to a second address of the backend."""
    a, b = ROUTERS[lb], ROUTERS[plain]
    targets = [(BE1_AA if AA else a["vip"], a["port"]), (BE1, b["port"])]
    if warmup > 0:
        both(targets, warmup)
    c0, q0 = cpu_s(pid), cpu_s(peer)
    r0 = {r: sched_ns(t) for r, t in (threads or {}).items()}
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    f, p = both(targets, seconds)
    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    r1 = {r: sched_ns(t) for r, t in (threads or {}).items()}
    router = {r: (r1[r] - r0[r]) / 1e9 for r in r0}
    return f, p, cpu_s(pid) - c0, cpu_s(peer) - q0, router, (t0, t1)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def interval(xs, n=2000):
    """A 95 % bootstrap interval of the median of xs."""
    rng = random.Random(1)
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def main():
    args = sys.argv[1:]

    def opt(name, default):
        return args[args.index(name) + 1] if name in args else default

    global AA
    AA = "--aa" in args
    global AGENT_ARGS, FRESH, ROUTER_CPU
    AGENT_ARGS = opt("--agent-args", "")
    FRESH = "--fresh-tuples" in args
    ROUTER_CPU = "--router-cpu" in args
    global L4_HASH, BASELINE, PIN_NAPI
    L4_HASH = "--l4-hash" in args
    pin = opt("--pin-napi", None)
    if pin is not None:
        if not ROUTER_CPU or not pin.isdigit() or int(pin) >= os.cpu_count():
            sys.exit("--pin-napi: a CPU number below %d, with --router-cpu" % os.cpu_count())
        PIN_NAPI = int(pin)
    BASELINE = opt("--baseline-program", None)
    if BASELINE is not None:
        if BASELINE not in ("floor", "nop") or not AA:
            sys.exit("--baseline-program: floor or nop, with --aa")
        if not os.access(BENCH_ATTACH, os.X_OK):
            sys.exit("%s missing: cargo build --release -p ferrolb-bpf --example bench_attach"
                     % BENCH_ATTACH)
    global SYNC_PEER
    SYNC_PEER = "--sync-peer" in args
    if SYNC_PEER:
        if AA:
            sys.exit("--sync-peer: not with --aa (no agent on the routers)")
    if ROUTER_CPU:
        AGENT_ARGS += " --no-peer-redirect"
    pairs = int(opt("--pairs", "6"))
    seconds = int(opt("--seconds", "3"))
    warmup = int(opt("--warmup", "1"))
    modes = opt("--modes", "dnat,onearm,fullnat").split(",")
    out_json = opt("--json", None)
    for m in modes:
        if m not in MODES:
            sys.exit("--modes: unknown mode %r (dnat, onearm, fullnat)" % m)
    if os.geteuid() != 0:
        sys.exit("run as root")
    for f in (FERROLAB, FERROLB):
        if not os.access(f, os.X_OK):
            sys.exit("%s missing: cargo build --release (CARGO_TARGET_DIR=%s)" % (f, TARGET))
    run(["bash", os.path.join(ROOT, "scripts", "deps.sh"), "--bench"])
    tmp = tempfile.mkdtemp(prefix="ferrolb-cps-ab-")
    run([FERROLAB, "up", "--name", NAME, "--lab-dir", os.path.join(tmp, "lab"), "--strict", TOPO])
    try:
        bench(tmp, pairs, seconds, warmup, modes, out_json)
    finally:
        run([FERROLAB, "down", "--name", NAME, "--cleanup", TOPO], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def bench(tmp, pairs, seconds, warmup, modes, out_json):
    conf = os.path.join(ROOT, "scripts", "bench", "nginx.conf")
    for r in ROUTERS.values():
        # One nginx per router's path: nginx.conf listens on :80; the second copy on :81.
        text = open(conf).read().replace("listen 80 ", "listen %d " % r["port"]).replace(
            "/var/log/nginx", "/var/log/nginx%d" % r["port"])
        path = os.path.join(tmp, "nginx%d.conf" % r["port"])
        with open(path, "w") as f:
            f.write(text)
        lab("be1", "nginx", "-c", path)
    lab("be1", "ip", "addr", "add", BE1_AA + "/24", "dev", "eth1")
    if FRESH:
        fresh_setup()
    if L4_HASH:
        for r in ROUTERS:
            lab(r, "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
    threads = threaded_napi() if ROUTER_CPU else None
    if threads:
        print("NAPI threads of the routers' interfaces: %s" % ", ".join(
            "%s %s" % (r, " ".join(map(str, t))) for r, t in threads.items()), flush=True)
        if PIN_NAPI is not None:
            for pids in threads.values():
                for pid in pids:
                    os.sched_setaffinity(pid, {PIN_NAPI})
            print("the routers' NAPI threads pinned to CPU %d" % PIN_NAPI, flush=True)
    ns = {n: netns(n) for n in ROUTERS}
    for n in ROUTERS:
        stop_agent(n, ns[n])
    peer = None
    if SYNC_PEER:
        start_agent("be1", "--cluster %s --self 2" % ",".join(
            r["gw_be"] for r in ROUTERS.values()))
        peer = agent_pid(netns("be1"))
        print("sync peer: an agent on be1 (pid %s), node 2 of ferrolb's cluster" % peer,
              flush=True)
    print("new connections/s, ferrolb and plain routing at the same time: %d pairs x %s, "
          "%d s trials after %d s of uncounted load" % (pairs, ",".join(modes), seconds, warmup),
          flush=True)
    ratios = {m: [] for m in modes}
    capacity = {m: [] for m in modes}
    rates = {m: [] for m in modes}
    for i in range(2 * pairs):
        lb, plain = ("lba", "lbb") if i % 2 == 0 else ("lbb", "lba")
        a, b = ROUTERS[lb], ROUTERS[plain]
        # Client routes: the VIP through ferrolb's router, the backend through the plain one,
        # each from the role's own source address.
        lab("client", "ip", "route", "replace", (BE1_AA if AA else a["vip"]) + "/32", "via",
            a["gw"], "src", a["src"]["ferrolb"])
        lab("client", "ip", "route", "replace", BE1 + "/32", "via", b["gw"], "src",
            b["src"]["plain"])
        if FRESH:
            fresh_rules(lb, plain)
        pid = None
        if not AA:
            # With --sync-peer each router is a node of its own (0 lba, 1 lbb; be1 is 2), so
            # that one router's flows are never another's snapshot's stale flows on the peer.
            start_agent(lb, AGENT_ARGS + (" --cluster %s --self %d" % (BE1, a["node"])
                                          if SYNC_PEER else ""))
            pid = agent_pid(ns[lb])
        elif BASELINE:
            attach_baseline(lb)
        for m in modes:
            if not AA:
                api(lb, "POST", "/config/loadbalancer", {
                    "serviceArguments": {"externalIP": a["vip"], "port": a["port"],
                                         "protocol": "tcp", "sel": 0, "mode": MODES[m]},
                    "endpoints": [{"endpointIP": BE1, "targetPort": a["port"], "weight": 1}]})
            c0 = counters(lb) if not AA else [0, 0, 0, 0]
            i0 = installed("be1") if peer else 0
            f, p, agent, peer_cpu, router, window = trial(lb, plain, seconds, warmup, pid,
                                                          threads, peer)
            synced = installed("be1") - i0 if peer else 0
            inv, created, fresh, exhausted = ([x - y for x, y in zip(counters(lb), c0)]
                                              if not AA else [0, 0, 0, 0])
            ratio = f / p if p else 0.0
            ratios[m].append(ratio)
            rates[m].append({"ferrolb_on": lb, "ferrolb": f, "plain": p, "agent_cpu_s": agent,
                             "fib_invalidations": inv, "flows_created": created,
                             "handshakes_in_halfopen_table": fresh,
                             "nat_ports_exhausted": exhausted,
                             # CLOCK_MONOTONIC seconds: for `perf record -k mono` and
                             # `perf report --time` over a trial's counted seconds.
                             "window_monotonic_s": window})
            if peer and f:
                rates[m][-1].update({"peer_agent_cpu_s": peer_cpu, "peer_installed": synced,
                                     "peer_us_per_conn": 1e6 * peer_cpu / (f * seconds)})
                print("  %-7s   sync peer: %.2f us of CPU per connection (counted seconds), %d"
                      " flows installed (the whole trial)"
                      % (m, 1e6 * peer_cpu / (f * seconds), synced), flush=True)
            if threads and f and p:
                # Router CPU per connection (us), each path's own: the forwarding alone, and
                # with the agent's CPU added to ferrolb's.
                us_f = 1e6 * router[lb] / (f * seconds)
                us_p = 1e6 * router[plain] / (p * seconds)
                us_fa = 1e6 * (router[lb] + agent) / (f * seconds)
                capacity[m].append(us_p / us_f)
                rates[m][-1].update({"router_cpu_s": router[lb], "plain_router_cpu_s":
                                     router[plain], "router_us_per_conn": us_f,
                                     "plain_router_us_per_conn": us_p,
                                     "router_us_per_conn_with_agent": us_fa})
                print("  %-7s   router CPU per connection: ferrolb %.2f us (%.2f us with the"
                      " agent), plain %.2f us: ferrolb's router could forward %.3fx plain's new"
                      " connections/s" % (m, us_f, us_fa, us_p, us_p / us_f), flush=True)
            print("  %-7s %s on %s: %7.0f/s, plain via %s: %7.0f/s, ratio %.3f, agent CPU %.2f s,"
                  " FIB cache invalidations %d, flows %d (%.0f %% new 4-tuples), SYNs dropped"
                  " for want of a NAT port %d"
                  % (m, "plain (A/A)" if AA else "ferrolb", lb, f, plain, p, ratio, agent, inv,
                     created, 100.0 * fresh / created if created else 0.0, exhausted),
                  flush=True)
        if not AA:
            stop_agent(lb, ns[lb])
        elif BASELINE:
            detach_baseline(ns[lb])
    if peer:
        kill_in_ns("ferrolb", netns("be1"), 0.5)
        lab("be1", FERROLB, "--remove-datapath")
    print()
    summary = {}
    for m in modes:
        lo, hi = interval(ratios[m])
        summary[m] = {"median": median(ratios[m]), "min": min(ratios[m]), "max": max(ratios[m]),
                      "ci95_median": [lo, hi], "trials": len(ratios[m])}
        print("%-7s ferrolb / plain (same seconds): median %.3f, 95 %% interval of the median "
              "[%.3f, %.3f], range %.3f-%.3f over %d trials"
              % (m, summary[m]["median"], lo, hi, summary[m]["min"], summary[m]["max"],
                 len(ratios[m])))
        if capacity[m]:
            clo, chi = interval(capacity[m])
            summary[m]["router_capacity"] = {"median": median(capacity[m]),
                                             "ci95_median": [clo, chi],
                                             "min": min(capacity[m]), "max": max(capacity[m])}
            print("%-7s router CPU per connection, plain / ferrolb (what each router could"
                  " forward): median %.3f, 95 %% interval [%.3f, %.3f], range %.3f-%.3f"
                  % (m, median(capacity[m]), clo, chi, min(capacity[m]), max(capacity[m])))
    print("bottleneck: the 2 cores, shared by both wrk clients, both nginx servers and both "
          "paths' forwarding at the same moment")
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"summary": summary, "trials": rates, "seconds": seconds,
                       "warmup": warmup, "l4_hash": L4_HASH, "aa": AA,
                       "baseline_program": BASELINE, "pin_napi": PIN_NAPI,
                       "agent_args": AGENT_ARGS, "sync_peer": SYNC_PEER}, f, indent=1)


if __name__ == "__main__":
    main()
