#!/usr/bin/env python3
"""Installs N load-balancer rules through the REST API over one keep-alive connection and
prints {"rules": N, "seconds": T, "errors": [...]} as JSON.

  load_rules.py URL_HOST PORT N ENDPOINTS_PER_RULE
Rule i: VIP 198.18.(i // 10 // 250).(i // 10 % 250 + 1), port 1000 + i % 10, tcp,
endpoints 10.20.x.y:8080 (distinct per rule).
"""
import http.client
import json
import sys
import time

host, port, n, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=10)
errors = []
start = time.monotonic()
for i in range(n):
    vip_n = i // 10
    vip = "198.18.%d.%d" % (vip_n // 250, vip_n % 250 + 1)
    eps = [{"endpointIP": "10.20.%d.%d" % ((i * per + k) // 250 % 250, (i * per + k) % 250 + 1),
            "targetPort": 8080, "weight": 1} for k in range(per)]
    body = json.dumps({"serviceArguments": {"externalIP": vip, "port": 1000 + i % 10,
                                            "protocol": "tcp", "sel": 1, "mode": 2,
                                            "name": "bench_%d:llb-inst0" % i},
                       "endpoints": eps})
    conn.request("POST", "/netlox/v1/config/loadbalancer", body,
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        errors.append("%d: %d %s" % (i, r.status, data[:200]))
        if len(errors) > 5:
            break
print(json.dumps({"rules": n, "seconds": time.monotonic() - start, "errors": errors}))
