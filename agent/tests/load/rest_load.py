#!/usr/bin/env python3
"""REST load on an HA pair, as kube-loxilb and a monitoring stack would put it.

  rest_load.py NODE1 NODE2 CHANGES CLIENTS OUT.json

CLIENTS threads make CHANGES rule changes between them, each sent to both nodes as kube-loxilb
does: services come and go (3/5 of the changes create a rule, 2/5 delete the rule created
WINDOW creates earlier, so at most WINDOW rules are in place at a time); one thread scrapes
/metrics of both nodes every 100 ms (and samples the sync lag); one reads NODE1's
/config/conntrack/all again a second after each listing ends.
Writes latencies, acknowledged rules, lag samples and errors to OUT.json. Bounded: every
request has a 10 s timeout and the whole run stops after 110 s.
"""
import http.client
import json
import sys
import threading
import time

nodes = [sys.argv[1], sys.argv[2]]
changes = int(sys.argv[3])
clients = int(sys.argv[4])
out_path = sys.argv[5]
VIP = "203.0.113.10"
DEADLINE = time.time() + 110

creates = changes * 3 // 5
deletes = changes - creates
WINDOW = 1000  # a multiple of CLIENTS: a port's create and delete go to the same client
lock = threading.Lock()
lat = []            # seconds, every rule change request
errors = []
acked_create = set()
acked_delete = set()
scrapes = []        # seconds, every /metrics request
lag = {n: [] for n in nodes}
ct_reads = []       # (seconds, flows)
done = threading.Event()


def conn(node):
    return http.client.HTTPConnection(node, 11111, timeout=10)


def request(c, method, path, body=None):
    c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    return r.status, r.read()


def rule(port):
    return json.dumps({
        "serviceArguments": {"externalIP": VIP, "port": port, "protocol": "tcp", "sel": 0,
                             "mode": 2, "BGP": True, "name": f"load-{port}:llb-inst0"},
        "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": 9000, "weight": 1},
                      {"endpointIP": "10.10.10.12", "targetPort": 9000, "weight": 1}],
    })


def worker(k):
    cs = {n: conn(n) for n in nodes}
    mine = []
    for i in range(creates):
        if i % clients != k:
            continue
        mine.append(("create", 20000 + i))
        if i >= WINDOW and i - WINDOW < deletes:
            mine.append(("delete", 20000 + i - WINDOW))
    for op, port in mine:
        if time.time() > DEADLINE:
            break
        ok = True
        for n in nodes:
            t = time.perf_counter()
            try:
                if op == "create":
                    st, body = request(cs[n], "POST", "/netlox/v1/config/loadbalancer", rule(port))
                else:
                    st, body = request(cs[n], "DELETE",
                                       f"/netlox/v1/config/loadbalancer/externalipaddress/{VIP}/port/{port}/protocol/tcp")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                cs[n] = conn(n)
                st, body = -1, str(e).encode()
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                if st != 200:
                    ok = False
                    errors.append(f"{op} {port} on {n}: {st} {body[:200]!r}")
        if ok:
            with lock:
                (acked_create if op == "create" else acked_delete).add(port)


def scraper():
    cs = {n: conn(n) for n in nodes}
    while not done.is_set() and time.time() < DEADLINE:
        t0 = time.perf_counter()
        for n in nodes:
            t = time.perf_counter()
            try:
                st, body = request(cs[n], "GET", "/metrics")
            except Exception as e:  # noqa: BLE001
                cs[n] = conn(n)
                with lock:
                    errors.append(f"metrics {n}: {e}")
                continue
            with lock:
                scrapes.append(time.perf_counter() - t)
            if st != 200:
                with lock:
                    errors.append(f"metrics {n}: {st}")
                continue
            for line in body.decode().splitlines():
                if line.startswith("ferrolb_sync_lag_seconds{"):
                    lag[n].append(float(line.rsplit(" ", 1)[1]))
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))


def ct_reader():
    while not done.is_set() and time.time() < DEADLINE:
        c = conn(nodes[0])
        t = time.perf_counter()
        try:
            st, body = request(c, "GET", "/netlox/v1/config/conntrack/all")
            # Complete and well-formed at both ends; flows counted without parsing 25 MB.
            ok = st == 200 and body.startswith(b'{"ctAttr":[') and body.endswith(b"]}")
            flows = body.count(b'"sourceIP"') if ok else -1
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"conntrack: {e}")
            continue
        with lock:
            ct_reads.append((time.perf_counter() - t, flows))
        c.close()
        done.wait(1.0)


threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
side = [threading.Thread(target=scraper), threading.Thread(target=ct_reader)]
start = time.perf_counter()
for t in side + threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - start
done.set()
for t in side:
    t.join()


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]


json.dump({
    "changes": changes, "clients": clients, "seconds": elapsed,
    "requests": len(lat), "p50": pct(lat, 0.50), "p99": pct(lat, 0.99), "max": max(lat or [0]),
    "created": sorted(acked_create), "deleted": sorted(acked_delete),
    "scrapes": len(scrapes), "scrape_p99": pct(scrapes, 0.99),
    "lag_p99": {n: pct(v, 0.99) for n, v in lag.items()}, "lag_samples": {n: len(v) for n, v in lag.items()},
    "ct_reads": ct_reads, "errors": errors[:50], "error_count": len(errors),
}, open(out_path, "w"))
