#!/usr/bin/env bash
# The main job: the HA pair lab (an FRR ToR, two ferrolb nodes started with
# --cluster/--self/--ka, three backends, a client). Brings the lab up, configures BGP (with BFD
# to the ToR) and two full-NAT rules on both nodes over REST as kube-loxilb does, shows the
# roles and the ToR's routes, runs 20 TCP streams and 10 UDP flows through the VIP while the
# MASTER dies silently (every frame to and from it dropped at its neighbours), prints what
# survived and the outage, shows the new roles, and tears the lab down (also on failure or
# Ctrl-C). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/ferrolb-target}"
cargo build --quiet -p ferrolb-lab -p ferrolb-agent --bins
BIN="$CARGO_TARGET_DIR/debug"
FERROLAB="$BIN/ferrolab"
TOPO=containerlab/ha-pair/ha-pair.clab.yml
LABDIR="$(mktemp -d /tmp/ferrolb-demo-ha.XXXXXX)"
VIP=203.0.113.10
lab() { "$FERROLAB" exec "$TOPO" "$@"; }
api() { # node method path [json]
  local node=$1 method=$2 path=$3 body=${4:-}
  if [ -n "$body" ]; then
    lab "$node" -- curl -sf -m 5 -X "$method" -H 'Content-Type: application/json' \
      --data-binary "$body" "http://127.0.0.1:11111/netlox/v1$path" >/dev/null
  else
    lab "$node" -- curl -sf -m 5 -X "$method" "http://127.0.0.1:11111/netlox/v1$path"
  fi
}
ctl() { local node=$1; shift; lab "$node" -- "$BIN/ferroctl" "$@"; }
wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for $what" >&2; return 1
}
cleanup() { "$FERROLAB" down "$TOPO" >/dev/null 2>&1 || true; rm -rf "$LABDIR"; }
trap cleanup EXIT INT TERM

"$FERROLAB" up --strict --lab-dir "$LABDIR" --var "FERROLB=$BIN/ferrolb" "$TOPO" | sed -n '/is up/,$p'
echo
echo "== configuring both LB nodes over REST (BGP to the ToR with BFD, two full-NAT rules)"
for n in "lb1 192.0.2.2 192.0.2.1" "lb2 192.0.2.6 192.0.2.5"; do
  set -- $n
  node=$1 me=$2 tor=$3
  wait_for "$node's API" api "$node" GET ""
  api "$node" POST /config/bgp/global "{\"localAs\":65100,\"routerId\":\"$me\",\"setNextHopSelf\":true,\"listenPort\":179}"
  api "$node" POST /config/bgp/neigh "{\"ipAddress\":\"$tor\",\"remoteAs\":65000,\"remotePort\":179,\"setMultiHop\":false,\"bfd\":true}"
  for svc in "tcp 9000 demo-tcp" "udp 9001 demo-udp"; do
    set -- $svc
    api "$node" POST /config/loadbalancer "{\"serviceArguments\":{\"externalIP\":\"$VIP\",\"port\":$2,\"protocol\":\"$1\",\"sel\":1,\"mode\":2,\"BGP\":true,\"name\":\"$3:llb-inst0\"},\"endpoints\":[{\"endpointIP\":\"10.10.10.11\",\"targetPort\":$2,\"weight\":1},{\"endpointIP\":\"10.10.10.12\",\"targetPort\":$2,\"weight\":1},{\"endpointIP\":\"10.10.10.13\",\"targetPort\":$2,\"weight\":1}]}"
  done
done
roles_are() { # lb1-role lb2-role
  api lb1 GET /config/cistate/all | grep -q "\"state\":\"$1\"" &&
    api lb2 GET /config/cistate/all | grep -q "\"state\":\"$2\""
}
best_via() { lab tor -- ip route show "$VIP" | grep -q "via $1" && ! lab tor -- ip route show "$VIP" | grep -q nexthop; }
wait_for "roles MASTER/BACKUP" roles_are MASTER BACKUP
wait_for "the ToR's best path via lb1" best_via 192.0.2.2
wait_for "backends" lab lb1 -- curl -sf -m 1 http://10.10.10.13:8080/
echo
echo "== roles (ferroctl get ha on lb2)"
ctl lb2 get ha
echo
echo "== the ToR: BGP paths to the VIP (lb2's is prepended) and the kernel route"
lab tor -- vtysh -c "show bgp ipv4 unicast $VIP/32" | grep -E "^  [0-9]|best|Last update" || true
lab tor -- ip route show "$VIP"
echo
echo "== traffic: 20 TCP streams and 10 UDP flows through $VIP; lb1 (MASTER) dies silently at 3 s"
LOG="$LABDIR/client/log"
"$FERROLAB" exec "$TOPO" client -- sh -c \
  "python3 $PWD/containerlab/ha-pair/traffic.py $VIP --tcp 20 --late 5 --udp 10 --duration 7 --fault-at 3 --t0-file /var/log/demo.t0 > /var/log/demo.json" &
TRAFFIC=$!
wait_for "the traffic client" test -e "$LOG/demo.t0"
sleep 3
for at in "tor eth2" "sw eth1"; do
  set -- $at
  echo "table netdev demo_fault { chain in { type filter hook ingress device \"$2\" priority -500; policy drop; }; chain out { type filter hook egress device \"$2\" priority -500; policy drop; }; }" |
    lab "$1" -- nft -f -
done
echo "   lb1 cut off (every frame dropped at the ToR's and the switch's ports toward it)"
wait "$TRAFFIC"
python3 - "$LOG/demo.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
print("   TCP streams surviving, intact and in order: %d/%d (longest stall %d ms)"
      % (s["tcp_survived"], s["tcp_streams"], s["tcp_max_gap_ms"]))
print("   UDP flows resumed: %d/%d, on their original backend: %d/%d"
      % (s["udp_resumed"], s["udp_flows"], s["udp_flows"] - s["udp_backend_changed"], s["udp_flows"]))
print("   outage seen by a UDP probe every 10 ms: %d ms" % s["udp_outage_ms"])
EOF
echo
echo "== after the failover (ferroctl get ha on lb2)"
ctl lb2 get ha
lab tor -- ip route show "$VIP"
